"""``hipt-ray train-head``: one head configuration, cross-validated, logged to MLflow."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hipt_ray.config import Config, check_name
from hipt_ray.heads.baselines import baselines
from hipt_ray.heads.cohort import load_cohort
from hipt_ray.heads.fit import cross_validate, make_folds, restore_folds, summarise
from hipt_ray.heads.metrics import km_split, pooled_ci, pooled_metric
from hipt_ray.storage import local_output_dir

log = logging.getLogger(__name__)


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

    def lines(self) -> list[str]:
        m = self.metrics
        key = "auc" if "auc" in m else "c_index"
        lines = [self.cohort] if self.cohort else []
        lines += [f"{key}: {m[key]:.3f} ± {m[key + '_std']:.3f} over {len(self.per_fold)} case-level folds "
                  f"(split {self.split_hash}); pooled out-of-fold {m['pooled']:.3f} "
                  f"(95 % CI {m['pooled_ci_low']:.3f}–{m['pooled_ci_high']:.3f})"]
        if f"val_{key}" in m:
            lines += [f"  inner validation {key} {m[f'val_{key}']:.3f} (model selection; "
                      f"selected epoch {m['best_epoch']:.1f} on average)"]
        for name, label in BASELINES.items():
            if f"{name}_{key}" in m:
                lines += [f"{label}: {m[f'{name}_{key}']:.3f} ± {m[f'{name}_{key}_std']:.3f}; pooled "
                          f"{m[f'{name}_pooled']:.3f} (95 % CI {m[f'{name}_pooled_ci_low']:.3f}–"
                          f"{m[f'{name}_pooled_ci_high']:.3f})"]
        if self.per_fold:  # one line, fold by fold (results.csv and MLflow hold every figure)
            lines += ["  per fold: " + "; ".join(f"{k} " + " ".join(f"{f[k]:.3f}" for f in self.per_fold)
                                                for k in self.per_fold[0])]
        lines += [f"results: {self.results_csv}", f"plot: {self.plot}", f"MLflow run: {self.run_id}"]
        return lines


BASELINES = {"probe_logreg": "baseline logistic regression on mean embeddings",
             "probe_knn": "baseline KNN on mean embeddings",
             "cox": "baseline penalised Cox on mean embeddings"}


def pooled_outputs(task: str, states) -> dict:
    """The out-of-fold outputs of every fold's selected model, pooled over folds."""
    keys = ("probs", "labels") if task == "subtyping" else ("risk", "times", "events")
    return {k: np.concatenate([st.last[k] for st in states]) for k in keys}


def run_dir_for(cfg: Config, name: str) -> str:
    return local_output_dir(cfg.out, "heads", name)


