"""The ``tile`` stage: every slide → status row, region rows and QC PNG, as Ray tasks.

The driver keeps a bounded number of slide tasks in flight and commits finished slides to Lance
in batches, so memory does not grow with the number of slides. Slides already completed for
the same tiling spec are skipped, which makes a rerun after a crash resume where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from hipt_ray.config import Config, validate_config
from hipt_ray.console import Progress
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides.manifest import SlideSpec, list_slides
from hipt_ray.slides.tiler import TileResult, make_cache, tile_slide
from hipt_ray.store import Store
from hipt_ray.store.commit import STATUSES, SlideCommitter, status_row
from hipt_ray.store.lease import writer_lease
from hipt_ray.store.run import RunPlan, plan_run
from hipt_ray.viz.qc_page import write_qc_page

log = logging.getLogger(__name__)


@dataclass
class SlideCounts:
    """How the slides of a run ended (both stages count them the same way)."""

    ok: int = 0
    failed: int = 0
    no_tissue: int = 0
    skipped: int = 0  # done before with the same file
    regions: int = 0

    def count(self, committer: SlideCommitter) -> None:
        """Take the finished slides' counts from the run's committer."""
        for status in STATUSES:
            setattr(self, status, getattr(self, status) + committer.counts[status])
        self.regions += committer.regions

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0


@dataclass
class TileSummary(SlideCounts):
    total: int = 0
    changed: int = 0  # completed before, but the file changed since: done again
    seconds: float = 0.0
    out: str = ""
    qc_page: str = ""

    def lines(self) -> list[str]:
        rate = (self.ok + self.failed + self.no_tissue) / self.seconds if self.seconds else 0.0
        return [
            f"slides: {self.total} ({self.ok} ok, {self.failed} failed, {self.no_tissue} no tissue, "
            f"{self.skipped} already done" + (f", {self.changed} changed since and redone)" if self.changed else ")"),
            f"regions: {self.regions}",
            f"time: {self.seconds:.1f} s ({rate:.2f} slides/s)",
            f"outputs: {self.out}/slides.lance, {self.out}/regions.lance, {self.out}/qc/",
        ] + ([f"QC page: {self.qc_page}"] if self.qc_page else [])


@ray.remote(num_cpus=1, max_retries=1)
def _tile_task(ref: SlideRef, cfg_dict: dict, spec_hash: str) -> TileResult:
    cfg = validate_config(cfg_dict)
    return tile_slide(ref, cfg, cache=make_cache(cfg), spec_hash=spec_hash)


def _status(plan: RunPlan, ref: SlideRef, task: ray.ObjectRef) -> tuple[dict, list[dict]]:
    """The status row and region rows of the slide ``task`` tiled; a task that died (a decoder
    crash took the worker down, say) fails its slide with that reason."""
    try:
        result: TileResult = ray.get(task)
    except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as exc:
        return plan.status_row(
            ref.slide_id,
            status="failed",
            error=(
                f"{ref.uri}: the worker processing this slide died ({type(exc).__name__}); "
                "the file may crash the slide decoder: check it opens with OpenSlide"
            ),
        ), []
    found = result.slide
    return status_row(
        found, status=found["status"], error=found["error"], n_regions=found["n_regions"], seconds=found["seconds"]
    ), result.regions


def run(cfg: Config, specs: list[SlideSpec] | None = None) -> TileSummary:
    """Tile every slide of ``cfg.slides`` (already listed as ``specs``, if given) into the
    tables under ``cfg.out``, holding the output's writer lease.

    Raises:
        OutputInUse: another run is writing ``cfg.out``.
    """
    assert cfg.slides and cfg.out, "tile needs slides and out"
    if cfg.model.patch_encoder is not None:
        # imported here: the tile tasks' workers unpickle this module and need no torch or timm
        from hipt_ray.models.geometry import apply_geometry

        cfg = apply_geometry(cfg)  # the encoder's patches × 16 (models.geometry)
    with writer_lease(cfg.out, "tile", endpoint_url=cfg.storage.s3_endpoint_url, ttl=cfg.storage.lease_seconds):
        return _run(cfg, specs)


def _run(cfg: Config, specs: list[SlideSpec] | None) -> TileSummary:
    t0 = time.perf_counter()
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    if specs is None:
        specs = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
    overrides = cfg.tiling.mpp_overrides
    plan = plan_run(
        store,
        [s.to_ref(overrides) for s in specs if not s.error],
        spec_hash=cfg.tiling_spec_hash(),
        refused=[(s.to_ref(overrides), s.error) for s in specs if s.error],
        endpoint_url=cfg.storage.s3_endpoint_url,
    )
    summary = TileSummary(total=len(specs), skipped=plan.skipped, changed=plan.changed, out=cfg.out)
    progress = Progress("tile", total=len(plan.todo) + len(plan.carried), unit="slides")
    committer = SlideCommitter(
        store,
        batch_slides=cfg.ray.write_batch_slides,
        replaces=plan.replaces,
        on_finished=lambda *_: progress.update(
            committer.counts.total(), regions=committer.regions, failed=committer.counts["failed"] or None
        ),
    )
    for row in plan.carried:
        committer.add_slide(row)
    _tile_all(cfg, plan, committer)
    committer.close()
    progress.close()
    summary.count(committer)
    if cfg.qc.enabled:
        try:
            summary.qc_page = write_qc_page(cfg.out, plan.spec_hash, endpoint_url=cfg.storage.s3_endpoint_url)
        except Exception:  # the page is a convenience: never fail the run for it
            log.warning("could not write the QC page", exc_info=True)
    summary.seconds = time.perf_counter() - t0
    return summary


def _tile_all(cfg: Config, plan: RunPlan, committer: SlideCommitter) -> None:
    """One Ray task per slide of ``plan.todo``, a bounded number in flight (memory does not grow
    with the number of slides); each finished slide goes to ``committer``."""
    cfg_dict = cfg.to_dict()
    max_in_flight = cfg.ray.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[ray.ObjectRef, SlideRef] = {}
    queue = list(reversed(plan.todo))
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            ref = queue.pop()
            pending[_tile_task.remote(ref, cfg_dict, plan.spec_hash)] = ref
        ready, _ = ray.wait(list(pending), num_returns=1)
        for task in ready:
            committer.add_slide(*_status(plan, pending.pop(task), task))
