"""MLflow tracking: the URI from config (a local SQLite store under --out by default) and an
experiment whose artifacts live beside that store (MLflow would otherwise put them in ./mlruns
of whatever directory the command ran in)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from hipt_ray.config import Config, HeadsConfig
from hipt_ray.storage import local_output_dir

if TYPE_CHECKING:  # for the annotation only: importing the cohort loads torch and Lance
    from hipt_ray.heads.cohort import Cohort


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    base = local_output_dir(cfg.out)
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
        mlflow.create_experiment(name, artifact_location=f"file://{artifacts}")
    mlflow.set_experiment(name)
    return uri


def _finite(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class CrossValidationLog:
    """The MLflow record of one cross-validated head configuration, written the same way by
    ``train-head`` and by every sweep trial into the active run: its parameters, per epoch the
    mean metrics with each fold's outer (``fold{f}_*``) and inner-validation (``fold{f}_val_*``)
    metrics, and the final summary. Undefined (NaN) metrics are left out: MLflow shows them as
    missing rather than as a number."""

    def __init__(
        self, heads: dict, *, split_hash: str, n_cases: int, n_folds: int, model_id: str, table_version: int
    ) -> None:
        import mlflow

        mlflow.log_params({f"heads.{k}": v for k, v in heads.items()})
        mlflow.log_params(
            {
                "split_hash": split_hash,
                "n_cases": n_cases,
                "model_id": model_id,
                "regions_table_version": table_version,
                "n_folds": n_folds,
            }
        )

    @classmethod
    def of_cohort(cls, heads: HeadsConfig, cohort: Cohort, *, split_hash: str, n_folds: int) -> CrossValidationLog:
        """The record of ``heads`` cross-validated on ``cohort`` (its cases, embedding model and
        regions-table version) over ``n_folds`` folds split as ``split_hash``."""
        return cls(
            heads.model_dump(mode="json"),
            split_hash=split_hash,
            n_cases=len(cohort.case_ids),
            n_folds=n_folds,
            model_id=cohort.model_id,
            table_version=cohort.table_version,
        )

    @staticmethod
    def epoch_metrics(states: list, mean: dict) -> dict:
        """The mean metrics and every fold's outer and inner-validation metrics, as one flat dict."""
        out = dict(mean)
        for f, st in enumerate(states):
            out.update({f"fold{f}_{k}": v for k, v in st.last["metrics"].items()})
            out.update({f"fold{f}_val_{k}": v for k, v in st.inner_metrics.items()})
        return out

    def log_epoch(self, states: list, mean: dict, step: int | None = None) -> dict:
        """Log :meth:`epoch_metrics` at ``step`` (an epoch; None for folds trained elsewhere)."""
        import mlflow

        metrics = self.epoch_metrics(states, mean)
        mlflow.log_metrics(_finite(metrics), step=step)
        return metrics

    def log_summary(self, summary: dict, per_fold: list[dict]) -> None:
        """The metrics computed once on the selected models: pooled, baselines, per fold."""
        import mlflow

        mlflow.log_metrics(_finite(summary))
        for f, m in enumerate(per_fold):
            mlflow.log_metrics(_finite({f"fold{f}_{k}": v for k, v in m.items()}))
