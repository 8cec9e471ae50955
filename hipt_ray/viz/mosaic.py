"""Region thumbnails and the mosaic ``hipt-ray search`` draws (the query first, framed red); the
search itself is :mod:`hipt_ray.explain.search`."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def region_thumbnail(slide, row: dict, px: int) -> np.ndarray:
    """A region read at ``px`` pixels across its longer side (edge regions, which are shorter
    than a full region, keep their scale; the rest of the square is what lies beyond)."""
    mpp = row["mpp"] * max(row["read_w"], row["read_h"]) / px
    image, _ = slide.read_region((int(row["x"]), int(row["y"])), (px, px), mpp)
    return image


def mosaic_png(tiles: list[tuple[np.ndarray, str, bool]], path: str, *, columns: int = 6, title: str = "") -> str:
    """Tiles ``(image, caption, highlight)`` in a grid with captions under each."""
    px = tiles[0][0].shape[0]
    cols = min(columns, len(tiles))
    rows = int(np.ceil(len(tiles) / cols))
    cap, head = 30, 22 if title else 0
    page = Image.new("RGB", (cols * (px + 8) + 8, head + rows * (px + cap + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((8, 5), title, fill=(0, 0, 0))
    for i, (image, caption, highlight) in enumerate(tiles):
        x0 = 8 + (i % cols) * (px + 8)
        y0 = head + 8 + (i // cols) * (px + cap + 8)
        page.paste(Image.fromarray(image), (x0, y0))
        if highlight:
            draw.rectangle([x0 - 3, y0 - 3, x0 + px + 2, y0 + px + 2], outline=(220, 0, 0), width=3)
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((x0, y0 + px + 3 + 12 * j), line, fill=(0, 0, 0))
    page.save(path)
    return path
