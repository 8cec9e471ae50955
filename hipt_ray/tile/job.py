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

from hipt_ray.config import Config
from hipt_ray.console import Progress
from hipt_ray.slides.manifest import SlideSpec, list_slides
from hipt_ray.slides.tiler import TileResult, make_cache, tile_slide
from hipt_ray.store import Store
from hipt_ray.store.commit import STATUSES, SlideCommitter, status_row
from hipt_ray.store.lease import writer_lease

log = logging.getLogger(__name__)


@dataclass
class TileSummary:
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    no_tissue: int = 0
    changed: int = 0  # completed before, but the file changed since: done again
    regions: int = 0
    seconds: float = 0.0
    out: str = ""
    qc_page: str = ""

    def count(self, committer: SlideCommitter) -> None:
        """Take the finished slides' counts from the run's committer."""
        for status in STATUSES:
            setattr(self, status, getattr(self, status) + committer.counts[status])
        self.regions += committer.regions

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

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
def _tile_task(spec: SlideSpec, cfg_dict: dict, spec_hash: str) -> TileResult:
    from hipt_ray.config import validate_config

    cfg = validate_config(cfg_dict)
    return tile_slide(spec, cfg, cache=make_cache(cfg), spec_hash=spec_hash)


def _base(spec: SlideSpec, spec_hash: str) -> dict:
    return {"slide_id": spec.slide_id, "uri": spec.uri, "spec_hash": spec_hash}


def _crashed(spec: SlideSpec, spec_hash: str, exc: BaseException) -> TileResult:
    """A status row for a slide whose task died (e.g. a decoder crash took the worker down)."""
    return TileResult(status_row(_base(spec, spec_hash), status="failed", error=(
        f"{spec.uri}: the worker processing this slide died ({type(exc).__name__}); "
        "the file may crash the slide decoder: check it opens with OpenSlide")))


def changed_slides(specs: list[SlideSpec], done: dict[str, dict], endpoint_url: str | None) -> set[str]:
    """Ids of completed slides (``done``: their status rows) whose file now has another size or
    ETag/mtime. A slide whose file cannot be checked now counts as unchanged (with a warning):
    a brief storage outage must not retire finished work."""
    from concurrent.futures import ThreadPoolExecutor

    from hipt_ray.storage import stat, with_retries
    from hipt_ray.store.tables import row_version, slide_version

    check = [s for s in specs if s.slide_id in done and done[s.slide_id]["uri"] == s.uri]

    def probe(spec: SlideSpec) -> str | None:
        try:
            info = with_retries(lambda: stat(spec.uri, endpoint_url), what=spec.uri)
        except Exception as exc:
            log.warning("%s: cannot check whether it changed since it was tiled (%s); keeping its regions",
                        spec.uri, exc)
            return None
        return spec.slide_id if slide_version(info.size, info.version) != row_version(done[spec.slide_id]) else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {sid for sid in pool.map(probe, check) if sid}


def run(cfg: Config, specs: list[SlideSpec] | None = None) -> TileSummary:
    """Tile every slide of ``cfg.slides`` (already listed as ``specs``, if given) into the
    tables under ``cfg.out``, holding the output's writer lease.

    Raises:
        OutputInUse: another run is writing ``cfg.out``.
    """
    assert cfg.slides and cfg.out, "tile needs slides and out"
    with writer_lease(cfg.out, "tile", endpoint_url=cfg.storage.s3_endpoint_url, ttl=cfg.storage.lease_seconds):
        return _run(cfg, specs)


def _run(cfg: Config, specs: list[SlideSpec] | None) -> TileSummary:
    t0 = time.perf_counter()
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    if specs is None:
        specs = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
    spec_hash = cfg.tiling_spec_hash()
    orphans = store.remove_orphans(spec_hash)
    if orphans:
        log.info("removed region rows of %d slides left half-written by an earlier run", len(orphans))
    done = store.done_rows(spec_hash)
    changed = changed_slides(specs, done, cfg.storage.s3_endpoint_url)
    if changed:
        log.info("%d slides changed since they were tiled (size or ETag/mtime): tiling them again", len(changed))
    refused = [s for s in specs if s.error]  # listed but unusable as they are (a shared id)
    specs = [s for s in specs if not s.error]
    todo = [s for s in specs if s.slide_id not in done or done[s.slide_id]["uri"] != s.uri or s.slide_id in changed]
    replaces = {s.slide_id for s in todo if s.slide_id in done}
    summary = TileSummary(total=len(specs) + len(refused), skipped=len(specs) - len(todo), changed=len(changed),
                          out=cfg.out)
    progress = Progress("tile", total=len(todo) + len(refused), unit="slides")
    committer = SlideCommitter(
        store, batch_slides=cfg.ray.write_batch_slides,
        replaces=replaces | {s.slide_id for s in refused if s.slide_id in done},
        on_finished=lambda *_: progress.update(committer.counts.total(), regions=committer.regions,
                                               failed=committer.counts["failed"] or None))
    for spec in refused:
        committer.add_slide(status_row(_base(spec, spec_hash), status="failed", error=spec.error))
    cfg_dict = cfg.to_dict()
    max_in_flight = cfg.ray.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[ray.ObjectRef, SlideSpec] = {}
    queue = list(reversed(todo))
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            spec = queue.pop()
            pending[_tile_task.remote(spec, cfg_dict, spec_hash)] = spec
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            spec = pending.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.RayError) as exc:
                result = _crashed(spec, spec_hash, exc)
            committer.add_slide(result.slide, result.regions)
    committer.close()
    progress.close()
    summary.count(committer)
    if cfg.qc.enabled:
        from hipt_ray.viz.qc_page import write_qc_page

        try:
            summary.qc_page = write_qc_page(cfg.out, spec_hash, endpoint_url=cfg.storage.s3_endpoint_url)
        except Exception:  # the page is a convenience: never fail the run for it
            log.warning("could not write the QC page", exc_info=True)
    summary.seconds = time.perf_counter() - t0
    return summary
