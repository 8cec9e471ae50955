"""Losses for slide-level heads: discrete-time survival NLL and Cox partial likelihood
(cross-entropy is torch's own)."""

from __future__ import annotations

import numpy as np
import torch

from hipt_ray.config import InputError


def survival_bins(times: np.ndarray, events: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Inner bin edges at the quantiles of the *uncensored* times (of the training part)."""
    observed = np.asarray(times)[np.asarray(events).astype(bool)]
    if observed.size == 0:
        raise InputError("no uncensored survival times to place the bins")
    return np.quantile(observed, np.linspace(0, 1, n_bins + 1)[1:-1])


def survival_nll(
    logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, *, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood.

    ``hazards = sigmoid(logits)`` ``[B, K]``, ``S = cumprod(1 − hazards)``; ``bins`` is each case's
    time bin, ``events`` 1 when the event was observed. An observed event in bin k contributes
    −log S(k−1) − log h(k); a censored case −log S(k). ``alpha`` adds weight to the uncensored
    term: ``(1 − α)·total + α·uncensored``.
    """
    hazards = torch.sigmoid(logits)
    surv = torch.cumprod(1 - hazards, dim=1)
    surv_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # S(−1) = 1
    y = bins.long().view(-1, 1)
    c = (1 - events.float()).view(-1, 1)  # censored
    uncensored = -(1 - c) * (
        torch.log(surv_pad.gather(1, y).clamp_min(eps)) + torch.log(hazards.gather(1, y).clamp_min(eps))
    )
    censored = -c * torch.log(surv_pad.gather(1, y + 1).clamp_min(eps))
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def risk_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Risk = −Σ_k S(k): higher means earlier expected event."""
    return -torch.cumprod(1 - torch.sigmoid(logits), dim=1).sum(dim=1)


def cox_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow, no tie correction), mean over events."""
    order = torch.argsort(times, descending=True)
    risk, events = risk[order].view(-1), events[order].float().view(-1)
    log_risk_set = torch.logcumsumexp(risk, dim=0)  # log Σ_{j: t_j ≥ t_i} exp(r_j)
    n_events = events.sum().clamp_min(1.0)
    return -((risk - log_risk_set) * events).sum() / n_events
