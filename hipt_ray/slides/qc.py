"""QC thumbnails: the slide with its tissue contour and kept regions drawn on it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from hipt_ray.slides.grid import Region

TISSUE_RGB = (0, 200, 0)
REGION_RGB = (20, 60, 255)
PAD_RGB = (255, 140, 0)


def qc_thumbnail(
    rgb: np.ndarray,
    rgb_mpp: float,
    mask: np.ndarray,
    regions: list[Region],
    slide_mpp: float,
    *,
    max_px: int = 1024,
    title: str = "",
) -> bytes:
    """PNG bytes: ``rgb`` (at ``rgb_mpp``) scaled to at most ``max_px``, tissue contour in green,
    kept regions in blue (padding beyond the slide edge hatched orange)."""
    img = Image.fromarray(rgb)
    scale = min(1.0, max_px / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS).convert("RGB")
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    m = np.asarray(mask_img) > 0
    edge = m & ~ndimage.binary_erosion(m, iterations=2)
    px = np.asarray(img).copy()
    px[edge] = TISSUE_RGB
    img = Image.fromarray(px)
    draw = ImageDraw.Draw(img)
    k = slide_mpp / rgb_mpp * scale  # thumbnail px per level-0 px
    for r in regions:
        x0, y0 = r.x * k, r.y * k
        x1, y1 = (r.x + r.level0_w) * k, (r.y + r.level0_h) * k
        vx1 = x0 + (x1 - x0) * r.valid_w / r.read_w
        vy1 = y0 + (y1 - y0) * r.valid_h / r.read_h
        if vx1 < x1 - 1 or vy1 < y1 - 1:
            draw.rectangle([x0, y0, x1, y1], outline=PAD_RGB, width=1)
        draw.rectangle([x0, y0, vx1, vy1], outline=REGION_RGB, width=2)
        draw.text((x0 + 3, y0 + 2), str(r.index), fill=REGION_RGB)
    if title:
        draw.rectangle([0, 0, img.width, 14], fill=(255, 255, 255))
        draw.text((3, 1), title, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
