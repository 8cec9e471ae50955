"""Region and patch grids.

Regions are ``region_px`` pixels at the target MPP, placed every ``stride_px`` from the slide's
top-left corner. A region that crosses the slide edge (or a slide smaller than one region) is
read up to the edge and padded with white to the next multiple of ``patch_px``; ``valid_w/h``
record how much of it is slide and ``read_w/h`` what the model sees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from hipt_ray.config import TilingConfig


@dataclass(frozen=True)
class Region:
    index: int
    x: int  # level-0 pixels, top-left corner
    y: int
    level0_w: int  # level-0 pixels covered by the read (read_w at the target MPP)
    level0_h: int
    read_w: int  # pixels at the target MPP, multiples of patch_px, at most region_px
    read_h: int
    valid_w: int  # of which slide content; the rest is white padding
    valid_h: int
    tissue_fraction: float  # tissue share of the valid area

    def to_row(self) -> dict:
        return asdict(self)


def _count(extent: float, region_px: int, stride_px: int) -> int:
    return 1 + max(0, math.ceil((extent - region_px) / stride_px))


def _starts(extent: float, region_px: int, stride_px: int) -> list[int]:
    return [i * stride_px for i in range(_count(extent, region_px, stride_px))]


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def planned_regions(dimensions: tuple[int, int], slide_mpp: float, tiling: TilingConfig) -> int:
    """How many grid cells (before the tissue test) ``region_grid`` would visit: computed without
    building them, to refuse absurd settings before they cost memory."""
    scale = tiling.mpp / slide_mpp
    nx, ny = (_count(side / scale, tiling.region_px, tiling.stride_px) for side in dimensions)
    return nx * ny


def region_grid(
    dimensions: tuple[int, int],
    slide_mpp: float,
    tiling: TilingConfig,
    mask: np.ndarray | None = None,
    mask_mpp: float | None = None,
) -> list[Region]:
    """Regions whose tissue fraction reaches ``tiling.min_tissue_fraction`` (all, without a mask),
    in row-major order over the grid.
    """
    w0, h0 = dimensions
    scale = tiling.mpp / slide_mpp  # level-0 px per target px
    width, height = w0 / scale, h0 / scale  # slide size at the target MPP
    regions: list[Region] = []
    for yt in _starts(height, tiling.region_px, tiling.stride_px):
        for xt in _starts(width, tiling.region_px, tiling.stride_px):
            valid_w = min(tiling.region_px, int(math.floor(width - xt)))
            valid_h = min(tiling.region_px, int(math.floor(height - yt)))
            if valid_w <= 0 or valid_h <= 0:
                continue
            frac = 1.0
            if mask is not None and mask_mpp is not None:
                k = tiling.mpp / mask_mpp  # mask px per target px
                r0, c0 = int(yt * k), int(xt * k)
                r1, c1 = max(r0 + 1, int(round((yt + valid_h) * k))), max(c0 + 1, int(round((xt + valid_w) * k)))
                window = mask[r0:r1, c0:c1]
                frac = float(window.mean()) if window.size else 0.0
            if frac < tiling.min_tissue_fraction or (mask is not None and frac == 0.0):
                continue
            read_w = min(tiling.region_px, _round_up(valid_w, tiling.patch_px))
            read_h = min(tiling.region_px, _round_up(valid_h, tiling.patch_px))
            regions.append(
                Region(
                    index=len(regions),
                    x=int(round(xt * scale)),
                    y=int(round(yt * scale)),
                    level0_w=int(round(read_w * scale)),
                    level0_h=int(round(read_h * scale)),
                    read_w=read_w,
                    read_h=read_h,
                    valid_w=valid_w,
                    valid_h=valid_h,
                    tissue_fraction=round(frac, 4),
                )
            )
    return regions


def region_to_patches(region: np.ndarray, patch_px: int) -> np.ndarray:
    """``[H, W, 3]`` → ``[N, 3, p, p]`` with N = (H/p)·(W/p) in row-major order:
    patch k is grid row ``k // (W/p)``, column ``k % (W/p)``."""
    h, w, c = region.shape
    rows, cols = h // patch_px, w // patch_px
    if rows * patch_px != h or cols * patch_px != w:
        raise ValueError(f"region {w}×{h} is not a multiple of patch_px={patch_px}")
    grid = region.reshape(rows, patch_px, cols, patch_px, c)  # (R, p, C, p, 3)
    return grid.transpose(0, 2, 4, 1, 3).reshape(rows * cols, c, patch_px, patch_px)


def patch_tissue_fractions(
    region: Region, mask: np.ndarray, mask_mpp: float, tiling: TilingConfig, slide_mpp: float
) -> np.ndarray:
    """Tissue fraction of each patch of ``region`` (row-major, length rows·cols); padding counts
    as no tissue."""
    rows, cols = region.read_h // tiling.patch_px, region.read_w // tiling.patch_px
    k = tiling.mpp / mask_mpp
    x_t, y_t = region.x * slide_mpp / tiling.mpp, region.y * slide_mpp / tiling.mpp
    out = np.zeros(rows * cols, dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * tiling.patch_px, c * tiling.patch_px
            vh = min(tiling.patch_px, region.valid_h - y0)
            vw = min(tiling.patch_px, region.valid_w - x0)
            if vh <= 0 or vw <= 0:
                continue
            r0, c0 = int((y_t + y0) * k), int((x_t + x0) * k)
            window = mask[
                r0 : max(r0 + 1, int(round((y_t + y0 + vh) * k))), c0 : max(c0 + 1, int(round((x_t + x0 + vw) * k)))
            ]
            if window.size:
                out[r * cols + c] = window.mean() * (vh * vw) / tiling.patch_px**2
    return out
