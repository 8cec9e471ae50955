"""``hipt-ray heatmap``: what a model attends to. Region heatmaps (ViT-256 heads, ViT-4K heads,
hierarchical) from a slide region, and slide heatmaps of a trained slide-level head's attention
over its regions; :mod:`hipt_ray.viz.heatmaps` draws them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hipt_ray.config import Config, InputError, validate_config
from hipt_ray.heads.cohort import load_cohort
from hipt_ray.heads.fit import load_head
from hipt_ray.heads.saved import HEADS_FILE, load_folds
from hipt_ray.models.geometry import apply_geometry
from hipt_ray.models.hipt4k import default_micro_batch
from hipt_ray.models.inference import inference_device
from hipt_ray.models.loading import build_model
from hipt_ray.slides.manifest import SlideSpec, slide_id_from_uri
from hipt_ray.slides.reader import make_cache, open_slide
from hipt_ray.store import Store
from hipt_ray.store.tables import resolve_embedding
from hipt_ray.tracking import tracking_uri
from hipt_ray.viz.attention import cell_px, percentile_map, smoothed_attention, upsample, window_offsets
from hipt_ray.viz.heatmaps import (
    blend,
    content_cells,
    region_figure,
    renormalised_over_content,
    slide_attention_png,
)


def _read_canvas(cfg: Config, slide_uri: str, xy: tuple[int, int], margin: int) -> tuple[np.ndarray, int, int]:
    """The region at level-0 ``xy`` with ``margin`` pixels (at ``tiling.mpp``) more above and to
    the left, for the shifted windows; and the width and height of the region's pixels that hold
    slide content (the rest is white padding beyond the slide's edge)."""
    size = cfg.tiling.region_px
    ref = SlideSpec(slide_id_from_uri(slide_uri), slide_uri).to_ref(cfg.tiling.mpp_overrides)
    slide, _ = open_slide(ref, cfg, cache=make_cache(cfg))
    with slide:
        scale = cfg.tiling.mpp / slide.mpp
        w0, h0 = slide.dimensions
        x, y = xy
        if not (0 <= x < w0 and 0 <= y < h0):
            raise InputError(f"{slide_uri}: region {x},{y} lies outside the slide ({w0}×{h0} level-0 pixels)")
        origin = (int(round(x - margin * scale)), int(round(y - margin * scale)))
        canvas, _ = slide.read_region(origin, (size + margin, size + margin), cfg.tiling.mpp)
        valid_w, valid_h = min(size, int(np.ceil((w0 - x) / scale))), min(size, int(np.ceil((h0 - y) / scale)))
    return canvas, valid_w, valid_h


def region_heatmaps(
    cfg: Config, slide_uri: str, xy: tuple[int, int], out_dir: str, *, shifts: int = 2, display_px: int = 1024
) -> dict[str, str]:
    """Attention figures of the region at level-0 ``xy`` of ``slide_uri`` (``tiling.region_px``
    at ``tiling.mpp``), smoothed over ``shifts``² shifted windows. Returns name → file path."""
    cfg = apply_geometry(cfg)  # a patch encoder's region: its patches × 16 (models.geometry)
    model, mid = build_model(cfg)
    device = inference_device(cfg.embed.use_gpu)
    if device.type == "cuda":
        model = model.to(device)
        model.micro_batch = default_micro_batch(device, cfg.model.micro_batch)
    size = cfg.tiling.region_px
    offsets = window_offsets(cfg.tiling.patch_px, shifts, cell_px(model))
    margin = max(offsets)
    x, y = xy
    canvas, valid_w, valid_h = _read_canvas(cfg, slide_uri, xy, margin)
    att, n_windows = smoothed_attention(model, canvas, (size, size), margin, offsets)
    region = canvas[margin:, margin:]
    image = np.asarray(Image.fromarray(region).resize((display_px, display_px), Image.Resampling.LANCZOS))
    shape = (display_px, display_px)
    stem = f"{Path(slide_uri).stem}_{x}_{y}"
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    smooth = f"{n_windows} shifted windows" if n_windows > 1 else "no smoothing"

    shown = np.outer(content_cells(display_px, valid_h, size), content_cells(display_px, valid_w, size))

    def pct(m: np.ndarray) -> np.ndarray:
        """Percentiles over the cells with slide content, upsampled; padding is NaN (grey)."""
        cells = np.outer(content_cells(m.shape[0], valid_h, size), content_cells(m.shape[1], valid_w, size))
        up = upsample(np.nan_to_num(percentile_map(m, cells), nan=0.0), shape)
        return np.where(shown, up, np.nan)

    v256 = [(f"ViT-256 head {i}", pct(m)) for i, m in enumerate(att.vit256)]
    v4k = [(f"ViT-4K head {i}", pct(m)) for i, m in enumerate(att.vit4k)]
    hier = att.hierarchical()
    files = {
        "vit256": region_figure(
            image,
            v256,
            base + "_vit256.png",
            f"{stem}: {cfg.model.patch_encoder or 'ViT-256'} CLS attention inside each {cfg.tiling.patch_px} px "
            f"patch ({smooth}, model {mid})",
        ),
        "vit4k": region_figure(
            image, v4k, base + "_vit4k.png", f"{stem}: ViT-4K CLS attention over the patch grid ({smooth}, model {mid})"
        ),
        "hierarchical": region_figure(
            image,
            [
                ("ViT-4K (mean of heads)", pct(att.vit4k.mean(0))),
                ("ViT-256 (mean of heads)", pct(att.vit256.mean(0))),
                ("hierarchical: 4K × 256", pct(hier)),
            ],
            base + "_hierarchical.png",
            f"{stem}: hierarchical attention ({smooth})",
        ),
    }
    overlay = base + "_hierarchical_overlay.png"
    Image.fromarray(blend(image, pct(hier))).save(overlay)
    files["overlay"] = overlay
    np.savez_compressed(
        base + "_attention.npz",
        vit256=att.vit256,
        vit4k=att.vit4k,
        hierarchical=hier,
        region=region,
        windows=n_windows,
        valid_w=valid_w,
        valid_h=valid_h,
        vit4k_tissue=renormalised_over_content(att.vit4k, valid_w, valid_h, size),
    )
    files["npz"] = base + "_attention.npz"
    return files


def load_heads(head_run: str, cfg: Config) -> dict:
    """``heads.pt`` from a run directory, the file itself, or an MLflow run id."""

    candidates = [head_run, os.path.join(head_run, HEADS_FILE)]
    for c in candidates:
        if os.path.isfile(c):
            return load_folds(c, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    if os.path.exists(head_run):
        raise InputError(
            f"{head_run} holds no heads.pt: pass a train-head/sweep run directory "
            "(e.g. OUT/heads/<name>) or an MLflow run id"
        )
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        local = mlflow.artifacts.download_artifacts(run_id=head_run, artifact_path="heads.pt")
    except Exception as exc:
        raise InputError(
            f"{head_run} is neither a run directory nor an MLflow run with a heads.pt artifact "
            f"in {tracking_uri(cfg)} ({type(exc).__name__}); for a run id pass the store it is in, "
            "e.g. tracking.mlflow_uri=sqlite:///OUT/mlflow.db"
        ) from None
    return load_folds(
        local, name=f"heads.pt of MLflow run {head_run}", allow_unsafe_pickle=cfg.model.allow_unsafe_pickle
    )


def slide_heatmaps(
    cfg: Config, head_run: str, out_dir: str, *, slide_ids: list[str] | None = None, thumb_px: int = 1024
) -> list[str]:
    """Each slide's regions coloured by the slide-level head's attention, drawn over the slide
    thumbnail. Every case is scored by the fold model that never trained on it (out-of-fold)."""

    saved = load_heads(head_run, cfg)
    run_cfg = validate_config(saved["config"])
    h = run_cfg.heads
    cohort = load_cohort(run_cfg)
    store = Store(run_cfg.out, endpoint_url=run_cfg.storage.s3_endpoint_url)
    mid, spec = resolve_embedding(store, cohort.model_id)
    regions = store.regions(spec, model_id=mid, columns=["slide_id", "region_index", "x", "y", "level0_w", "level0_h"])
    by_slide: dict[str, list[dict]] = {}
    for r in regions.to_pylist():
        by_slide.setdefault(r["slide_id"], []).append(r)
    refs = store.slide_refs(spec, mid)
    fold_of = {c: f for f, fold in enumerate(saved["folds"]) for c in fold["val"]}
    heads = []
    for fold in saved["folds"]:
        heads.append(load_head(h, cohort, fold["state_dict"]).eval())
    wanted = set(slide_ids) if slide_ids else None
    os.makedirs(out_dir, exist_ok=True)
    cache = make_cache(run_cfg)
    written = []
    for i, case in enumerate(cohort.case_ids):
        slides = cohort.slides[case]
        if wanted is not None and not wanted & set(slides):
            continue
        with torch.no_grad():
            logits, attn = heads[fold_of[case]](cohort.inputs[i])
        attn = attn.numpy()
        uniform = np.ptp(attn) <= 1e-6 * attn.max()  # mean pooling: no attention to show
        pct = percentile_map(attn)
        if h.task == "subtyping":
            probs = torch.softmax(logits, 1)[0].numpy()
            k = int(probs.argmax())
            what = f"label {cohort.classes[cohort.labels[i]]}, predicted {saved['classes'][k]} ({probs[k]:.2f})"
        else:
            what = f"{cohort.times[i]:.1f} months, event {cohort.events[i]}"
        start = 0
        for sid in slides:
            rows = by_slide.get(sid, [])
            part, part_attn = pct[start : start + len(rows)], attn[start : start + len(rows)]
            start += len(rows)
            if wanted is not None and sid not in wanted:
                continue
            slide, _ = open_slide(refs[sid], run_cfg, cache=cache)
            with slide:
                w0, h0 = slide.dimensions
                thumb, thumb_mpp = slide.read_lowres(slide.mpp * max(w0, h0) / thumb_px)
                k0 = slide.mpp / thumb_mpp  # thumbnail px per level-0 px
            values = np.full(thumb.shape[:2], np.nan, np.float32)
            for r, v in zip(rows, part):
                x0, y0 = int(r["x"] * k0), int(r["y"] * k0)
                values[y0 : y0 + max(1, int(r["level0_h"] * k0)), x0 : x0 + max(1, int(r["level0_w"] * k0))] = v
            top = int(np.argmax(part_attn)) if len(part_attn) and not uniform else None
            box = None if top is None else tuple(rows[top][k] * k0 for k in ("x", "y", "level0_w", "level0_h"))
            title = (
                f"{sid} (case {case}, fold {fold_of[case]} model, out-of-fold)\n{h.head} {h.task}: {what}; "
                f"{len(rows)} regions" + (", equal weights (mean pooling)" if uniform else ", top one dashed")
            )
            dest = slide_attention_png(
                thumb, values, os.path.join(out_dir, f"{sid}_slide_attention.png"), title=title, top_box=box
            )
            written.append(dest)
    if wanted is not None and not written:
        raise InputError(f"none of {sorted(wanted)} is in the head run's cohort")
    return written
