"""MLflow tracking: the URI from config (a local SQLite store under --out by default) and an
experiment whose artifacts live beside that store (MLflow would otherwise put them in ./mlruns
of whatever directory the command ran in)."""

from __future__ import annotations

import math
import os
import urllib.parse
from typing import TYPE_CHECKING

from hipt_ray.config import Config, HeadsConfig, InputError
from hipt_ray.storage import local_output_dir

if TYPE_CHECKING:  # for the annotation only: importing the cohort loads torch and Lance
    from hipt_ray.heads.cohort import Cohort


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    base = local_output_dir(cfg.out)
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"


def check_store_reaches_workers(cfg: Config, what: str) -> None:
    """Refuse, before any work, to run ``what``'s workers on a cluster against the default MLflow
    store: a SQLite file on the driver's disk, which a worker on another node cannot reach (it
    would write a store of its own on its own disk, or fail to open the path, and the runs would
    never reach the driver's). Joined to no cluster (a local Ray), with ``tracking.mlflow_uri`` set
    (a tracking server, or a filesystem every node mounts: the user's word), or with the default
    store under a local ``--out`` every node mounts (``storage.shared_output``), nothing is checked.

    Raises:
        InputError: the cluster has or can add other nodes than the one this driver runs on."""
    from hipt_ray.runtime import other_nodes, ray_address
    from hipt_ray.storage import is_remote

    if cfg.tracking.mlflow_uri:
        return
    if cfg.out and not is_remote(cfg.out) and cfg.storage.shared_output:
        return  # the default store is under --out, which every node mounts
    if (size := other_nodes(ray_address(cfg.ray.address))) is not None:
        raise InputError(
            f"{what} on a cluster logs to MLflow from its workers, on other nodes, and the default store "
            f"{tracking_uri(cfg)} is a file on this machine ({size}); run an MLflow server every node "
            "can reach (`mlflow server --host 0.0.0.0 --backend-store-uri sqlite:///mlflow.db`) and pass "
            "tracking.mlflow_uri=http://<its host>:5000, or a store on a filesystem every node mounts"
        )


def for_workers(uri: str) -> str:
    """``uri`` as a worker on another node must write to it: a tracking server on this node named
    ``localhost`` (how the driver on a cluster's head reaches the server beside it) is named by
    this node's IP address instead; every other URI is returned as it is."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        return uri
    import ray

    user = parts.netloc.rpartition("@")[0]
    host = ray.util.get_node_ip_address() + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


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
