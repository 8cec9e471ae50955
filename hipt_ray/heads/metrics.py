"""Metrics: AUC and balanced accuracy, concordance (lifelines), Kaplan–Meier risk groups."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (binary, or macro one-vs-rest) and balanced accuracy from class probabilities [N, C]."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    labels, probs = np.asarray(labels), np.asarray(probs)
    if probs.shape[1] == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
    return {"auc": float(auc), "balanced_accuracy": float(balanced_accuracy_score(labels, probs.argmax(1)))}


def concordance(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index; lifelines expects higher scores for longer survival, hence −risk."""
    from lifelines.utils import concordance_index

    return float(concordance_index(np.asarray(times), -np.asarray(risk), np.asarray(events)))


def km_split(times: np.ndarray, events: np.ndarray, risk: np.ndarray, threshold: float) -> dict:
    """High- vs low-risk groups at ``threshold`` (the training fold's median risk): Kaplan–Meier
    fits of both groups and the log-rank p-value."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    times, events, risk = map(np.asarray, (times, events, risk))
    high = risk > threshold
    out = {"n_high": int(high.sum()), "n_low": int((~high).sum()), "p_value": float("nan")}
    if high.any() and (~high).any():
        out["p_value"] = float(logrank_test(times[high], times[~high], events[high], events[~high]).p_value)
    for name, mask in (("high", high), ("low", ~high)):
        if mask.any():
            out[f"km_{name}"] = KaplanMeierFitter().fit(times[mask], events[mask], label=f"{name} risk")
    return out


def bootstrap_ci(metric, *arrays: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(*arrays)`` over cases resampled with replacement
    (resamples the metric cannot score — one class, no events — are skipped)."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(a) for a in arrays]
    m = len(arrays[0])
    values = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        try:
            v = metric(*(a[idx] for a in arrays))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def pooled_metric(task: str, outputs: dict) -> float:
    """The out-of-fold metric over every case pooled (AUC, or Harrell's c-index)."""
    if task == "subtyping":
        return classification_metrics(outputs["labels"], outputs["probs"])["auc"]
    return concordance(outputs["times"], outputs["events"], outputs["risk"])


def pooled_ci(task: str, outputs: dict, *, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % CI of ``pooled_metric`` over cases."""
    if task == "subtyping":
        return bootstrap_ci(lambda y, p: classification_metrics(y, p)["auc"], outputs["labels"], outputs["probs"],
                            n=n, seed=seed)
    return bootstrap_ci(lambda t, e, r: concordance(t, e, r) if e.any() else float("nan"),
                        outputs["times"], outputs["events"], outputs["risk"], n=n, seed=seed)
