"""``hipt-ray train-head``: one head configuration, cross-validated, logged to MLflow."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from hipt_ray.config import Config, check_name
from hipt_ray.heads.cohort import Cohort, load_cohort
from hipt_ray.heads.fit import cross_validate, make_folds, restore_folds, summarise
from hipt_ray.heads.report import report
from hipt_ray.heads.saved import HEADS_FILE, save_folds
from hipt_ray.heads.tasks import task_for
from hipt_ray.storage import local_output_dir
from hipt_ray.tracking import CrossValidationLog, setup_tracking

log = logging.getLogger(__name__)

# How the report names the task metrics computed once on the selected models.
REPORT_METRICS = {
    "c_index_ipcw": "Uno's IPCW c-index",
    "td_auc": "time-dependent AUC",
    "ibs": "integrated Brier score (lower is better)",
}


@dataclass
class HeadResult:
    metrics: dict
    per_fold: list[dict]
    split_hash: str
    run_id: str
    results_csv: str
    plot: str
    cohort: str = ""
    reused: bool = False  # the folds came trained (a sweep trial's), not trained here
    metric: str = "auc"  # the task's primary metric
    baselines: dict[str, str] = field(default_factory=dict)  # name → description

    def lines(self) -> list[str]:
        m, key, n = self.metrics, self.metric, len(self.per_fold)
        defined = sum(np.isfinite(f.get(key, np.nan)) for f in self.per_fold)
        folds = (
            f"{n} case-level folds" if defined == n else f"the {defined} of {n} case-level folds where it is defined"
        )
        lines = [self.cohort] if self.cohort else []
        lines += [
            f"{key}: {m[key]:.3f} ± {m[key + '_std']:.3f} over {folds} "
            f"(split {self.split_hash}); pooled out-of-fold {m['pooled']:.3f} "
            f"(95 % CI {m['pooled_ci_low']:.3f}–{m['pooled_ci_high']:.3f})"
        ]
        if f"val_{key}" in m:
            lines += [
                f"  inner validation {key} {m[f'val_{key}']:.3f} (model selection; "
                f"selected epoch {m['best_epoch']:.1f} on average)"
            ]
        lines += [
            f"{label}: {m[k]:.3f} ± {m[k + '_std']:.3f} over folds; pooled out-of-fold {m['pooled_' + k]:.3f}"
            for k, label in REPORT_METRICS.items()
            if k in m
        ]
        for name, label in self.baselines.items():
            if f"{name}_{key}" in m:
                lines += [
                    f"{label}: {m[f'{name}_{key}']:.3f} ± {m[f'{name}_{key}_std']:.3f}; pooled "
                    f"{m[f'{name}_pooled']:.3f} (95 % CI {m[f'{name}_pooled_ci_low']:.3f}–"
                    f"{m[f'{name}_pooled_ci_high']:.3f})"
                ]
        if self.per_fold:  # one line, fold by fold (results.csv and MLflow hold every figure); n/a: undefined
            keys = list(dict.fromkeys(k for f in self.per_fold for k in f))
            lines += [
                "  per fold: " + "; ".join(f"{k} " + " ".join(_fmt(f.get(k)) for f in self.per_fold) for k in keys)
            ]
        lines += [f"results: {self.results_csv}", f"plot: {self.plot}", f"MLflow run: {self.run_id}"]
        return lines


def _fmt(v: float | None) -> str:
    return f"{v:.3f}" if v is not None and np.isfinite(v) else "n/a"


def run_dir_for(cfg: Config, name: str) -> str:
    return local_output_dir(cfg.out, "heads", name)


def train_head(
    cfg: Config, *, run_name: str | None = None, parent_run_id: str | None = None, trained: dict | None = None
) -> HeadResult:
    """Cross-validate ``cfg.heads`` and log it; with ``trained`` (a sweep trial's folds of this very
    configuration, as :func:`~hipt_ray.heads.saved.save_folds` writes them) its folds are taken as
    trained, and everything after training (baselines, CIs, predictions, plots) is done on them."""
    import mlflow

    h, task = cfg.heads, task_for(cfg.heads)
    name = check_name(run_name or f"{h.task}-{h.head}", "--run-name")
    cohort = load_cohort(cfg)
    folds, split_hash = make_folds(h, cohort)
    run_dir = run_dir_for(cfg, name)
    with open(os.path.join(run_dir, "splits.json"), "w") as fh:
        json.dump({"hash": split_hash, "folds": folds}, fh, indent=1)
    setup_tracking(cfg)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with mlflow.start_run(run_name=name, tags=tags, nested=parent_run_id is not None) as run:
        cv_log = CrossValidationLog.of_cohort(h, cohort, split_hash=split_hash, n_folds=len(folds))
        states = _restored(h, cohort, trained)
        reused = states is not None
        if reused:
            cv_log.log_epoch(states, summarise(states))
            mlflow.set_tag("folds", "taken from the sweep trial that trained them (per-epoch metrics in its run)")
        else:
            for epoch, states, mean in cross_validate(h, cohort):
                cv_log.log_epoch(states, mean, step=epoch)
        rep = report(h, cohort, states, folds, run_dir)
        cv_log.log_summary(rep.summary, rep.per_fold)
        for path in (
            save_folds(os.path.join(run_dir, HEADS_FILE), cfg, cohort, states, split_hash),
            rep.results_csv,
            rep.plot,
        ):
            mlflow.log_artifact(path)
        return HeadResult(
            metrics={**summarise(states), **rep.summary},
            split_hash=split_hash,
            per_fold=[{**st.last["metrics"], **extra} for st, extra in zip(states, rep.per_fold)],
            run_id=run.info.run_id,
            results_csv=rep.results_csv,
            plot=rep.plot,
            cohort=describe_cohort(cohort),
            reused=reused,
            metric=task.metric,
            baselines=task.baselines,
        )


def _restored(h, cohort: Cohort, trained: dict | None) -> list | None:
    """The sweep trial's trained folds, or None (none given, or not these folds: train them here)."""
    if trained is None:
        return None
    try:
        return restore_folds(h, cohort, trained)
    except ValueError as exc:
        log.warning("the sweep trial's trained folds do not fit this run (%s): training them again", exc)
        return None


def describe_cohort(cohort) -> str:
    """One line: cases and slides used, and what did not join (labels ↔ embeddings)."""
    n_slides = sum(len(v) for v in cohort.slides.values())
    text = f"cohort: {len(cohort.case_ids)} cases, {n_slides} slides (model {cohort.model_id})"
    for what, ids in (
        ("labelled slides without embeddings", cohort.missing_embeddings),
        ("embedded slides without labels", cohort.unlabelled),
    ):
        if ids:
            text += f"; {len(ids)} {what}: {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}"
    return "; ".join([text, *cohort.excluded])
