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

import ray

from hipt_ray.config import Config, ConfigError
from hipt_ray.console import Progress
from hipt_ray.data.regions import read_region, reader_kwargs
from hipt_ray.embed.actors import ActorPlan, autoscaler_report, never_started, plan_actors, waiting_line
from hipt_ray.embed.embedder import READ_COLUMNS, RegionEmbedder, output_schema, regions_schema
from hipt_ray.embed.watchdog import ModelActorsNeverStarted, first_within
from hipt_ray.models.geometry import apply_geometry
from hipt_ray.models.loading import build_model
from hipt_ray.runtime import ClusterShape, cluster_shape
from hipt_ray.slides.manifest import list_slides
from hipt_ray.store import Store
from hipt_ray.store.fragments import RegionCommitter, write_region_fragments
from hipt_ray.store.lease import writer_lease
from hipt_ray.store.run import RunPlan, finish_run, plan_run
from hipt_ray.store.tables import REGIONS
from hipt_ray.tile.job import SlideCounts, TileSummary
from hipt_ray.tile.job import run as tile_run

log = logging.getLogger(__name__)


@dataclass
class EmbedSummary(SlideCounts):
    tiling: TileSummary = field(default_factory=TileSummary)  # the tiling this run started with
    seconds: float = 0.0
    out: str = ""
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
    decoded: dict[str, int] = field(default_factory=dict)  # reader|cpu|gpu|gpu→cpu → regions
    moved: dict[str, float] = field(default_factory=dict)  # transfer_bytes, tile_bytes, decode_seconds: sums
    model_actors: int = 0
    tables: str = ""  # fragments and versions left after tidying

    @property
    def total(self) -> int:
        return self.tiling.total

    def take(self, committer: RegionCommitter) -> None:
        """The run's figures from its committer."""
        self.count(committer)
        self.fragments, self.commits = committer.fragments, committer.commits
        self.duplicates = committer.duplicates
        self.driver_bytes, self.commit_seconds = committer.bytes_in, committer.commit_seconds
        self.nodes = {k: dict(v) for k, v in committer.nodes.items()}
        if self.model_actors:  # a pipeline ran
            self.stage_seconds, self.returned = dict(committer.stage_seconds), committer.returned
            self.decoded, self.moved = dict(committer.decoded), dict(committer.moved)

    def lines(self) -> list[str]:
        rate = self.regions / self.seconds if self.seconds else 0.0
        per_region = self.driver_bytes / self.regions if self.regions else 0.0
        placed = "; ".join(
            f"{kind} on " + ", ".join(f"{node[:8]}×{k}" for node, k in sorted(n.items()))
            for kind, n in self.nodes.items()
            if n
        )  # node id prefixes × regions
        return (
            [
                f"slides: {self.total} ({self.ok} embedded, {self.failed} failed, {self.no_tissue} no tissue, "
                f"{self.skipped} already done)",
                f"regions: {self.regions} embedded ({rate:.2f} regions/s)",
                f"time: {self.seconds:.1f} s",
            ]
            + (
                [
                    f"pipeline: {self.fragments} fragments written by workers, {self.commits} commits, "
                    f"{per_region:.0f} bytes and {1e3 * self.driver_cpu / max(self.regions, 1):.1f} ms of driver CPU "
                    f"per region (driver CPU {self.driver_cpu:.1f} s over {self.pipeline_seconds:.1f} s of pipeline, "
                    f"{self.commit_seconds:.1f} s of it committing)" + (f"; {placed}" if placed else "")
                ]
                if self.fragments
                else []
            )
            + ([self.stages_line()] if self.stage_seconds else [])
            + ([self.transfer_line()] if self.decoded else [])
            + ([f"tables: {self.tables}"] if self.tables else [])
            + [
                f"model: {self.model_id}",
                f"outputs: {self.out}/regions.lance (emb4k, mean256, tokens256), {self.out}/slides.lance",
            ]
            + ([f"search: {self.index}"] if self.index else [])
        )

    def stages_line(self) -> str:
        """Where a region's time goes: its read and its model call (means over the regions
        that came back), and how busy the model actors were while the pipeline ran — below
        ≈ 90 % on a model-bound run, the model waits for reads or for Ray to move the pixels."""
        n = max(self.returned, 1)
        read, model = self.stage_seconds.get("read", 0.0), self.stage_seconds.get("model", 0.0)
        actors = max(self.model_actors, 1)
        busy = model / (actors * self.pipeline_seconds) if self.pipeline_seconds else 0.0
        return (
            f"stages: read {read / n:.3g} s and model {model / n:.3g} s a region; "
            f"{actors} model actor{'s' if actors > 1 else ''} busy {100 * busy:.0f} % of the pipeline"
        )

    def transfer_line(self) -> str:
        """What a region moved through the object store to the model actors, and for the
        regions sent as compressed tiles that beside their tiles' bytes (≈ 1×; pixels are ≈ 16×
        the tiles at 20×); where regions were decoded (``reader``: by the read tasks, ``gpu→cpu``:
        on the actor's CPU after its GPU could not) and the decode time a packed region took."""
        n = sum(self.decoded.values())
        m = self.moved
        pixels = self.decoded.get("reader", 0)
        packed = n - pixels
        parts = [f"transfer: {m.get('transfer_bytes', 0) / max(n, 1) / 1e6:.2f} MB a region through the object store"]
        if packed and m.get("tile_bytes"):
            parts[0] += f", {m['packed_bytes'] / m['tile_bytes']:.2f}× its compressed tiles"
        if pixels:
            parts.append(f"{pixels} of {n} regions moved as pixels")
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.decoded.items()))
        decode = f", {1e3 * m.get('decode_seconds', 0.0) / packed:.0f} ms a packed region" if packed else ""
        return "; ".join(parts) + f"; decoded: {where}{decode}"


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
    cfg = apply_geometry(cfg)  # a patch encoder's regions: its patches × 16 (models.geometry)
    shape = cluster_shape()
    actors = plan_actors(cfg.embed, shape)  # a setting no node can meet fails here, first
    if cfg.embed.decode == "gpu" and not actors.use_gpu:
        raise ConfigError(
            f"embed.decode=gpu but the model actors run on CPUs (embed.use_gpu={cfg.embed.use_gpu}, and the "
            "cluster's GPUs decide auto); set embed.decode=auto or cpu, or give the actors GPUs"
        )
    log.info("model actors: %s", actors)
    listed = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
    tiling = tile_run(cfg, listed)  # skips slides already tiled with the same spec
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    model, mid = build_model(cfg)
    dims = model.vit4k.embed_dim, model.vit256.embed_dim
    mean_column = store.mean_column(dims[1])  # encoders of other widths side by side
    plan = plan_run(
        store,
        [s.to_ref() for s in listed],
        spec_hash=cfg.tiling_spec_hash(),
        model_id=mid,
        regions_schema=regions_schema(*dims, mean_column),
        keep_versions_days=cfg.storage.keep_versions_days,
    )
    summary = EmbedSummary(tiling=tiling, model_id=mid, out=cfg.out, skipped=plan.skipped)
    progress = Progress("embed", total=0, unit="regions")  # drawn once there are regions to embed
    n_slides = len(plan.todo) + len(plan.carried)
    committer = RegionCommitter(
        store,
        expected=plan.expected,
        batch_slides=cfg.ray.write_batch_slides,
        replaces=plan.replaces,
        status_row=lambda sid, status, error, n: plan.status_row(
            sid, status=status, error=error, n_regions=n, seconds=time.perf_counter() - t0
        ),
        on_finished=lambda *_: progress.update(
            slides=f"{committer.counts.total()}/{n_slides}", failed=committer.counts["failed"] or None
        ),
    )
    for row in plan.carried:
        committer.add_slide(row)
    if plan.todo:
        ds, progress.total = _pipeline(cfg, store, plan, model, dims, actors, mean_column)
        summary.model_actors = actors.max_size or actors.min_size
        _consume(ds, cfg, actors, shape, progress, committer, summary)
    committer.close()
    progress.close()
    summary.take(committer)
    if plan.todo:
        summary.tables, summary.index = finish_run(
            store, keep_versions_days=cfg.storage.keep_versions_days, search=cfg.search if summary.ok else None
        )
    summary.seconds = time.perf_counter() - t0
    return summary


