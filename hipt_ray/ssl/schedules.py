"""Per-step schedules (``value = schedule[step]``) and the EMA teacher update."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def cosine_schedule(
    base: float, final: float, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """The published DINO/HIPT ``cosine_scheduler``, one value per step (``epochs ·
    steps_per_epoch`` in all): a linear warm-up from ``warmup_start`` to ``base`` that includes
    ``base`` as its last step, then ``final + ½(base − final)(1 + cos(π i / n))`` for ``i`` in
    ``0 … n−1``, so the last value approaches ``final`` without reaching it."""
    total = epochs * steps_per_epoch
    warmup = min(total, int(round(warmup_epochs * steps_per_epoch)))
    ramp = np.linspace(warmup_start, base, warmup)
    n = total - warmup
    steps = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(n, 1)))
    return np.concatenate([ramp, cos])


def teacher_temperature_schedule(
    warmup_temp: float, temp: float, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0
) -> np.ndarray:
    """Teacher temperature per step: linear from ``warmup_temp`` to ``temp``, then constant."""
    total = epochs * steps_per_epoch
    warmup = min(total, int(round(warmup_epochs * steps_per_epoch)))
    return np.concatenate([np.linspace(warmup_temp, temp, warmup), np.full(total - warmup, temp)])


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, parameter by parameter."""
    for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
        pt.mul_(momentum).add_(ps.detach().to(pt.dtype), alpha=1 - momentum)
