"""Tissue detection on a low-resolution image: HSV saturation, blur, threshold, closing,
hole filling and removal of small components, every size given in physical units."""

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


def _px(um: float, mpp: float) -> int:
    return int(round(um / mpp))


def tissue_mask(rgb: np.ndarray, mpp: float, cfg: TissueConfig) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of ``rgb`` (taken at ``mpp`` µm/px) and the threshold used."""
    sat = saturation(rgb)
    blur = _px(cfg.blur_um, mpp) | 1  # odd window
    if blur > 1:
        sat = ndimage.median_filter(sat, size=blur)
    if cfg.saturation_threshold is not None:
        threshold = cfg.saturation_threshold
    else:
        # Otsu splits glass from tissue, but on a blank slide it splits noise (hence the floor)
        # and on strongly stained tissue it splits dark stain from pale stain (hence the cap).
        threshold = filters.threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
        threshold = min(max(float(threshold), cfg.min_saturation), cfg.max_saturation)
    mask = sat > threshold
    radius = _px(cfg.closing_um / 2, mpp)
    if radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(radius), border_value=0)
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_px = int(cfg.min_area_um2 / mpp**2)
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
    return mask, float(threshold)
