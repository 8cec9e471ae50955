"""Region attention heatmaps of HIPT-4K: ViT-256 CLS attention inside every 256 px patch (at the
16 px token resolution; a patch encoder's own last-block attention at its token resolution),
ViT-4K CLS attention over the patch grid, and their hierarchical combination, smoothed by
averaging over shifted windows.

Shifted windows, done correctly: the region is read with a margin from the slide, and each window
is a *different* crop of that canvas (offset by a fraction of a patch), so the patch and token
boundaries fall in different places; each window's maps are placed back at the window's position
and every 16 px cell is averaged over the windows that cover it. (The published HIPT notebook code
re-encodes the unshifted region at every offset, which only blurs the block boundaries.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hipt_ray.models.hipt4k import HIPT4K


@dataclass
class RegionAttention:
    """Last-block CLS attention of a region, at the ViT-256 token resolution (16 px cells).

    ``vit256``: ``[heads256, H/16, W/16]``: within each 256 px patch, the attention of that
    patch's CLS token over its 16×16 tokens, renormalised to sum to 1 per head and patch (the CLS
    self-attention share left out). ``vit4k``: ``[heads4k, H/256, W/256]``: the region CLS
    attention over the patch grid, renormalised to sum to 1 per head.
    """

    vit256: np.ndarray
    vit4k: np.ndarray
    token_px: int = 16
    patch_px: int = 256

    def vit4k_cells(self) -> np.ndarray:
        """``vit4k`` repeated onto the 16 px cells of ``vit256``."""
        k = self.patch_px // self.token_px
        return self.vit4k.repeat(k, axis=1).repeat(k, axis=2)

    def hierarchical(self) -> np.ndarray:
        """Per 16 px cell: (mean ViT-4K attention of its patch) × (mean ViT-256 attention of the
        cell), normalised to sum to 1 over the region."""
        combined = self.vit4k_cells().mean(0) * self.vit256.mean(0)
        return combined / combined.sum()


def cell_px(model: HIPT4K) -> int:
    """Region pixels per attention cell: one patch token's share of a cut patch (16 px for HIPT,
    14 px for a patch-14 encoder fed its native 224 px); where tokens do not tile the cut patch in
    whole pixels (256 px resized to 224 at patch 16), 16 px cells the token maps are resampled to."""
    p, k = model.patch_px, model.tokens_per_side
    return p // k if p % k == 0 else 16


def region_attention(model: HIPT4K, image: np.ndarray) -> RegionAttention:
    """Attention maps of one region ``image`` (uint8 ``[H, W, 3]``, multiples of the patch size).
    The patch level's map is its CLS attention over the patch tokens (registers left out)."""
    p, t, k_in = model.patch_px, cell_px(model), model.tokens_per_side
    h, w = image.shape[:2]
    rows, cols, k = h // p, w // p, p // t
    x = model.normalize_uint8(torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0))
    with torch.no_grad():
        a256, a4k = model.get_attention(x.to(next(model.parameters()).device))
    cls256 = a256[:, :, 0, model.prefix_tokens :].float()  # (rows·cols, heads, k_in·k_in)
    heads = cls256.shape[1]
    if k != k_in:  # tokens that straddle cells: their map resampled onto the cells
        grid = cls256.reshape(rows * cols, heads, k_in, k_in)
        cls256 = F.interpolate(grid, size=(k, k), mode="bilinear", align_corners=False).flatten(2)
    cls256 = cls256 / cls256.sum(-1, keepdim=True)
    m256 = cls256.reshape(rows, cols, heads, k, k).permute(2, 0, 3, 1, 4).reshape(heads, rows * k, cols * k)
    cls4k = a4k[0, :, 0, 1:].float()
    cls4k = cls4k / cls4k.sum(-1, keepdim=True)
    m4k = cls4k.reshape(-1, rows, cols)
    return RegionAttention(m256.cpu().numpy(), m4k.cpu().numpy(), token_px=t, patch_px=p)


def window_offsets(patch_px: int, shifts: int, token_px: int = 16) -> list[int]:
    """``shifts`` offsets per axis, evenly spaced within one patch, on the token grid."""
    step = max(token_px, (patch_px // max(shifts, 1)) // token_px * token_px)
    return [i * step for i in range(max(shifts, 1)) if i * step < patch_px]


def smoothed_attention(
    model: HIPT4K, canvas: np.ndarray, size: tuple[int, int], margin: int, offsets: list[int]
) -> tuple[RegionAttention, int]:
    """Average the attention of shifted windows over a region.

    ``canvas`` is the region with ``margin`` extra pixels above and to the left (uint8
    ``[margin + H, margin + W, 3]``); the window at offset ``(dy, dx)`` is the canvas crop
    starting at ``(dy, dx)``, i.e. the region moved up-left by ``margin - d``. Returns the
    averaged maps in region coordinates and the number of windows.
    """
    h, w = size
    t = cell_px(model)
    cells = ((margin + h) // t, (margin + w) // t)
    acc = {name: None for name in ("vit256", "vit4k")}
    count = np.zeros(cells, np.float32)
    n = 0
    for dy in offsets:
        for dx in offsets:
            att = region_attention(model, canvas[dy : dy + h, dx : dx + w])
            cy, cx = dy // t, dx // t
            for name, m in (("vit256", att.vit256), ("vit4k", att.vit4k_cells())):
                if acc[name] is None:
                    acc[name] = np.zeros((m.shape[0],) + cells, np.float32)
                acc[name][:, cy : cy + m.shape[1], cx : cx + m.shape[2]] += m
            count[cy : cy + h // t, cx : cx + w // t] += 1
            n += 1
    m0 = margin // t
    crop = (slice(None), slice(m0, m0 + h // t), slice(m0, m0 + w // t))
    cnt = count[crop[1:]]
    v256 = acc["vit256"][crop] / cnt
    v4k_cells = acc["vit4k"][crop] / cnt
    # Keep the 4K maps at cell resolution (smoothing makes them finer than the patch grid).
    out = RegionAttention(v256, v4k_cells, token_px=t, patch_px=t)
    return out, n


def percentile_map(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Values → their percentile rank in [0, 1] (the HIPT figures' colour scale); ties share
    their mean rank, so a constant map is 0.5 everywhere. With ``mask`` (True where the value
    counts, e.g. slide content rather than edge padding) the ranks are over the masked values
    only and the rest is NaN."""
    from scipy.stats import rankdata

    values = np.asarray(values, np.float64)
    keep = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool)
    out = np.full(values.shape, np.nan)
    flat = values[keep]
    if flat.size < 2:
        out[keep] = 0.5
        return out
    out[keep] = (rankdata(flat, method="average") - 1) / (flat.size - 1)
    return out


def upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[h, w]`` map → ``size`` (rows, cols), bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
