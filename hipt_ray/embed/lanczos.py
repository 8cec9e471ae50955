"""Pillow's Lanczos resize of an RGB uint8 image, in torch, on the image's device: the same
pixels as ``Image.resize(size, Image.Resampling.LANCZOS)``, bit for bit.

A region whose slide's µm/px is not an integer multiple of the target's is Lanczos-resampled
from its read box (``hipt_ray.slides.reader``): most of TCGA, whose 40× slides are ≈ 0.252 µm/px
(a 4096² region at 0.5 µm/px is an ≈ 8105² box) and whose 20× slides are ≈ 0.504 µm/px (≈ 4063²).
On the CPU that is Pillow's resize, ≈ 0.69 s (40×) and 0.26 s (20×) of one core a region (Zen 5);
on the GPU decode route it would be a copy off the GPU and that resize on the model actor's own
thread, capping a GPU that embeds tens of regions a second at a few. This module runs the same
arithmetic on the GPU:

- the coefficients are Pillow's (``precompute_coeffs`` in ``libImaging/Resample.c``): for each
  output pixel, the input span ``[xmin, xmin + n)`` around its centre ``(x + 0.5) · scale``, the
  Lanczos-3 kernel stretched by ``max(scale, 1)``, normalised to sum 1 in double precision, then
  rounded to 22-bit fixed point (``PRECISION_BITS = 32 − 8 − 2``) — computed here in Python
  doubles with the C library's ``sin``, as Pillow's C computes them, and cached per size pair;
- each pass sums ``pixel · coefficient`` in int32 from ``1 << 21`` (the rounding half), shifts
  right by 22 (an arithmetic shift: negative sums floor) and clips to 0–255, horizontal pass
  first, stored as uint8 between the passes, a pass skipped when its size does not change.

Integer sums in any order are the same sums, so the pixels are Pillow's on any device, for every
square resize — and every read box the reader makes for a region or a patch is square (the tests
compare hundreds of sizes, noise and smooth, bit for bit). One difference remains, for resizes
whose width and height scale differently: the Pillow 13.0.0 wheel pinned here then sometimes
runs the vertical pass first (observed; its published C source runs the horizontal one first, as
this module does, and the rule it follows is not in that source). The order changes the
rounding between passes: on smooth images by at most 2 levels, on pure noise by more.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
SUPPORT = 3.0  # Lanczos-3


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


@lru_cache(maxsize=32)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's Lanczos pass from ``in_size`` to ``out_size`` pixels: ``(index, weight)``, each
    ``[out_size, taps]``: output pixel ``x`` is ``Σ_k in[index[x, k]] · weight[x, k]`` in 22-bit
    fixed point (unused taps: index 0, weight 0)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int32)
    ss = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int): toward zero, as int() is
        n = min(int(center + support + 0.5), in_size) - xmin
        k = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(n)]
        ww = 0.0
        for v in k:  # summed in order, as the C loop does
            ww += v
        if ww != 0.0:
            k = [v / ww for v in k]
        index[xx, :n] = np.arange(xmin, xmin + n)
        weight[xx, :n] = [int(-0.5 + v * one) if v < 0 else int(0.5 + v * one) for v in k]
    return index, weight


@lru_cache(maxsize=32)
def _on_device(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`coefficients` on ``device``, one row per tap (``[taps, out_size]``): copied there once
    per size pair, not once per region."""
    index, weight = coefficients(in_size, out_size)
    return torch.from_numpy(index.T.copy()).to(device), torch.from_numpy(weight.T.copy()).to(device)


def _pass(img: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One pass along ``dim`` (0: rows, 1: columns) of a uint8 ``[h, w, c]`` image."""
    idx, w = _on_device(img.shape[dim], out_size, img.device)
    shape = [1, 1, 1]
    shape[dim] = out_size  # the weights broadcast along the other axis and the channels
    out = list(img.shape)
    out[dim] = out_size
    acc = torch.full(out, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=img.device)
    for tap_idx, tap_w in zip(idx, w):
        acc += img.index_select(dim, tap_idx).to(torch.int32) * tap_w.view(shape)
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``img`` (uint8 ``[h, w, c]``, any device) resized to ``size`` = (w, h) as Pillow's
    ``Image.resize(size, LANCZOS)`` resizes it, on ``img``'s device."""
    w, h = size
    if img.dtype != torch.uint8 or img.dim() != 3:
        raise ValueError(f"expected a uint8 [h, w, c] image, got {img.dtype} {tuple(img.shape)}")
    if w != img.shape[1]:
        img = _pass(img, 1, w)
    if h != img.shape[0]:
        img = _pass(img, 0, h)
    return img
