"""``bench/gpu_check.py --no-ray``: the GPU check on a machine without Ray or Lance (the device
machines' image has torch and the imaging stack but neither, and no network to install them).

No embed job, so no end-to-end rate; everything else as the full check measures it, on real
packed regions: synthetic demo slides written here (:func:`hipt_ray.slides.synthetic.make_demo_data`),
tiled one by one by the tiler's own :func:`~hipt_ray.slides.tiler.tile_slide` (tissue, grid,
probe), each region packed as a read task packs it (:meth:`Slide.pack_region
<hipt_ray.slides.reader.Slide.pack_region>` through the tile backend), then the decode
comparison, the cosines, the model-only rate and MFU of :mod:`gpu_check`, and the bytes a packed
region row moves against its compressed tile bytes and its pixels.

Imports beyond the device image: pydantic (``hipt_ray.config``), imagecodecs (JPEG tiles),
openslide-python + openslide-bin (``hipt_ray.slides.reader`` imports openslide), simplejpeg (DCT-
scaled reads only); ``bench/gpu_wheels.sh`` downloads them for the device's Python.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import gpu_check as base  # bench/gpu_check.py (this file's caller puts bench/ on the path)
import numpy as np
import torch

from hipt_ray.config import Config
from hipt_ray.embed.decode import row_bytes
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides.reader import make_cache, open_slide
from hipt_ray.slides.synthetic import make_demo_data
from hipt_ray.slides.tiler import tile_slide

NOT_MEASURED = "not measured in --no-ray mode"
# Slides of the GPU size without Ray: enough for the decode comparison's 24 whole regions (4 to
# 20 a slide) with one Aperio slide among them; the job's 16 would only lengthen the serial tiling.
GPU_SLIDES = 4


def make_data(mode: base.Mode, work: Path) -> Path:
    """``make-demo-data``'s slides, written in this process; returns their folder."""
    root = make_demo_data(work / "data", n_slides=mode.n_slides, size_um=mode.size_um)
    return root / "slides"


def tile(cfg: Config, slides: Path) -> tuple[list[dict], list[dict]]:
    """(slide rows, region rows with their :data:`SlideRef.COLUMNS`) of every slide, tiled here."""
    cache, spec_hash = make_cache(cfg), cfg.tiling_spec_hash()
    slide_rows, region_rows = [], []
    for path in sorted(slides.iterdir()):
        result = tile_slide(SlideRef(slide_id=path.stem, uri=str(path)), cfg, cache=cache, spec_hash=spec_hash)
        slide_rows.append(result.slide)
        region_rows += [{**r, "uri": str(path), "mpp_override": None} for r in result.regions]
    return slide_rows, region_rows


def pick(rows: list[dict], n: int, px: int) -> list[dict]:
    """Up to ``n`` whole regions (else any), taken round-robin over the slides."""
    rows = [r for r in rows if (r["read_w"], r["read_h"]) == (px, px)] or rows
    by_slide: dict[str, list[dict]] = {}
    for r in rows:
        by_slide.setdefault(r["slide_id"], []).append(r)
    return [r for i in range(n) for group in by_slide.values() if i < len(group) for r in [group[i]]][:n]


def packed_batch(cfg: Config, rows: list[dict]) -> dict[str, np.ndarray]:
    """``rows`` packed as the read tasks pack them, as one actor batch (numpy object columns):
    the region row's columns, the packed columns, ``image`` (empty) and ``error``."""
    cache, read = make_cache(cfg), []
    for r in rows:
        slide, _ = open_slide(SlideRef.of_region(r), cfg, cache=cache)
        with slide:
            packed = slide.pack_region((r["x"], r["y"]), (r["read_w"], r["read_h"]), r["mpp"])
        if packed is None:
            raise SystemExit(f"gpu_check --no-ray: {r['uri']} did not pack (backend {slide.backend})")
        read.append({**r, **packed.to_columns(), "image": np.zeros((0, 0, 3), np.uint8), "error": ""})
    batch = {k: np.empty(len(read), object) for k in read[0]}
    for i, row in enumerate(read):
        for k, v in row.items():
            batch[k][i] = v
    return batch


def transfer(batch: dict[str, np.ndarray]) -> dict:
    """Bytes a packed region row moves (what the object store would carry) against its tiles'
    compressed bytes and its decoded pixels."""
    n = len(batch["tiles"])
    moved = sum(row_bytes(batch, i) for i in range(n)) / n
    tiles = sum(len(t) for t in batch["tiles"]) / n
    pixels = sum(int(np.prod(json.loads(p)["size"])) * 3 for p in batch["packing"]) / n
    return {
        "transfer_bytes_per_region": round(moved),
        "tile_bytes_per_region": round(tiles),
        "pixel_bytes_per_region": round(pixels),
        "transfer_over_tile_bytes": round(moved / tiles, 4),
    }