def _consume(
    ds,
    cfg: Config,
    actors: ActorPlan,
    shape: ClusterShape,
    progress: Progress,
    committer: RegionCommitter,
    summary: EmbedSummary,
) -> None:
    """The pipeline's rows into ``committer``, timing the driver's share; the first of them due
    within ``embed.actor_start_timeout_s`` (a model actor that never starts ends the job)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()  # all the driver's threads
    limit = cfg.embed.actor_start_timeout_s
    batches = first_within(  # an autoscaler that never delivers a model node: a message, not a hang
        ds.iter_batches(batch_size=None, batch_format="pyarrow"),
        timeout_s=limit,
        waiting=lambda s: waiting_line(actors, s, autoscaler_report()),
        timed_out=lambda s: ModelActorsNeverStarted(
            never_started(actors, shape, s, timeout_s=limit, autoscaler=autoscaler_report())
        ),
    )
    try:
        for batch in batches:
            progress.update(advance=batch.num_rows)
            committer.add(batch)
    except BaseException:
        committer.flush()  # what finished stays committed; a rerun does the rest
        raise
    summary.driver_cpu, summary.pipeline_seconds = time.process_time() - cpu0, time.perf_counter() - wall0


def _pipeline(
    cfg: Config, store: Store, plan: RunPlan, model, dims: tuple[int, int], actors: ActorPlan, mean_column: str
):
    """One streaming pipeline for the whole run: read tasks of ``embed.regions_per_task``
    regions, the model actors, fragment writes. The driver holds only the region coordinates
    (≈ 200 bytes a region) and the metadata that comes back. Returns the dataset and its number
    of regions."""
    coords = store.region_reads(plan.spec_hash, plan.todo, READ_COLUMNS)
    per_task = cfg.embed.regions_per_task
    blocks = [coords.slice(i, per_task) for i in range(0, coords.num_rows, per_task)]
    read_resources = dict(cfg.embed.read_resources) or None
    ds = ray.data.from_arrow(blocks)
    ds = ds.map(read_region, fn_kwargs=reader_kwargs(cfg), num_cpus=cfg.embed.read_cpus, resources=read_resources)
    ds = ds.map_batches(
        RegionEmbedder,
        fn_constructor_kwargs=dict(
            model_name=cfg.model.name,
            architecture=model.architecture,
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            micro_batch=cfg.model.micro_batch,
            precision=cfg.embed.precision,
            compile=cfg.embed.compile,
            use_gpu=actors.use_gpu,
            store_tokens=cfg.embed.store_tokens,
            schema=output_schema(*dims),
            threads=max(1, int(cfg.embed.actor_cpus)),
            decode=cfg.embed.decode,
            decode_threads=cfg.embed.decode_threads,
        ),
        batch_size=cfg.embed.actor_batch_regions,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=actors.min_size, max_size=actors.max_size),
        num_cpus=cfg.embed.actor_cpus,
        num_gpus=1 if actors.use_gpu else 0,
        memory=actors.memory_bytes,
        # Ray Data's own default for actor pools, said here because an argument the read tasks
        # lack keeps reads and model unfused (the memory request did, and may be 0 now)
        max_restarts=-1,
        resources=dict(cfg.embed.actor_resources) or None,
    )
    ds = ds.map_batches(  # the rows with embeddings go to the table from here, not the driver
        write_region_fragments,
        fn_kwargs=dict(
            uri=store.uri(REGIONS),
            schema=plan.regions_schema,
            model_id=plan.model_id,
            storage_options=store.options,
            columns={"mean256": mean_column} if mean_column != "mean256" else None,
        ),
        batch_size=cfg.embed.write_regions,
        batch_format="pyarrow",
        num_cpus=0.25,
        resources=read_resources,
    )
    return ds, coords.num_rows
