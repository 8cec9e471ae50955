"""One QC page per tiling run: every slide's QC thumbnail (tissue contour, kept regions) in a
grid, with its status, region count and, for failed or tissue-less slides, the reason."""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from hipt_ray.storage import filesystem, join

CELL = 320  # px per slide cell (thumbnail area)
CAPTION = 58
STATUS_RGB = {"ok": (30, 140, 30), "no_tissue": (200, 120, 0), "failed": (200, 30, 30)}


def _thumb(uri: str, endpoint_url: str | None) -> Image.Image | None:
    if not uri:
        return None
    try:
        fs, path = filesystem(uri, endpoint_url)
        with fs.open(path, "rb") as fh:
            img = Image.open(io.BytesIO(fh.read())).convert("RGB")
    except (OSError, ValueError):
        return None
    scale = min((CELL - 8) / img.width, (CELL - 8) / img.height)  # fill the cell, up or down
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def qc_page(
    slides: pa.Table,
    dest: str,
    *,
    endpoint_url: str | None = None,
    columns: int = 6,
    title: str = "",
    max_slides: int = 240,
) -> str:
    """Write the page for the latest status rows ``slides`` (``slides.lance`` columns) to ``dest``
    (a PNG path or URI); returns ``dest``. Failed and tissue-less slides come first; beyond
    ``max_slides`` the page says how many more there are (each has its own thumbnail)."""
    all_rows = sorted(slides.to_pylist(), key=lambda r: (r["status"] == "ok", r["slide_id"]))  # problems first
    rows = all_rows[:max_slides]
    n = max(1, len(rows))
    cols = min(columns, n)
    grid_rows = int(np.ceil(n / cols))
    head = 34
    page = Image.new("RGB", (cols * CELL, head + grid_rows * (CELL + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    counts = {s: sum(r["status"] == s for r in all_rows) for s in ("ok", "no_tissue", "failed")}
    more = f" (first {len(rows)} shown; the rest in qc/<slide_id>.png)" if len(all_rows) > len(rows) else ""
    draw.text((8, 6), (title or "hipt-ray QC") + more, fill=(0, 0, 0))
    draw.text(
        (8, 19),
        f"{len(all_rows)} slides: {counts['ok']} ok, {counts['no_tissue']} no tissue, "
        f"{counts['failed']} failed  (green: tissue contour, blue: kept regions)",
        fill=(60, 60, 60),
    )
    for i, r in enumerate(rows):
        x0, y0 = (i % cols) * CELL, head + (i // cols) * (CELL + CAPTION)
        colour = STATUS_RGB.get(r["status"], (0, 0, 0))
        thumb = _thumb(r.get("qc_uri") or "", endpoint_url)
        if thumb is not None:
            page.paste(thumb, (x0 + (CELL - thumb.width) // 2, y0 + (CELL - thumb.height) // 2))
        else:  # no thumbnail: the slide could not be read; the reason goes in its cell
            draw.rectangle([x0 + 6, y0 + 6, x0 + CELL - 6, y0 + CELL - 6], outline=colour, width=2)
            for j, line in enumerate(textwrap.wrap(r.get("error") or "no thumbnail", 44)[:16]):
                draw.text((x0 + 12, y0 + 14 + 14 * j), line, fill=colour)
        draw.rectangle([x0 + 1, y0 + 1, x0 + CELL - 2, y0 + CELL + CAPTION - 2], outline=colour, width=2)
        cy = y0 + CELL
        draw.text((x0 + 6, cy + 2), f"{r['slide_id']}  [{r['status']}]", fill=colour)
        mpp = f"{r['mpp']:.3g} um/px ({r['mpp_source']})" if r.get("mpp") else "mpp unknown"
        read_by = f", read by {r['backend']}" if r.get("backend") else ""
        draw.text((x0 + 6, cy + 16), f"{r.get('n_regions') or 0} regions, {mpp}{read_by}", fill=(40, 40, 40))
        if r["status"] != "ok" and thumb is not None:
            for j, line in enumerate(textwrap.wrap(r.get("error") or "", 48)[:2]):
                draw.text((x0 + 6, cy + 30 + 12 * j), line, fill=colour)
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    fs, path = filesystem(dest, endpoint_url)
    if "://" not in dest:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return dest


def write_qc_page(out: str, spec_hash: str, *, endpoint_url: str | None = None) -> str:
    """The QC page of the tiling spec ``spec_hash`` under ``out``: ``OUT/qc/overview.png``."""
    from hipt_ray.store import Store

    slides = Store(out, endpoint_url=endpoint_url).latest_slides(spec_hash, model_id="")
    return qc_page(
        slides,
        join(out, "qc", "overview.png"),
        endpoint_url=endpoint_url,
        title=f"hipt-ray QC  {out}  (tiling spec {spec_hash})",
    )