def train_head(cfg: Config, *, run_name: str | None = None, parent_run_id: str | None = None,
               trained: list[dict] | None = None) -> HeadResult:
    """Cross-validate ``cfg.heads`` and log it; with ``trained`` (a sweep trial's
    :func:`~hipt_ray.heads.fit.fold_records` of this very configuration) its folds are taken as
    trained, and everything after training (baselines, CIs, predictions, plots) is done on them."""
    import mlflow

    from hipt_ray.tracking import setup_tracking
    from hipt_ray.viz.plots import km_png, roc_png

    h = cfg.heads
    name = check_name(run_name or f"{h.task}-{h.head}", "--run-name")
    cohort = load_cohort(cfg)
    folds, split_hash = make_folds(h, cohort)
    run_dir = run_dir_for(cfg, name)
    with open(os.path.join(run_dir, "splits.json"), "w") as fh:
        json.dump({"hash": split_hash, "folds": folds}, fh, indent=1)
    setup_tracking(cfg)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with mlflow.start_run(run_name=name, tags=tags, nested=parent_run_id is not None) as run:
        mlflow.log_params({f"heads.{k}": v for k, v in h.model_dump(mode="json").items()})
        mlflow.log_params({"split_hash": split_hash, "n_cases": len(cohort.case_ids), "model_id": cohort.model_id,
                           "regions_table_version": cohort.table_version, "n_folds": len(folds)})
        states = None
        if trained is not None:
            try:
                states = restore_folds(h, cohort, trained)
            except ValueError as exc:  # not these folds: train them here instead
                log.warning("the sweep trial's trained folds do not fit this run (%s): training them again", exc)
        reused = states is not None
        if reused:
            mean = summarise(states)
            _log_folds(mean, states)
            mlflow.set_tag("folds", "taken from the sweep trial that trained them (per-epoch metrics in its run)")
        else:
            for epoch, states, mean in cross_validate(h, cohort):
                _log_folds(mean, states, step=epoch)
        per_fold = [st.last["metrics"] for st in states]
        oof = pooled_outputs(h.task, states)
        summary = {"pooled": pooled_metric(h.task, oof)}
        summary["pooled_ci_low"], summary["pooled_ci_high"] = pooled_ci(h.task, oof, seed=h.seed)
        for bname, b in baselines(h.task, cohort, folds, seed=h.seed).items():  # same embeddings, same folds
            summary.update({f"{bname}_{k}": v for k, v in b["metrics"].items()})
            summary[f"{bname}_pooled"] = b["pooled"]
            summary[f"{bname}_pooled_ci_low"], summary[f"{bname}_pooled_ci_high"] = b["ci"]
        mlflow.log_metrics({k: v for k, v in summary.items() if np.isfinite(v)})
        mean = {**mean, **summary}
        rows = []
        for f, st in enumerate(states):
            for j, i in enumerate(st.val):
                row = {"fold": f, "case_id": cohort.case_ids[i]}
                if h.task == "subtyping":
                    row.update(label=cohort.classes[cohort.labels[i]],
                               **{f"p_{c}": float(st.last["probs"][j, k]) for k, c in enumerate(cohort.classes)})
                else:
                    row.update(risk=float(st.last["risk"][j]), survival_months=float(cohort.times[i]),
                               event=int(cohort.events[i]))
                rows.append(row)
        heads_pt = save_heads(os.path.join(run_dir, "heads.pt"), cfg, cohort, states)
        mlflow.log_artifact(heads_pt)
        results_csv = os.path.join(run_dir, "predictions.csv")
        pd.DataFrame(rows).to_csv(results_csv, index=False)
        if h.task == "subtyping":
            plot = roc_png(oof["labels"], oof["probs"], cohort.classes, os.path.join(run_dir, "roc.png"),
                           f"{h.head}: out-of-fold ROC")
        else:
            # Risk groups split at each fold's training-part median risk, pooled over folds.
            times, events, high = [], [], []
            for st in states:
                train_risk = np.median([_train_risk(h, st, cohort, i) for i in st.fit_cases])
                high.append(st.last["risk"] > train_risk)
                times.append(st.last["times"])
                events.append(st.last["events"])
            hi = np.concatenate(high).astype(float)
            km = km_split(np.concatenate(times), np.concatenate(events), hi, threshold=0.5)
            mlflow.log_metric("logrank_p", km["p_value"])
            plot = km_png(km, os.path.join(run_dir, "km.png"), f"{h.head}: out-of-fold risk groups")
        mlflow.log_artifact(results_csv)
        mlflow.log_artifact(plot)
        return HeadResult(metrics=mean, per_fold=per_fold, split_hash=split_hash, run_id=run.info.run_id,
                          results_csv=results_csv, plot=plot, cohort=describe_cohort(cohort),
                          reused=reused)


def _log_folds(mean: dict, states, step: int | None = None) -> None:
    """The mean metrics and each fold's outer-fold metrics, to the active MLflow run."""
    import mlflow

    mlflow.log_metrics(mean, step=step)
    for f, st in enumerate(states):
        mlflow.log_metrics({f"fold{f}_{k}": v for k, v in st.last["metrics"].items()}, step=step)


def describe_cohort(cohort) -> str:
    """One line: cases and slides used, and what did not join (labels ↔ embeddings)."""
    n_slides = sum(len(v) for v in cohort.slides.values())
    text = f"cohort: {len(cohort.case_ids)} cases, {n_slides} slides (model {cohort.model_id})"
    for what, ids in (("labelled slides without embeddings", cohort.missing_embeddings),
                      ("embedded slides without labels", cohort.unlabelled)):
        if ids:
            text += f"; {len(ids)} {what}: {', '.join(ids[:5])}{' …' if len(ids) > 5 else ''}"
    return "; ".join([text, *cohort.excluded])


def save_heads(path: str, cfg: Config, cohort, states) -> str:
    """Every fold's trained head with what is needed to rebuild it and to know which cases it
    never saw (for out-of-fold slide heatmaps)."""
    import torch

    torch.save({
        "config": cfg.to_dict(), "classes": cohort.classes, "model_id": cohort.model_id,
        "cases": cohort.slides,
        "folds": [{"val": [cohort.case_ids[i] for i in st.val], "state_dict": st.head.state_dict(),
                   "inner_val": [cohort.case_ids[i] for i in (st.inner if st.inner is not None else [])],
                   "epoch": st.best_epoch} for st in states],
    }, path)
    return path


def _train_risk(h, st, cohort, i: int) -> float:
    import torch

    from hipt_ray.heads.fit import risk_of

    with torch.no_grad():
        return float(risk_of(h, st.head.eval()(cohort.inputs[i])[0])[0])
