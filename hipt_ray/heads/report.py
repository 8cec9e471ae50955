"""What ``train-head`` reports on the selected models of a cross-validation: the task's pooled
out-of-fold metric with its bootstrap CI, the metrics computed once (survival: IPCW c-index,
time-dependent AUC, integrated Brier score, per fold and out-of-fold), the baselines on the same
folds, every case's out-of-fold prediction and the task's plot."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hipt_ray.config import HeadsConfig
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.fit import FoldState, evaluate, fold_means
from hipt_ray.heads.tasks import task_for


@dataclass
class Report:
    summary: dict[str, float]  # pooled metric and CI, means of the report's per-fold metrics, baselines
    per_fold: list[dict]  # the report's own metrics of each fold (not those logged per epoch)
    results_csv: str
    plot: str


def report(h: HeadsConfig, cohort: Cohort, states: list[FoldState], folds: list[dict], run_dir: str) -> Report:
    task = task_for(h)
    # Each fold model's outputs on the cases it trained on: risk-group thresholds, survival curves.
    train_outputs = [evaluate(task, st.head, cohort, st.fit_cases) if task.needs_train_outputs else {} for st in states]
    oof = {k: np.concatenate([st.last[k] for st in states]) for k in task.output_keys}
    summary = task.pooled(oof, seed=h.seed)
    per_fold, pooled_extra = task.report_metrics(cohort, states, train_outputs)
    summary.update({**fold_means(per_fold), **pooled_extra})
    for name, b in task.run_baselines(cohort, folds, seed=h.seed).items():  # same embeddings, same folds
        summary.update({f"{name}_{k}": v for k, v in b["metrics"].items()})
        summary[f"{name}_pooled"] = b["pooled"]
        summary[f"{name}_pooled_ci_low"], summary[f"{name}_pooled_ci_high"] = b["ci"]
    plot, shown = task.plot(cohort, states, oof, train_outputs, run_dir)
    summary.update(shown)
    rows = [
        {"fold": f, "case_id": cohort.case_ids[i], **task.prediction_row(cohort, i, st.last, j)}
        for f, st in enumerate(states)
        for j, i in enumerate(st.val)
    ]
    results_csv = os.path.join(run_dir, "predictions.csv")
    pd.DataFrame(rows).to_csv(results_csv, index=False)
    return Report(summary=summary, per_fold=per_fold, results_csv=results_csv, plot=plot)
