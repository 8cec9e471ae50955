"""Tissue detection on a low-resolution image: HSV saturation (or, on a grayscale slide,
darkness), blur, threshold, closing, hole filling and removal of small components, every size
given in physical units."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

from hipt_ray.config import TissueConfig


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image: glass is ~0, stained tissue is not."""
    rgb = rgb.astype(np.float32)
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0).astype(np.float32)


# Otsu on darkness is kept within this range: glass scans at ≥ 88 % brightness, and a cap keeps
# dark stain from being split off pale tissue.
DARKNESS_RANGE = (0.12, 0.5)


def darkness(rgb: np.ndarray) -> np.ndarray:
    """1 − luma (ITU-R 601) in [0, 1]: glass is ~0, tissue is not (for slides without colour)."""
    luma = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return (1.0 - luma / 255.0).astype(np.float32)


def is_grayscale(rgb: np.ndarray) -> bool:
    """Whether the image carries no colour: 99.9 % of its pixels have channels within 3 levels
    (a grayscale scan, or an RGB file holding one), where saturation sees no tissue at all."""
    a = rgb[..., :3].astype(np.int16)
    return float(np.quantile(a.max(axis=-1) - a.min(axis=-1), 0.999)) <= 3


def tissue_method(rgb: np.ndarray, cfg: TissueConfig) -> str:
    """The signal ``tissue_mask`` thresholds: ``saturation`` or ``luminance`` (``auto``: luminance
    for a grayscale image)."""
    if cfg.method != "auto":
        return cfg.method
    return "luminance" if is_grayscale(rgb) else "saturation"


def _px(um: float, mpp: float) -> int:
    return int(round(um / mpp))


def tissue_mask(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of ``rgb`` (taken at ``mpp`` µm/px) and the threshold used (on the
    signal :func:`tissue_method` picks)."""
    luminance = tissue_method(rgb, cfg) == "luminance"
    signal = darkness(rgb) if luminance else saturation(rgb)
    blur = _px(cfg.blur_um, mpp) | 1  # odd window
    if blur > 1:
        signal = ndimage.median_filter(signal, size=blur)
    fixed = cfg.luminance_threshold if luminance else cfg.saturation_threshold
    lo, hi = DARKNESS_RANGE if luminance else (cfg.min_saturation, cfg.max_saturation)
    if fixed is not None:
        threshold = fixed
    else:
        # Otsu splits glass from tissue, but on a blank slide it splits noise (hence the floor)
        # and on strongly stained tissue it splits dark stain from pale stain (hence the cap).
        threshold = filters.threshold_otsu(signal) if np.ptp(signal) > 0 else 1.0
        threshold = min(max(float(threshold), lo), hi)
    mask = signal > threshold
    radius = _px(cfg.closing_um / 2, mpp)
    if radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(radius), border_value=0)
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_px = int(cfg.min_area_um2 / mpp**2)
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
    return mask, float(threshold)
