"""Heads are tasks: what differs between subtyping, Cox survival and discrete-time (NLL) survival.

A :class:`Task` is chosen once from the config (:func:`task_for`) and knows its strata (what the
folds are stratified by), its outputs and loss, its metrics and primary metric, its baselines,
its predictions table and its plot; fitting (``heads.fit``), the report (``heads.report``) and the
sweep (``tune.sweep``) are one code path for every task, as the two pretraining stages are one
DINO loop (``train.dino.StageSpec``).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hipt_ray.config import HeadsConfig
from hipt_ray.heads import metrics as M
from hipt_ray.heads.baselines import cox_baseline, probe_baselines
from hipt_ray.heads.labels import LabelError, as_numbers, check_group_sizes, where_rows
from hipt_ray.heads.losses import cox_loss, risk_from_logits, survival_bins, survival_nll
from hipt_ray.viz.plots import km_png, roc_png

if TYPE_CHECKING:
    from hipt_ray.heads.cohort import Cohort

log = logging.getLogger(__name__)


class Task(ABC):
    """The task-specific parts of cross-validating a slide-level head (subclasses fill them in)."""

    name: str  # heads.task
    metric: str  # the primary metric, higher is better (the sweep maximises it on inner validation)
    default_folds: int
    baselines: dict[str, str]  # baseline name → how the report describes it
    output_keys: tuple[str, ...]  # the per-case outputs pooled over folds

    def __init__(self, h: HeadsConfig) -> None:
        self.h = h

    label_hint: str = ""  # what the error of a missing label column adds
    needs_train_outputs: bool = False  # whether the report needs each fold model's outputs on its training cases

    # --- labels table and cohort
    @abstractmethod
    def label_fields(self) -> list[str]:
        """The labels table's columns this task reads (one value per case)."""
        ...

    @abstractmethod
    def parse_labels(self, df: pd.DataFrame, src: str) -> pd.DataFrame:
        """``df`` with the label columns typed and checked (none empty: checked before)."""
        ...

    @abstractmethod
    def check_cases(self, cases: pd.DataFrame, src: str) -> None:
        """Raise :class:`LabelError` when the embedded cases (one row each) cannot be cross-validated."""
        ...

    @abstractmethod
    def attach_targets(self, cohort: Cohort, first_rows: pd.DataFrame) -> None:
        """Set the cohort's per-case targets from one labels row per case (in ``case_ids`` order)."""
        ...

    @abstractmethod
    def strata(self, cohort: Cohort) -> np.ndarray:
        """One value per case that folds and inner splits are stratified by."""
        ...

    @abstractmethod
    def n_outputs(self, cohort: Cohort) -> int: ...

    def fold_aux(self, cohort: Cohort, train: np.ndarray) -> dict:
        """What the loss needs from the fold's training part (class weights, bin edges)."""
        return {}

    def bags_per_step(self, n_train: int) -> int:
        return self.h.batch_bags

    def can_validate(self, cohort: Cohort, cases: np.ndarray) -> bool:
        """Whether an inner validation part of these cases can select an epoch."""
        return True

    # --- training and evaluation
    @abstractmethod
    def loss(self, logits: torch.Tensor, cohort: Cohort, idx: list[int], aux: dict) -> torch.Tensor: ...

    @abstractmethod
    def outputs(self, logits: torch.Tensor, cohort: Cohort, idx: np.ndarray) -> dict: ...

    @abstractmethod
    def metrics(self, out: dict) -> dict[str, float]:
        """The per-epoch metrics of one part of a fold; NaN where undefined on that part."""
        ...

    # --- report
    @abstractmethod
    def pooled(self, oof: dict, *, seed: int) -> dict[str, float]:
        """``pooled`` (the primary metric over every out-of-fold case) and its bootstrap CI."""
        ...

    @abstractmethod
    def run_baselines(self, cohort: Cohort, folds: list[dict], *, seed: int) -> dict[str, dict]: ...

    def report_metrics(self, cohort: Cohort, states: list, train_outputs: list[dict]) -> tuple[list[dict], dict]:
        """Metrics computed once, on the selected models: per fold, and out-of-fold."""
        return [{} for _ in states], {}

    @abstractmethod
    def prediction_row(self, cohort: Cohort, i: int, out: dict, j: int) -> dict: ...

    @abstractmethod
    def plot(
        self, cohort: Cohort, states: list, oof: dict, train_outputs: list[dict], run_dir: str
    ) -> tuple[str, dict[str, float]]:
        """The task's figure of the pooled out-of-fold outputs, and the metrics it shows."""
        ...


