"""Linear baselines on each case's mean region embedding, on the same case-level folds as the
heads: a logistic-regression and a KNN probe (subtyping; the paper's evaluation of self-supervised
features) and a penalised Cox model (survival). Every head result is reported next to them."""

from __future__ import annotations

import numpy as np

from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.metrics import classification_metrics, concordance, pooled_ci, pooled_metric

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


def baselines(task: str, cohort: Cohort, folds: list[dict], *, k: int = 20, seed: int = 0) -> dict[str, dict]:
    """Per baseline: ``{"metrics": {metric: mean, metric_std: …}, "per_fold": [...], "pooled":
    out-of-fold metric over every case, "ci": (low, high)}``; names ``probe_logreg``,
    ``probe_knn`` (subtyping) or ``cox`` (survival)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _case_means(cohort)
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    names = ["probe_logreg", "probe_knn"] if task == "subtyping" else ["cox"]
    per_fold: dict[str, list[dict]] = {n: [] for n in names}
    pooled: dict[str, dict[str, list]] = {n: {} for n in names}
    for fold in folds:
        tr = np.array([index[c] for c in fold["train"]])
        va = np.array([index[c] for c in fold["val"]])
        if task == "subtyping":
            y = cohort.labels
            models = {"probe_logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
                      "probe_knn": KNeighborsClassifier(n_neighbors=min(k, len(tr)))}
            for name, model in models.items():
                model.fit(x[tr], y[tr])
                probs = np.zeros((len(va), len(cohort.classes)))
                probs[:, model.classes_] = model.predict_proba(x[va])
                per_fold[name].append(classification_metrics(y[va], probs) if len(set(y[va])) > 1 else {})
                pooled[name].setdefault("probs", []).append(probs)
                pooled[name].setdefault("labels", []).append(y[va])
        else:
            scaler = StandardScaler().fit(x[tr])
            model, cols = _fit_cox(scaler.transform(x[tr]), cohort.times[tr], cohort.events[tr], COX_PENALIZER)
            import pandas as pd

            risk = np.asarray(model.predict_log_partial_hazard(pd.DataFrame(scaler.transform(x[va]), columns=cols)))
            per_fold["cox"].append({"c_index": concordance(cohort.times[va], cohort.events[va], risk)}
                                   if cohort.events[va].any() else {})
            for key, value in (("risk", risk), ("times", cohort.times[va]), ("events", cohort.events[va])):
                pooled["cox"].setdefault(key, []).append(value)
    out = {}
    for name in names:
        metrics = {}
        for key in sorted({k for m in per_fold[name] for k in m}):
            vals = [m[key] for m in per_fold[name] if key in m]
            metrics[key], metrics[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals))
        outputs = {key: np.concatenate(v) for key, v in pooled[name].items()}
        out[name] = {"metrics": metrics, "per_fold": per_fold[name], "pooled": pooled_metric(task, outputs),
                     "ci": pooled_ci(task, outputs, seed=seed)}
    return out