def run(mode: base.Mode, work: Path) -> dict:
    """The check's steps without Ray (see the module docstring); the figures as a dict."""
    if mode.name == "gpu":
        mode = replace(mode, n_slides=GPU_SLIDES)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    done = base.step("make-demo-data")
    slides = make_data(mode, work)
    seconds["make_demo_data"] = done()
    cfg = base.embed_config(mode, slides, work)
    done = base.step("tile (in this process)")
    slide_rows, region_rows = tile(cfg, slides)
    seconds["tile"] = done()
    done = base.step("pack regions with the tile backend")
    batch = packed_batch(cfg, pick(region_rows, mode.decode_regions, cfg.tiling.region_px))
    seconds["pack"] = done()
    done = base.step("decode: GPU route vs CPU on the same packed regions")
    dec, gpu_px, cpu_px = base.decode_compare(batch, mode, cfg.embed.actor_batch_regions)
    seconds["decode"] = done()
    done = base.step("model: cosine of the two decodes, model-only rate")
    m = base.model_figures(cfg, mode, gpu_px, cpu_px, base.full_region(cpu_px, batch, mode.device))
    seconds["model"] = done()
    done = base.step("Lanczos: GPU route vs Pillow")
    lz = base.lanczos_figures(mode)
    seconds["lanczos"] = done()
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    failed = [s for s in slide_rows if s["status"] != "ok"]
    e2e = {
        "slides": len(slide_rows),
        "slides_ok": len(slide_rows) - len(failed),
        "slides_failed": len(failed),
        "failures": {s["slide_id"]: s["error"] for s in failed},
        "regions_tiled": len(region_rows),
        "regions_packed": len(batch["tiles"]),
        "end_to_end_regions_per_s": NOT_MEASURED,
        "steady_regions_per_s": NOT_MEASURED,
    } | transfer(batch)
    r = {
        "mode": asdict(mode) | {"ray": False},
        "device": mode.device,
        "jpeg_device": mode.jpeg_device,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "config": {k: getattr(cfg.embed, k) for k in ("precision", "compile", "decode", "actor_cpus")}
        | {"model": cfg.model.name, "reader_backend": cfg.reader.backend},
        "end_to_end": e2e,
        "decode": dec,
        "model": m,
        "mfu": base.mfu(mode, {"model_only": m["model_only_regions_per_s"]}),
        "lanczos": lz,
        "seconds": seconds,
    }
    r["mfu"].update(end_to_end=NOT_MEASURED, end_to_end_steady=NOT_MEASURED)
    r["status"] = verdict(r)
    return r


def verdict(r: dict) -> str:
    """``ok``, or what failed (the exit status is 1 then)."""
    e, d, m = r["end_to_end"], r["decode"], r["model"]
    if e["slides_failed"]:
        return f"{e['slides_failed']} of {e['slides']} slides failed to tile: {e['failures']}"
    if not d["gpu_regions"]:
        return "no region decoded on the GPU route"
    if m["cosine_fp32_min"] < base.COSINE_MIN:
        return f"embedding cosine {m['cosine_fp32_min']} < {base.COSINE_MIN}"
    return base.lanczos_verdict(r)


def report(r: dict) -> list[str]:
    """The figures as lines (what the JSON holds, readable)."""
    e, m, u = r["end_to_end"], r["model"], r["mfu"]
    lines = [
        f"device: {r['device']} ({u['gpu'] or 'no GPU'}), torch {r['torch']}, {r['cpus']} CPUs; no Ray: "
        f"{e['slides']} slides tiled here ({e['slides_failed']} failed), {e['regions_tiled']} regions, "
        f"{e['regions_packed']} packed",
        f"model-only: {m['model_only_regions_per_s']:.2f} regions/s (after a {m['warmup_s']:.1f} s warm-up); "
        f"end-to-end: {NOT_MEASURED}",
        f"a packed region row: {e['transfer_bytes_per_region'] / 1e6:.2f} MB to move, its tiles "
        f"{e['tile_bytes_per_region'] / 1e6:.2f} MB ({e['transfer_over_tile_bytes']}×), its pixels "
        f"{e['pixel_bytes_per_region'] / 1e6:.2f} MB",
    ]
    lines += base.decode_lines(r)
    mfu = base._pct(u.get("model_only")) if "peak_bf16_dense_tflops" in u else f"n/a ({u['peak_source']})"
    lines.append(f"MFU model-only: {mfu}; end-to-end: {NOT_MEASURED}")
    lines.append(f"steps (s): {json.dumps(r['seconds'])}; status: {r['status']}")
    return lines