class Subtyping(Task):
    name, metric, default_folds = "subtyping", "auc", 10
    baselines = {
        "probe_logreg": "baseline logistic regression on mean embeddings",
        "probe_knn": "baseline KNN on mean embeddings",
    }
    output_keys = ("probs", "labels")
    label_hint = "; set heads.label_column=… for another label column"

    def label_fields(self) -> list[str]:
        return [self.h.label_column]

    def parse_labels(self, df, src):
        df[self.h.label_column] = df[self.h.label_column].map(lambda v: str(v).strip())
        return df

    def check_cases(self, cases, src):
        col = self.h.label_column
        counts = cases[col].value_counts()
        if len(counts) < 2:
            raise LabelError(
                f"labels {src}: every embedded case has {col}={counts.index[0]!r}; "
                "a classifier needs at least two classes"
            )
        check_group_sizes(counts, col, src)

    def attach_targets(self, cohort: Cohort, first_rows: pd.DataFrame) -> None:
        col = self.h.label_column
        cohort.classes = sorted(first_rows[col].unique())
        cohort.labels = np.asarray([cohort.classes.index(v) for v in first_rows[col]])

    def strata(self, cohort: Cohort) -> np.ndarray:
        return np.asarray(cohort.labels)

    def n_outputs(self, cohort: Cohort) -> int:
        return len(cohort.classes)

    def fold_aux(self, cohort: Cohort, train: np.ndarray) -> dict:
        return {"weights": class_weights(self.h, cohort, train)}

    def loss(self, logits, cohort, idx, aux):
        return F.cross_entropy(logits, torch.as_tensor(cohort.labels[idx]), weight=aux.get("weights"))

    def outputs(self, logits, cohort, idx):
        return {"probs": F.softmax(logits, dim=1).numpy(), "labels": cohort.labels[idx]}

    def metrics(self, out):
        if len(set(out["labels"])) < 2:
            return {}  # one class in this part: no AUC (the mean is over the folds that have one)
        return M.classification_metrics(out["labels"], out["probs"])

    def pooled(self, oof, *, seed):
        low, high = M.bootstrap_ci(M.auc_score, oof["labels"], oof["probs"], seed=seed)
        return {"pooled": M.auc_score(oof["labels"], oof["probs"]), "pooled_ci_low": low, "pooled_ci_high": high}

    def run_baselines(self, cohort, folds, *, seed):
        return probe_baselines(self, cohort, folds, seed=seed)

    def prediction_row(self, cohort, i, out, j):
        return {
            "label": cohort.classes[cohort.labels[i]],
            **{f"p_{c}": float(out["probs"][j, k]) for k, c in enumerate(cohort.classes)},
        }

    def plot(self, cohort, states, oof, train_outputs, run_dir):
        return roc_png(
            oof["labels"],
            oof["probs"],
            cohort.classes,
            os.path.join(run_dir, "roc.png"),
            f"{self.h.head}: out-of-fold ROC",
        ), {}


