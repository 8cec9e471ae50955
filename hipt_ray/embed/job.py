"""The embedding job: tiled regions → Ray Data (CPU read tasks → HIPT-4K actors) → Lance.

Slides are processed in chunks of ``embed.chunk_slides``, each a streaming Ray Data pipeline,
so the driver never holds more than one chunk's region specs. The driver collects each slide's
embedded regions as they stream out and commits finished slides in batches: region rows first,
then the slides' ``ok``/``failed`` rows (the store's visibility rule), so a killed job leaves no
half-embedded slide visible and a rerun resumes with exactly one row per region.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from hipt_ray import tile
from hipt_ray.tile import TileSummary
from hipt_ray.config import Config, ConfigError
from hipt_ray.data.regions import RegionEmbedder, read_region
from hipt_ray.models.loading import build_model
from hipt_ray.slides.manifest import list_slides
from hipt_ray.slides.reader import recorded_override
from hipt_ray.store import REGIONS_SCHEMA, Store
from hipt_ray.store.lease import writer_lease
from hipt_ray.store.tables import embedding_fields, row_version

log = logging.getLogger(__name__)
_COORDS = [f.name for f in REGIONS_SCHEMA if f.name not in ("model_id",)]


@dataclass
class EmbedSummary(TileSummary):
    model_id: str = ""
    index: str = ""  # what the vector index refresh did

    def lines(self) -> list[str]:
        rate = self.regions / self.seconds if self.seconds else 0.0
        return [
            f"slides: {self.total} ({self.ok} embedded, {self.failed} failed, {self.no_tissue} no tissue, "
            f"{self.skipped} already done)",
            f"regions: {self.regions} embedded ({rate:.2f} regions/s)",
            f"time: {self.seconds:.1f} s",
            f"model: {self.model_id}",
            f"outputs: {self.out}/regions.lance (emb4k, mean256, tokens256), {self.out}/slides.lance",
        ] + ([f"search: {self.index}"] if self.index else [])


def _use_gpu(cfg: Config) -> bool:
    if cfg.embed.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.embed.use_gpu)


def _status_row(tile_row: dict, *, mid: str, status: str, error: str, n_regions: int, t0: float) -> dict:
    return {**tile_row, "model_id": mid, "status": status, "error": error, "n_regions": n_regions,
            "seconds": round(time.perf_counter() - t0, 3), "time": datetime.now(timezone.utc)}


def run(cfg: Config) -> EmbedSummary:
    """Embed every slide of ``cfg.slides`` into the tables under ``cfg.out``, holding the
    output's writer lease (also across the tiling it starts with).

    Raises:
        OutputInUse: another run is writing ``cfg.out``.
    """
    with writer_lease(cfg.out, "embed", endpoint_url=cfg.storage.s3_endpoint_url, ttl=cfg.storage.lease_seconds):
        return _run(cfg)


def _run(cfg: Config) -> EmbedSummary:
    t0 = time.perf_counter()
    listed = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
    tiling = tile.run(cfg, listed)  # skips slides already tiled with the same spec
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    spec = cfg.tiling_spec_hash()
    model, mid = build_model(cfg)
    summary = EmbedSummary(total=tiling.total, model_id=mid, out=cfg.out)
    if orphans := store.remove_orphans(spec, mid):
        log.info("removed regions of %d slides left half-written by an earlier run", len(orphans))
    specs = {s.slide_id: s for s in listed}
    tiled = {r["slide_id"]: r for r in store.latest_slides(spec, "").to_pylist() if r["slide_id"] in specs}
    # Embedded already: the same file version as tiled now (a changed file was tiled again).
    earlier = store.done_rows(spec, mid)
    done = {sid for sid, r in earlier.items() if sid in tiled and row_version(r) == row_version(tiled[sid])}
    replaces = set(earlier) - done
    summary.skipped = sum(1 for s in specs if s in done)
    # Slides that tiling already failed (or found empty) get their status for this model too.
    carried = [_status_row(r, mid=mid, status=r["status"], error=r["error"], n_regions=0, t0=t0)
               for sid, r in tiled.items() if sid not in done and r["status"] != "ok"]
    for r in carried:
        setattr(summary, r["status"], getattr(summary, r["status"]) + 1)
    store.append_slides(carried, [], replaces=replaces)
    todo = sorted(sid for sid, r in tiled.items() if sid not in done and r["status"] == "ok")
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    use_gpu = _use_gpu(cfg)
    n_actors = cfg.embed.model_actors or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1)
    dim4k, dim256 = model.vit4k.embed_dim, model.vit256.embed_dim
    out_schema = pa.schema([REGIONS_SCHEMA.field(n) for n in _COORDS] + [pa.field("uri", pa.string())]
                           + embedding_fields(dim4k, dim256) + [pa.field("error", pa.string())])
    write_schema = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(dim4k, dim256))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cfg_dict = cfg.to_dict()
    t_embed = time.perf_counter()

    for start in range(0, len(todo), cfg.embed.chunk_slides):
        chunk = todo[start : start + cfg.embed.chunk_slides]
        regions = store.regions(spec, chunk, model_id="", columns=_COORDS).to_pylist()
        expected: dict[str, int] = defaultdict(int)
        for r in regions:
            r["uri"] = specs[r["slide_id"]].uri
            r["mpp_override"] = recorded_override(tiled[r["slide_id"]])  # what its tiling used
            expected[r["slide_id"]] += 1
        ds = ray.data.from_items(regions, override_num_blocks=max(1, len(regions)))
        ds = ds.map(read_region, fn_kwargs={"cfg_dict": cfg_dict}, num_cpus=cfg.embed.read_cpus)
        ds = ds.map_batches(
            RegionEmbedder,
            fn_constructor_kwargs=dict(
                model_name=cfg.model.name, state_dict=state, micro_batch=cfg.model.micro_batch,
                precision=cfg.embed.precision, compile=cfg.embed.compile, use_gpu=use_gpu,
                store_tokens=cfg.embed.store_tokens, schema=out_schema,
            ),
            batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cfg.embed.actor_cpus, num_gpus=1 if use_gpu else 0,
            memory=int(cfg.embed.actor_memory_gb * 2**30),  # also keeps reads and model unfused
        )
        pending: dict[str, list[pa.Table]] = defaultdict(list)
        got: dict[str, int] = defaultdict(int)
        ready_slides: list[dict] = []
        ready_regions: list[pa.Table] = []

        def flush() -> None:
            if ready_slides:
                store.append_slides(ready_slides, pa.concat_tables(ready_regions) if ready_regions
                                    else write_schema.empty_table(), write_schema, replaces=replaces)
                ready_slides.clear()
                ready_regions.clear()

        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for sid in set(batch["slide_id"].to_pylist()):
                part = batch.filter(pc.equal(batch["slide_id"], sid))
                pending[sid].append(part)
                got[sid] += part.num_rows
                if got[sid] < expected[sid]:
                    continue
                rows = pa.concat_tables(pending.pop(sid)).sort_by("region_index")
                errors = [e for e in rows["error"].to_pylist() if e]
                if errors:
                    summary.failed += 1
                    log.warning("failed: %s", errors[0])
                    ready_slides.append(_status_row(tiled[sid], mid=mid, status="failed",
                                                    error=errors[0], n_regions=0, t0=t0))
                else:
                    summary.ok += 1
                    summary.regions += rows.num_rows
                    rows = rows.append_column("model_id", pa.array([mid] * rows.num_rows, pa.string()))
                    ready_regions.append(rows.select(write_schema.names).cast(write_schema))
                    ready_slides.append(_status_row(tiled[sid], mid=mid, status="ok", error="",
                                                    n_regions=rows.num_rows, t0=t0))
                finished = summary.ok + summary.failed
                log.info("embed: %d/%d slides (%d failed), %d regions, %.2f regions/s", finished,
                         len(todo), summary.failed, summary.regions,
                         summary.regions / max(time.perf_counter() - t_embed, 1e-9))
                if len(ready_slides) >= cfg.ray.write_batch_slides:
                    flush()
        flush()
    if summary.ok:
        from hipt_ray.store.vectors import refresh_index

        try:  # fold the new regions into the similar-region index (searches stay exact meanwhile)
            summary.index = refresh_index(store, cfg.search)
        except Exception as exc:
            log.warning("vector index not refreshed (searches still see every region): %s", exc)
    summary.seconds = time.perf_counter() - t0
    return summary
