"""Ray Data sources for pretraining: tissue patches (stage 1) and token grids (stage 2)."""

from __future__ import annotations

import zlib

import lance_ray
import numpy as np
import ray

from hipt_ray.config import Config, InputError
from hipt_ray.data.regions import read_region, reader_kwargs
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.tissue import DARKNESS_RANGE, darkness, is_grayscale, saturation
from hipt_ray.store import REGIONS, Store
from hipt_ray.store.tables import resolve_embedding, sql_string, tokens_to_grid


def _patch_rows(
    row: dict, *, patch_px: int, per_region: int, min_tissue: float, threshold: float, seed: int
) -> list[dict]:
    """A read region → up to ``per_region`` of its patches with enough tissue (seeded choice)."""
    if row["error"]:
        return []  # a region that does not decode is skipped for pretraining
    img = row["image"]
    rows, cols = img.shape[0] // patch_px, img.shape[1] // patch_px
    grid = img[: rows * patch_px, : cols * patch_px].reshape(rows, patch_px, cols, patch_px, 3)
    small = grid[:, ::8, :, ::8]
    if is_grayscale(small):  # a slide without colour: tissue is what is darker than glass
        tissue = (darkness(small) > DARKNESS_RANGE[0]).mean(axis=(1, 3))
    else:
        tissue = (saturation(small) > threshold).mean(axis=(1, 3))  # (rows, cols)
    keep = np.flatnonzero(tissue.ravel() >= min_tissue)
    rng = np.random.default_rng([seed, row["region_index"], zlib.crc32(row["slide_id"].encode())])
    chosen = rng.choice(keep, size=min(per_region, keep.size), replace=False) if keep.size else []
    return [{"patch": np.ascontiguousarray(grid[k // cols, :, k % cols])} for k in chosen]


def build_patch_dataset(cfg: Config, specs: list[SlideSpec]) -> tuple[ray.data.Dataset, int]:
    """Stage 1: 256 px tissue patches of the tiled regions of ``specs`` (the slides of
    ``cfg.slides``); and an estimate of the number of patches (for the schedules)."""
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    tiled = store.slide_refs(cfg.tiling_spec_hash())  # opened as tiled: its override, its file version
    refs = [tiled[s.slide_id] for s in specs if s.slide_id in tiled]
    regions = store.region_reads(
        cfg.tiling_spec_hash(), refs, ["region_index", "x", "y", "read_w", "read_h", "mpp", "tissue_fraction"]
    ).to_pylist()
    if not regions:
        raise InputError(f"no tiled regions with tissue for {cfg.slides} under {cfg.out}")
    estimate = 0
    for r in regions:
        n = (r["read_w"] // cfg.tiling.patch_px) * (r["read_h"] // cfg.tiling.patch_px)
        estimate += min(cfg.pretrain.patches_per_region, int(n * r["tissue_fraction"]))
    ds = ray.data.from_items(regions, override_num_blocks=len(regions))
    ds = ds.map(read_region, fn_kwargs=reader_kwargs(cfg, pixels=True), num_cpus=cfg.embed.read_cpus)
    ds = ds.flat_map(
        _patch_rows,
        fn_kwargs=dict(
            patch_px=cfg.tiling.patch_px,
            per_region=cfg.pretrain.patches_per_region,
            min_tissue=cfg.pretrain.min_patch_tissue,
            threshold=cfg.tissue.min_saturation * 2,
            seed=cfg.pretrain.seed,
        ),
    )
    return ds.randomize_block_order(seed=cfg.pretrain.seed), max(1, estimate)


def _grid_row(row: dict, *, patch_px: int) -> dict:
    rows, cols = row["read_h"] // patch_px, row["read_w"] // patch_px
    return {"grid": tokens_to_grid(np.asarray(row["tokens256"], dtype=np.float32), rows, cols)}


def build_grid_dataset(cfg: Config) -> tuple[ray.data.Dataset, int, str, int]:
    """Stage 2: ``[D, 16, 16]`` token grids of full regions from an ``embed`` output; the number
    of grids, the embedding model id they come from and their width D (the patch encoder's).
    ``cfg.tiling`` is the one the regions were cut with (a patch encoder's: apply_geometry)."""
    src = cfg.pretrain.regions_from or cfg.out
    store = Store(src, endpoint_url=cfg.storage.s3_endpoint_url)
    model_id, _ = resolve_embedding(store, cfg.pretrain.model_id, cfg.tiling_spec_hash(), key="pretrain.model_id")
    full = cfg.tiling.region_px
    # Only completed slides' regions, and only full regions (the 14×14 global crops need 16×16).
    done = sorted(store.completed(cfg.tiling_spec_hash(), model_id))
    if not done:
        raise InputError(f"{src} has no slides embedded by model {model_id} with this tiling")
    quoted = ", ".join(sql_string(s) for s in done)
    where = f"model_id = {sql_string(model_id)} AND read_w = {full} AND read_h = {full} AND slide_id IN ({quoted})"
    n = store.dataset(REGIONS).count_rows(filter=where)
    if n == 0:
        raise InputError(f"{src} has no full {full}² regions embedded by {model_id}")
    dim = _token_dim(store, where, cells=(full // cfg.tiling.patch_px) ** 2)
    ds = lance_ray.read_lance(
        store.uri(REGIONS), columns=["tokens256", "read_w", "read_h"], filter=where, storage_options=store.options
    )
    ds = ds.map(_grid_row, fn_kwargs={"patch_px": cfg.tiling.patch_px})
    return ds.randomize_block_order(seed=cfg.pretrain.seed), n, model_id, dim


def _token_dim(store: Store, where: str, *, cells: int) -> int:
    """The width of the stored tokens: one row's ``tokens256`` holds ``cells`` of them."""
    row = store.existing(REGIONS).to_table(columns=["tokens256"], filter=where, limit=1)
    tokens = row["tokens256"][0]
    if not tokens.is_valid:
        raise InputError(
            f"{store.out}: the regions were embedded without tokens256 (embed.store_tokens=false); "
            "stage-2 pretraining needs them: re-embed with embed.store_tokens=true"
        )
    return len(tokens) // cells
