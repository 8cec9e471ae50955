"""Linear baselines on each case's mean region embedding, on the same case-level folds as the
heads: a logistic-regression and a KNN probe (subtyping; the paper's evaluation of self-supervised
features) and a penalised Cox model (survival). Every head result is reported next to them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hipt_ray.heads.cohort import Cohort
    from hipt_ray.heads.tasks import Subtyping, Survival

COX_PENALIZER = 0.1  # ridge penalty of the Cox baseline on standardised features (lifelines)


def _case_means(cohort: Cohort) -> np.ndarray:
    return np.stack([bag.mean(dim=0).numpy() for bag in cohort.bags]).astype(np.float64)


def _fit_cox(x: np.ndarray, times: np.ndarray, events: np.ndarray, penalizer: float):
    import warnings

    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceWarning

    cols = [f"f{j}" for j in range(x.shape[1])]
    df = pd.DataFrame(x, columns=cols).assign(T=times, E=events)
    with warnings.catch_warnings():  # more features than cases is the usual case here: the ridge is why
        warnings.simplefilter("ignore", ConvergenceWarning)
        return CoxPHFitter(penalizer=penalizer).fit(df, duration_col="T", event_col="E"), cols


def _indices(cohort: Cohort, fold: dict) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    return np.array([index[c] for c in fold["train"]]), np.array([index[c] for c in fold["val"]])


def _summary(task: Subtyping | Survival, per_fold: list[dict], pooled: dict[str, list], seed: int) -> dict:
    """``{"metrics": {metric: mean, metric_std: …}, "per_fold": [...], "pooled": out-of-fold metric
    over every case, "ci": (low, high)}`` (means over the folds where a metric is defined)."""
    metrics = {}
    for key in sorted({k for m in per_fold for k in m}):
        vals = [m[key] for m in per_fold if key in m and np.isfinite(m[key])]
        metrics[key] = float(np.mean(vals)) if vals else float("nan")
        metrics[f"{key}_std"] = float(np.std(vals)) if vals else float("nan")
    p = task.pooled({key: np.concatenate(v) for key, v in pooled.items()}, seed=seed)
    return {
        "metrics": metrics,
        "per_fold": per_fold,
        "pooled": p["pooled"],
        "ci": (p["pooled_ci_low"], p["pooled_ci_high"]),
    }


def probe_baselines(
    task: Subtyping, cohort: Cohort, folds: list[dict], *, k: int = 20, seed: int = 0
) -> dict[str, dict]:
    """A logistic-regression and a KNN probe (``probe_logreg``, ``probe_knn``) per fold, scored as
    ``task`` scores a head, each summarised as :func:`_summary` says."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _case_means(cohort), cohort.labels
    per_fold: dict[str, list[dict]] = {"probe_logreg": [], "probe_knn": []}
    pooled: dict[str, dict[str, list]] = {n: {} for n in per_fold}
    for fold in folds:
        tr, va = _indices(cohort, fold)
        models = {
            "probe_logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
            "probe_knn": KNeighborsClassifier(n_neighbors=min(k, len(tr))),
        }
        for name, model in models.items():
            model.fit(x[tr], y[tr])
            probs = np.zeros((len(va), len(cohort.classes)))
            probs[:, model.classes_] = model.predict_proba(x[va])
            per_fold[name].append(task.metrics({"probs": probs, "labels": y[va]}))
            pooled[name].setdefault("probs", []).append(probs)
            pooled[name].setdefault("labels", []).append(y[va])
    return {name: _summary(task, per_fold[name], pooled[name], seed) for name in per_fold}


def cox_baseline(task: Survival, cohort: Cohort, folds: list[dict], *, seed: int = 0) -> dict[str, dict]:
    """A penalised Cox model (``cox``) per fold, scored as ``task`` scores a head's risk,
    summarised as :func:`_summary` says."""
    import pandas as pd
    from sklearn.preprocessing import StandardScaler

    x = _case_means(cohort)
    per_fold, pooled = [], {}
    for fold in folds:
        tr, va = _indices(cohort, fold)
        scaler = StandardScaler().fit(x[tr])
        model, cols = _fit_cox(scaler.transform(x[tr]), cohort.times[tr], cohort.events[tr], COX_PENALIZER)
        risk = np.asarray(model.predict_log_partial_hazard(pd.DataFrame(scaler.transform(x[va]), columns=cols)))
        out = {"risk": risk, "times": cohort.times[va], "events": cohort.events[va]}
        per_fold.append(task.metrics(out))
        for key, value in out.items():
            pooled.setdefault(key, []).append(value)
    return {"cox": _summary(task, per_fold, pooled, seed)}
