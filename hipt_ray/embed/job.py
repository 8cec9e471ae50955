"""The embedding job: tiled regions → Ray Data (CPU read tasks → HIPT-4K actors → fragment
writes) → Lance.

One streaming pipeline runs the whole job: read tasks take ``embed.regions_per_task`` regions
each, the model actors are started and warmed once, and workers write the rows with embeddings
as Lance fragments themselves (:mod:`hipt_ray.store.fragments`). Only region keys and fragment
metadata reach the driver, which commits finished slides in batches: their fragments first,
then their ``ok``/``failed`` rows (the store's visibility rule), so a killed job leaves no
half-embedded slide visible and a rerun resumes with exactly one row per region.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from hipt_ray.config import Config
from hipt_ray.console import Progress
from hipt_ray.data.regions import RegionEmbedder, read_region
from hipt_ray.models.loading import build_model
from hipt_ray.slides.manifest import list_slides
from hipt_ray.slides.reader import recorded_override
from hipt_ray.store import REGIONS_SCHEMA, Store
from hipt_ray.store.commit import status_row
from hipt_ray.store.fragments import RegionCommitter, write_region_fragments
from hipt_ray.store.lease import writer_lease
from hipt_ray.store.tables import REGIONS, embedding_fields, row_version
from hipt_ray.tile.job import TileSummary
from hipt_ray.tile.job import run as tile_run

log = logging.getLogger(__name__)
_COORDS = [f.name for f in REGIONS_SCHEMA if f.name not in ("model_id",)]


@dataclass
class EmbedSummary(TileSummary):
    model_id: str = ""
    index: str = ""  # what the vector index refresh did
    fragments: int = 0  # Lance fragments the workers wrote and the driver committed
    commits: int = 0
    duplicates: int = 0  # region rows that came back twice (not committed twice)
    driver_bytes: int = 0  # what reached the driver from the pipeline
    driver_cpu: float = 0.0  # CPU seconds the driver spent while the pipeline ran
    pipeline_seconds: float = 0.0  # how long the pipeline ran
    commit_seconds: float = 0.0  # of which the driver spent committing finished slides
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)  # read|model → node id → regions
    stage_seconds: dict[str, float] = field(default_factory=dict)  # read|model → seconds, summed
    returned: int = 0  # regions that came back from the pipeline (ok or not): stage_seconds' count
    model_actors: int = 0
    tables: str = ""  # fragments and versions left after tidying

    def lines(self) -> list[str]:
        rate = self.regions / self.seconds if self.seconds else 0.0
        per_region = self.driver_bytes / self.regions if self.regions else 0.0
        placed = "; ".join(f"{kind} on " + ", ".join(f"{node[:8]}×{k}" for node, k in sorted(n.items()))
                           for kind, n in self.nodes.items() if n)  # node id prefixes × regions
        return [
            f"slides: {self.total} ({self.ok} embedded, {self.failed} failed, {self.no_tissue} no tissue, "
            f"{self.skipped} already done)",
            f"regions: {self.regions} embedded ({rate:.2f} regions/s)",
            f"time: {self.seconds:.1f} s",
        ] + ([f"pipeline: {self.fragments} fragments written by workers, {self.commits} commits, "
              f"{per_region:.0f} bytes and {1e3 * self.driver_cpu / max(self.regions, 1):.1f} ms of driver CPU "
              f"per region (driver CPU {self.driver_cpu:.1f} s over {self.pipeline_seconds:.1f} s of pipeline, "
              f"{self.commit_seconds:.1f} s of it committing)" + (f"; {placed}" if placed else "")]
             if self.fragments else []) + ([self.stages_line()] if self.stage_seconds else []) + (
            [f"tables: {self.tables}"] if self.tables else []) + [
            f"model: {self.model_id}",
            f"outputs: {self.out}/regions.lance (emb4k, mean256, tokens256), {self.out}/slides.lance",
        ] + ([f"search: {self.index}"] if self.index else [])

    def stages_line(self) -> str:
        """Where a region's time goes: its read and its model call (means over the regions
        that came back), and how busy the model actors were while the pipeline ran — below
        ≈ 90 % on a model-bound run, the model waits for reads or for Ray to move the pixels."""
        n = max(self.returned, 1)
        read, model = self.stage_seconds.get("read", 0.0), self.stage_seconds.get("model", 0.0)
        actors = max(self.model_actors, 1)
        busy = model / (actors * self.pipeline_seconds) if self.pipeline_seconds else 0.0
        return (f"stages: read {read / n:.3g} s and model {model / n:.3g} s a region; "
                f"{actors} model actor{'s' if actors > 1 else ''} busy {100 * busy:.0f} % of the pipeline")


def _use_gpu(cfg: Config) -> bool:
    if cfg.embed.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.embed.use_gpu)


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
    tiling = tile_run(cfg, listed)  # skips slides already tiled with the same spec
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
    todo = sorted(sid for sid, r in tiled.items() if sid not in done and r["status"] == "ok")
    # Slides that tiling already failed (or found empty) get their status for this model too.
    carried = [r for sid, r in tiled.items() if sid not in done and r["status"] != "ok"]
    progress = Progress("embed", total=0, unit="regions")  # drawn once there are regions to embed

    def status_for(sid: str, status: str, error: str, n: int) -> dict:
        return status_row(tiled[sid], status=status, error=error, n_regions=n, model_id=mid,
                          seconds=time.perf_counter() - t0)

    committer = RegionCommitter(
        store, expected={s: int(tiled[s]["n_regions"]) for s in todo}, batch_slides=cfg.ray.write_batch_slides,
        status_row=status_for, replaces=replaces,
        on_finished=lambda *_: progress.update(slides=f"{committer.counts.total()}/{len(todo) + len(carried)}",
                                               failed=committer.counts["failed"] or None))
    for r in carried:
        committer.add_slide(status_for(r["slide_id"], r["status"], r["error"], 0))
    if not todo:
        committer.close()
        summary.count(committer)
        summary.seconds = time.perf_counter() - t0
        return summary

    use_gpu = _use_gpu(cfg)
    n_actors = cfg.embed.model_actors or (int(ray.cluster_resources().get("GPU", 1)) if use_gpu else 1)
    dim4k, dim256 = model.vit4k.embed_dim, model.vit256.embed_dim
    if removed := store.remove_uncommitted(cfg.storage.keep_versions_days):
        log.info("removed %.1f MB of region files an earlier run wrote but never committed", removed / 1e6)
    table_schema = store.prepare_regions(pa.schema(list(REGIONS_SCHEMA) + embedding_fields(dim4k, dim256)))
    out_schema = pa.schema([REGIONS_SCHEMA.field(n) for n in _COORDS] + [pa.field("uri", pa.string())]
                           + embedding_fields(dim4k, dim256)
                           + [pa.field(n, pa.string()) for n in ("error", "read_node", "model_node")]
                           + [pa.field(n, pa.float32()) for n in ("read_seconds", "model_seconds")])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    # One streaming pipeline for the whole run: the driver holds only the region coordinates
    # (≈ 200 bytes a region) and the metadata that comes back.
    coords = store.regions(spec, todo, model_id="", columns=_COORDS)
    sids = coords["slide_id"].to_pylist()
    coords = coords.append_column("uri", pa.array([specs[s].uri for s in sids], pa.string()))
    overrides = {s: recorded_override(tiled[s]) for s in todo}  # what each slide's tiling used
    coords = coords.append_column("mpp_override", pa.array([overrides[s] for s in sids], pa.float64()))
    per_task = cfg.embed.regions_per_task
    blocks = [coords.slice(i, per_task) for i in range(0, coords.num_rows, per_task)]
    progress.total = coords.num_rows

    if blocks:
        read_resources = dict(cfg.embed.read_resources) or None
        ds = ray.data.from_arrow(blocks)
        ds = ds.map(read_region, fn_kwargs={"cfg_dict": cfg.to_dict()}, num_cpus=cfg.embed.read_cpus,
                    resources=read_resources)
        ds = ds.map_batches(
            RegionEmbedder,
            fn_constructor_kwargs=dict(
                model_name=cfg.model.name, state_dict=state, micro_batch=cfg.model.micro_batch,
                precision=cfg.embed.precision, compile=cfg.embed.compile, use_gpu=use_gpu,
                store_tokens=cfg.embed.store_tokens, schema=out_schema,
                threads=max(1, int(cfg.embed.actor_cpus)),
            ),
            batch_size=cfg.embed.actor_batch_regions, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cfg.embed.actor_cpus, num_gpus=1 if use_gpu else 0,
            memory=int(cfg.embed.actor_memory_gb * 2**30),  # also keeps reads and model unfused
            resources=dict(cfg.embed.actor_resources) or None,
        )
        ds = ds.map_batches(  # the rows with embeddings go to the table from here, not the driver
            write_region_fragments,
            fn_kwargs=dict(uri=store.uri(REGIONS), schema=table_schema, model_id=mid,
                           storage_options=store.options),
            batch_size=cfg.embed.write_regions, batch_format="pyarrow", num_cpus=0.25,
            resources=read_resources,
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()  # all the driver's threads
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.update(advance=batch.num_rows)
                committer.add(batch)
            summary.driver_cpu = time.process_time() - cpu0
            summary.pipeline_seconds = time.perf_counter() - wall0
        except BaseException:
            committer.flush()  # what finished stays committed; a rerun does the rest
            raise
    committer.close()
    summary.count(committer)
    progress.close()
    summary.fragments, summary.commits = committer.fragments, committer.commits
    summary.duplicates = committer.duplicates
    summary.driver_bytes, summary.commit_seconds = committer.bytes_in, committer.commit_seconds
    summary.nodes = {k: dict(v) for k, v in committer.nodes.items()}
    if blocks:
        summary.stage_seconds, summary.returned = dict(committer.stage_seconds), committer.returned
        summary.model_actors = n_actors
    summary.tables = store.tidy(cfg.storage.keep_versions_days)
    if summary.ok:
        from hipt_ray.store.vectors import refresh_index

        try:  # fold the new regions into the similar-region index (searches stay exact meanwhile)
            summary.index = refresh_index(store, cfg.search)
        except Exception as exc:
            log.warning("vector index not refreshed (searches still see every region): %s", exc)
    summary.seconds = time.perf_counter() - t0
    return summary