class Survival(Task):
    """Survival from (time, event): a risk per case, Harrell's c-index as the primary metric (risk
    = −Σ survival for the NLL head, as HIPT, MCAT and PORPOISE report it), and at the end Uno's
    IPCW c-index, the time-dependent AUC and the integrated Brier score, per fold and out-of-fold."""

    name, metric, default_folds = "survival", "c_index", 5
    needs_train_outputs = True  # risk-group thresholds, censoring distributions, Breslow's baseline
    baselines = {"cox": "baseline penalised Cox on mean embeddings"}
    output_keys = ("risk", "times", "events")

    def label_fields(self) -> list[str]:
        return ["survival_months", "event"]

    def parse_labels(self, df, src):
        months = as_numbers(df["survival_months"])
        bad = ~np.isfinite(months) | (months < 0)
        if bad.any():
            raise LabelError(
                f"labels {src}: column survival_months must be a number ≥ 0 (months); "
                f"{where_rows(df, bad)} hold {sorted(set(df['survival_months'][bad].astype(str)))[:5]}"
            )
        event = as_numbers(df["event"])
        bad = ~np.isin(event, (0.0, 1.0))
        if bad.any():
            raise LabelError(
                f"labels {src}: column event must be 1 (event observed) or 0 (censored); "
                f"{where_rows(df, bad)} hold {sorted(set(df['event'][bad].astype(str)))[:5]}"
            )
        df["survival_months"], df["event"] = months, event.astype(int)
        return df

    def check_cases(self, cases, src):
        counts = cases["event"].value_counts()
        if counts.get(1, 0) == 0:
            raise LabelError(
                f"labels {src}: no embedded case has event=1; survival models and the c-index need observed events"
            )
        if len(counts) > 1:  # all events: one group, folds stratify by nothing
            check_group_sizes(counts, "event", src)
        times, events = cases["survival_months"].to_numpy(), cases["event"].to_numpy()
        if not any(e and (times > t).any() for t, e in zip(times, events)):
            raise LabelError(
                f"labels {src}: no pair of cases can be ordered (every event is at the longest "
                "time); the c-index needs an event earlier than another case's time"
            )

    def attach_targets(self, cohort: Cohort, first_rows: pd.DataFrame) -> None:
        cohort.times = first_rows["survival_months"].to_numpy(dtype=float)
        cohort.events = first_rows["event"].to_numpy(dtype=int)

    def strata(self, cohort: Cohort) -> np.ndarray:
        return np.asarray(cohort.events)

    def can_validate(self, cohort: Cohort, cases: np.ndarray) -> bool:
        return bool(cohort.events[cases].any())  # no event: a Cox loss is 0 every epoch

    @abstractmethod
    def risk(self, logits: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def survival_at(self, out: dict, aux: dict, train_out: dict, times: np.ndarray) -> np.ndarray:
        """Survival probabilities ``[n, len(times)]`` of the cases in ``out``."""
        ...

    def outputs(self, logits, cohort, idx):
        return {
            "risk": self.risk(logits).numpy(),
            "times": cohort.times[idx],
            "events": cohort.events[idx],
            "logits": logits.numpy(),
        }

    def metrics(self, out):
        if not out["events"].any():
            return {}
        return {"c_index": M.harrell_c(out["times"], out["events"], out["risk"])}

    def pooled(self, oof, *, seed):
        low, high = M.bootstrap_ci(M.concordance, oof["times"], oof["events"], oof["risk"], seed=seed)
        return {
            "pooled": M.harrell_c(oof["times"], oof["events"], oof["risk"]),
            "pooled_ci_low": low,
            "pooled_ci_high": high,
        }

    def run_baselines(self, cohort, folds, *, seed):
        return cox_baseline(self, cohort, folds, seed=seed)

    def report_metrics(self, cohort, states, train_outputs):
        per_fold = []
        for f, (st, tr) in enumerate(zip(states, train_outputs)):
            out = st.last
            times = M.evaluation_times(tr["times"], tr["events"], out["times"])
            values, why = M.survival_metrics(
                tr["times"],
                tr["events"],
                out["times"],
                out["events"],
                out["risk"],
                self.survival_at(out, st.aux, tr, times),
                times,
            )
            for name, reason in why.items():
                log.warning("fold %d: %s undefined (%s)", f, name, reason)
            per_fold.append({k: v for k, v in values.items() if k != "c_index"})  # c_index: per epoch
        # Out-of-fold: the censoring distribution of the whole cohort, each case's survival
        # predicted by the fold model that never trained on it.
        oof = {k: np.concatenate([st.last[k] for st in states]) for k in self.output_keys}
        times = M.evaluation_times(cohort.times, cohort.events, oof["times"])
        surv = np.concatenate([self.survival_at(st.last, st.aux, tr, times) for st, tr in zip(states, train_outputs)])
        values, why = M.survival_metrics(
            cohort.times, cohort.events, oof["times"], oof["events"], oof["risk"], surv, times
        )
        for name, reason in why.items():
            log.warning("out-of-fold %s undefined (%s)", name, reason)
        return per_fold, {f"pooled_{k}": v for k, v in values.items() if k != "c_index"}

    def prediction_row(self, cohort, i, out, j):
        return {
            "risk": float(out["risk"][j]),
            "survival_months": float(cohort.times[i]),
            "event": int(cohort.events[i]),
        }

    def plot(self, cohort, states, oof, train_outputs, run_dir):
        """Kaplan–Meier curves of risk groups split at each fold's training-part median risk, pooled."""

        high = np.concatenate([st.last["risk"] > np.median(tr["risk"]) for st, tr in zip(states, train_outputs)])
        km = M.km_split(oof["times"], oof["events"], high.astype(float), threshold=0.5)
        return km_png(km, os.path.join(run_dir, "km.png"), f"{self.h.head}: out-of-fold risk groups"), {
            "logrank_p": km["p_value"]
        }


class CoxSurvival(Survival):
    """One output, the Cox log-risk; one optimiser step over the whole training part (risk sets);
    survival curves from Breslow's baseline hazard of the training part."""

    def n_outputs(self, cohort):
        return 1

    def bags_per_step(self, n_train):
        return n_train

    def risk(self, logits):
        return logits[:, 0]

    def loss(self, logits, cohort, idx, aux):
        return cox_loss(
            logits[:, 0], torch.as_tensor(cohort.times[idx], dtype=torch.float32), torch.as_tensor(cohort.events[idx])
        )

    def survival_at(self, out, aux, train_out, times):
        from sksurv.linear_model.coxph import BreslowEstimator

        if len(times) == 0:
            return np.ones((len(out["risk"]), 0))
        base = BreslowEstimator().fit(train_out["risk"], train_out["events"].astype(bool), train_out["times"])
        s0 = base.baseline_survival_
        # 1 before the first training time (sksurv's StepFunction gives its first value there);
        # beyond the training follow-up, its last value
        s0_t = np.where(times < s0.x[0], 1.0, s0(np.clip(times, *s0.domain)))
        return s0_t[None, :] ** np.exp(out["risk"])[:, None]


class DiscreteSurvival(Survival):
    """``heads.n_bins`` discrete-time hazards with the NLL of HIPT/PORPOISE; bin edges at the
    quantiles of each fold's training event times."""

    def n_outputs(self, cohort):
        return self.h.n_bins

    def fold_aux(self, cohort, train):
        return {"bins": survival_bins(cohort.times[train], cohort.events[train], self.h.n_bins)}

    def risk(self, logits):
        return risk_from_logits(logits)

    def loss(self, logits, cohort, idx, aux):
        bins = torch.as_tensor(np.digitize(cohort.times[idx], aux["bins"]))
        return survival_nll(logits, bins, torch.as_tensor(cohort.events[idx]), alpha=self.h.alpha_surv)

    def survival_at(self, out, aux, train_out, times):
        surv = torch.cumprod(1 - torch.sigmoid(torch.as_tensor(out["logits"])), dim=1).numpy()
        surv = np.concatenate([np.ones_like(surv[:, :1]), surv], axis=1)  # S before the first bin = 1
        return surv[:, np.digitize(times, np.asarray(aux["bins"]))]  # alive at t: survived the bins before t's


def task_for(h: HeadsConfig) -> Task:
    """The task object of ``heads.task`` (and, for survival, ``heads.survival_loss``)."""
    if h.task == "subtyping":
        return Subtyping(h)
    return {"cox": CoxSurvival, "nll": DiscreteSurvival}[h.survival_loss](h)


def class_weights(h: HeadsConfig, cohort: Cohort, train: np.ndarray) -> torch.Tensor | None:
    """Cross-entropy weights by inverse class frequency of the training part (``heads.class_weights``)."""
    if not h.class_weights:
        return None
    counts = np.bincount(cohort.labels[train], minlength=len(cohort.classes)).astype(float)
    weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)
