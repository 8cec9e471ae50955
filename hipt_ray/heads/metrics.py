"""Metrics: AUC and balanced accuracy; survival metrics as the field reports them (scikit-survival:
Harrell's and Uno's c-index, time-dependent AUC, integrated Brier score); Kaplan–Meier risk groups."""

from __future__ import annotations

import numpy as np


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the cases where ``positive`` is true: the Mann–Whitney statistic
    on average ranks (ties count half), equal to scikit-learn's ``roc_auc_score`` without its input
    checks, which cost ≈ 10 ms a call: a bootstrap CI calls it a thousand times."""
    from scipy.stats import rankdata

    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is not defined when only one class is present")
    if not np.isfinite(score).all():
        raise ValueError("AUC of scores that are not finite (NaN or infinity)")
    return float((rankdata(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUC from class probabilities [N, C]: binary, or the macro mean of one-vs-rest AUCs (every
    class must be present, as scikit-learn requires)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (binary, or macro one-vs-rest) and balanced accuracy (the mean recall of the classes
    present) from class probabilities [N, C]."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    predicted = probs.argmax(1)
    recall = [float((predicted[labels == c] == c).mean()) for c in np.unique(labels)]
    return {"auc": auc_score(labels, probs), "balanced_accuracy": float(np.mean(recall))}


def concordance(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of ``risk`` (higher = earlier event), scikit-survival's
    ``concordance_index_censored`` as HIPT, MCAT and PORPOISE report it.

    Raises:
        ValueError: no event, or no comparable pair (an event earlier than another case's time).
    """
    from sksurv.metrics import concordance_index_censored

    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 when every pair is tied: raised below
        c = float(
            concordance_index_censored(
                np.asarray(events).astype(bool), np.asarray(times, np.float64), np.asarray(risk, np.float64)
            )[0]
        )
    if not np.isfinite(c):
        raise ValueError("no comparable pair of cases")
    return c


def harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> float:
    """:func:`concordance`, NaN where it is undefined (a small fold may hold no comparable pair)."""
    return survival_metrics(times, events, times, events, risk, None, np.empty(0))[0]["c_index"]


# Evaluation times of the time-dependent metrics: these quantiles of the training event times,
# kept where the test part has follow-up (time-dependent AUC and IPCW need t inside both ranges).
TIME_QUANTILES = np.linspace(0.1, 0.9, 9)


def evaluation_times(train_times: np.ndarray, train_events: np.ndarray, test_times: np.ndarray) -> np.ndarray:
    """Quantiles of the training event times that lie inside the test part's follow-up
    ``[min, max)`` and before the training part's last time (possibly none)."""
    observed = np.asarray(train_times, np.float64)[np.asarray(train_events).astype(bool)]
    if observed.size == 0 or len(test_times) == 0:
        return np.empty(0)
    t = np.unique(np.quantile(observed, TIME_QUANTILES))
    return t[(t >= np.min(test_times)) & (t < np.max(test_times)) & (t < np.max(train_times))]


def survival_metrics(
    train_times: np.ndarray,
    train_events: np.ndarray,
    times: np.ndarray,
    events: np.ndarray,
    risk: np.ndarray,
    survival: np.ndarray | None,
    eval_times: np.ndarray,
) -> tuple[dict[str, float], dict[str, str]]:
    """``c_index`` (Harrell), ``c_index_ipcw`` (Uno, truncated at the last evaluation time),
    ``td_auc`` (cumulative/dynamic AUC, its mean over ``eval_times``) and ``ibs`` (integrated Brier
    score of ``survival`` ``[n, len(eval_times)]``), all by scikit-survival; the training part
    gives the censoring distribution. A metric that cannot be computed on these cases is NaN, and
    the second dict says why."""
    from sksurv.metrics import (
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )
    from sksurv.util import Surv

    train = Surv.from_arrays(np.asarray(train_events).astype(bool), np.asarray(train_times, np.float64))
    test = Surv.from_arrays(np.asarray(events).astype(bool), np.asarray(times, np.float64))
    risk = np.asarray(risk, np.float64)
    no_times = "no evaluation time inside both the training and the test follow-up"

    def td_auc() -> float:
        if len(eval_times) < 1:
            raise ValueError(no_times)
        return cumulative_dynamic_auc(train, test, risk, eval_times)[1]

    def ibs() -> float:
        if len(eval_times) < 2:
            raise ValueError("fewer than 2 evaluation times inside both the training and the test follow-up")
        return integrated_brier_score(train, test, survival, eval_times)

    steps = {"c_index": lambda: concordance(times, events, risk)}
    if survival is not None:
        tau = float(eval_times[-1]) if len(eval_times) else None
        steps.update(c_index_ipcw=lambda: concordance_index_ipcw(train, test, risk, tau=tau)[0], td_auc=td_auc, ibs=ibs)
    values, why = {}, {}
    for name, step in steps.items():
        try:
            with np.errstate(invalid="ignore", divide="ignore"):
                values[name] = float(step())
        except (ValueError, ZeroDivisionError) as exc:
            values[name], why[name] = float("nan"), str(exc).rstrip(".")
        if name not in why and not np.isfinite(values[name]):
            why[name] = "no case with an event before an evaluation time, or no case still at risk after it"
    return values, why


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
