"""Drawing attention: maps blended over region pixels, the region figures (ViT-256 heads, ViT-4K
heads, hierarchical) and a slide thumbnail coloured by a slide-level head's attention. The stage
that computes what is drawn is :mod:`hipt_ray.explain.heatmap`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CMAP = "jet"


PADDING_RGB = np.array([150.0, 150.0, 150.0])  # edge padding (no slide content): flat grey


def blend(image: np.ndarray, values: np.ndarray, *, alpha: float = 0.5, cmap: str = CMAP) -> np.ndarray:
    """``values`` in [0, 1] (same height/width as ``image``) coloured and blended over ``image``;
    NaN values (padding beyond the slide edge) are drawn flat grey, never coloured."""
    colours = plt.get_cmap(cmap)(np.clip(np.nan_to_num(values), 0, 1))[..., :3] * 255.0
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    out[np.isnan(values)] = PADDING_RGB
    return out.round().astype(np.uint8)


def renormalised_over_content(maps: np.ndarray, valid_w: int, valid_h: int, size: int) -> np.ndarray:
    """Per-head attention ``[heads, rows, cols]`` over the cells with slide content only,
    summing to 1 there (0 on padding)."""
    cells = np.outer(content_cells(maps.shape[1], valid_h, size), content_cells(maps.shape[2], valid_w, size))
    kept = np.where(cells, maps, 0.0)
    return kept / np.maximum(kept.sum(axis=(1, 2), keepdims=True), 1e-12)


def content_cells(n: int, extent: float, size: int) -> np.ndarray:
    """Which of ``n`` equal cells across ``size`` region pixels start inside the first ``extent``."""
    return np.arange(n) * (size / n) < extent


def region_figure(
    image: np.ndarray, panels: list[tuple[str, np.ndarray]], path: str, title: str, ncols: int = 4
) -> str:
    """The region and one blended panel per map (percentile colour scale), with a colour bar."""
    n = len(panels) + 1
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 0.8, 3.4 * nrows), dpi=110, squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set_title("region", fontsize=9)
    for ax, (name, values) in zip(axes[1:], panels):
        ax.imshow(blend(image, values))
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap=CMAP, norm=matplotlib.colors.Normalize(0, 100))
    fig.colorbar(sm, ax=list(axes[:n]), fraction=0.02, pad=0.01, label="attention percentile within the region")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return path


def slide_attention_png(
    thumb: np.ndarray,
    values: np.ndarray,
    path: str,
    *,
    title: str,
    top_box: tuple[float, float, float, float] | None = None,
) -> str:
    """A slide thumbnail with ``values`` (percentiles in [0, 1], NaN where no region lies)
    blended over it, the top region ``(x, y, w, h)`` in thumbnail pixels dashed, a colour bar."""
    shown = np.where(np.isnan(values)[..., None], thumb, blend(thumb, np.nan_to_num(values), alpha=0.45))
    fig, ax = plt.subplots(figsize=(7, 7 * thumb.shape[0] / thumb.shape[1] + 0.6), dpi=120)
    ax.imshow(shown)
    ax.set_xticks([])
    ax.set_yticks([])
    if top_box is not None:
        ax.add_patch(plt.Rectangle(top_box[:2], *top_box[2:], fill=False, ec="white", lw=2, ls="--"))
    sm = plt.cm.ScalarMappable(cmap=CMAP, norm=matplotlib.colors.Normalize(0, 100))
    fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.01, label="attention percentile within the case")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
