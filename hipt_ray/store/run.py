"""A run's life in the store: :func:`plan_run` before the work, :func:`finish_run` after it.

Both stages (``tile`` and ``embed``) write slides the same way, so the store decides for both
what a run does: it removes what an earlier run left half-written, finds the slides already
done, and plans the rest. One rule says what is done: a slide whose latest completed row for
this tiling spec and model names the same file (URI and version) as the slide has now. "Now"
is one layer down: for tiling, the file in storage (its size and ETag/mtime); for embedding,
the slide as tiled (the tile stage has just retiled any file that changed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pyarrow as pa

from hipt_ray.slide_ref import SlideRef, same_version, slide_version
from hipt_ray.storage import stat, with_retries
from hipt_ray.store.commit import status_row
from hipt_ray.store.tables import Store, row_version, slide_ref
from hipt_ray.store.vectors import refresh_index

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What a run is to do.

    Attributes:
        spec_hash, model_id: the tiling spec and model ("" for tiling) of the run.
        todo: the slides to process, in order.
        skipped: listed slides already done with their current file.
        changed: slides done before whose file changed since: in ``todo`` again.
        carried: status rows to commit as they are (slides refused before any work: an id two
            files share; for embedding, slides that tiling failed or found empty).
        replaces: slides whose new status row replaces an earlier completed one (their other
            region rows are deleted once it is committed).
        base: slide_id → the row each ``todo`` slide's status row starts from.
        regions_schema: the schema workers writing ``regions.lance`` fragments must write
            (set when :func:`plan_run` was given the columns of an embedding and there is work).
    """

    spec_hash: str
    model_id: str
    todo: list[SlideRef] = field(default_factory=list)
    skipped: int = 0
    changed: int = 0
    carried: list[dict] = field(default_factory=list)
    replaces: set[str] = field(default_factory=set)
    base: dict[str, dict] = field(default_factory=dict)
    regions_schema: pa.Schema | None = None

    @property
    def expected(self) -> dict[str, int]:
        """slide_id → the number of regions each ``todo`` slide was tiled with."""
        return {r.slide_id: int(self.base[r.slide_id].get("n_regions") or 0) for r in self.todo}

    def status_row(
        self, slide_id: str, *, status: str, error: str = "", n_regions: int = 0, seconds: float | None = None
    ) -> dict:
        """The ``slides`` row that ends ``todo`` slide ``slide_id`` for this run."""
        return status_row(
            self.base[slide_id],
            status=status,
            error=error,
            n_regions=n_regions,
            model_id=self.model_id,
            seconds=seconds,
        )


def plan_run(
    store: Store,
    slides: Sequence[SlideRef],
    *,
    spec_hash: str,
    model_id: str = "",
    refused: Sequence[tuple[SlideRef, str]] = (),
    regions_schema: pa.Schema | None = None,
    keep_versions_days: float = 7.0,
    endpoint_url: str | None = None,
) -> RunPlan:
    """Plan a run over ``slides`` (as listed) under the writer lease.

    Removes region rows no reader takes (a killed run's, an earlier file version's); for an
    embedding (``model_id`` set) with work to do, also the files of fragments an earlier run
    wrote but never committed, and makes ``regions.lance`` hold ``regions_schema``'s columns.

    Args:
        refused: listed slides that cannot be processed as listed, each with the reason: they
            fail with it.
        endpoint_url: the object store's endpoint (tiling probes the files).
    """
    if orphans := store.remove_orphans(spec_hash, model_id):
        log.info("removed region rows of %d slides left half-written by an earlier run", len(orphans))
    done = store.done_rows(spec_hash, model_id)
    plan = RunPlan(spec_hash=spec_hash, model_id=model_id)
    if model_id:
        current = _as_tiled(store, plan, slides, done)
    else:
        current = {r.slide_id: r for r in slides}
        plan.base = {r.slide_id: _listed(r, spec_hash) for r in slides}
        plan.carried = [status_row(_listed(r, spec_hash), status="failed", error=error) for r, error in refused]
        now = file_versions(
            [r for r in slides if r.slide_id in done and done[r.slide_id]["uri"] == r.uri], endpoint_url
        )
        current = {sid: replace(r, version=now.get(sid)) for sid, r in current.items()}
    for sid, ref in current.items():
        earlier = done.get(sid)
        if earlier is not None and earlier["uri"] == ref.uri:  # listed before: skip unless its file changed
            if ref.version is None or same_version(row_version(earlier), ref.version):
                plan.skipped += 1
                continue
            plan.changed += 1
        plan.todo.append(ref if model_id else replace(ref, version=None))
    if plan.changed:
        log.info(
            "%d slides changed since they were %s (size, ETag/mtime or content): doing them again",
            plan.changed,
            "embedded" if model_id else "tiled",
        )
    plan.replaces = {r.slide_id for r in plan.todo if r.slide_id in done} | {
        row["slide_id"] for row in plan.carried if row["slide_id"] in done
    }
    if model_id and plan.todo and regions_schema is not None:
        if removed := store.remove_uncommitted(keep_versions_days):
            log.info("removed %.1f MB of region files an earlier run wrote but never committed", removed / 1e6)
        plan.regions_schema = store.prepare_regions(regions_schema)
    return plan


def _listed(ref: SlideRef, spec_hash: str) -> dict:
    """The fields of a slide's ``slides`` row known from its listing, before it is opened."""
    return {"slide_id": ref.slide_id, "uri": ref.uri, "spec_hash": spec_hash, "case_id": ref.case_id}


def _as_tiled(store: Store, plan: RunPlan, slides: Sequence[SlideRef], done: dict[str, dict]) -> dict[str, SlideRef]:
    """For an embedding: the listed slides as their tiling found them. Slides tiling failed or
    found empty get that status for this model too (``carried``), unless already done."""
    wanted = {r.slide_id for r in slides}
    tiled = {r["slide_id"]: r for r in store.latest_slides(plan.spec_hash, "").to_pylist() if r["slide_id"] in wanted}
    current = {}
    for sid in sorted(tiled):
        row = tiled[sid]
        if row["status"] == "ok":
            plan.base[sid], current[sid] = row, slide_ref(row)
        elif sid not in done or row_version(done[sid]) != row_version(row):
            plan.carried.append(status_row(row, status=row["status"], error=row["error"], model_id=plan.model_id))
    plan.skipped = sum(
        1
        for sid in wanted
        if sid in done
        and sid in tiled
        and tiled[sid]["status"] != "ok"
        and row_version(done[sid]) == row_version(tiled[sid])
    )
    return current


def file_versions(slides: Sequence[SlideRef], endpoint_url: str | None) -> dict[str, str]:
    """slide_id → :func:`slide_version` of each slide's file now. A file that cannot be checked
    now is left out (with a warning): a brief storage outage must not retire finished work."""

    def probe(ref: SlideRef) -> tuple[str, str | None]:
        try:
            info = with_retries(lambda: stat(ref.uri, endpoint_url), what=ref.uri)
        except Exception as exc:
            log.warning(
                "%s: cannot check whether it changed since it was tiled (%s); keeping its regions", ref.uri, exc
            )
            return ref.slide_id, None
        return ref.slide_id, slide_version(info.size, info.version)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return {sid: v for sid, v in pool.map(probe, slides) if v is not None}


def finish_run(store: Store, *, keep_versions_days: float, search=None) -> tuple[str, str]:
    """The end of a run that wrote: tidy the tables (see :meth:`Store.tidy`) and, given the
    search settings, fold the new regions into the similar-region index (searches stay exact
    meanwhile; a failure only warns). Returns (what is left in the tables, what the index
    refresh did). Safe only under the writer lease."""
    tables, index = store.tidy(keep_versions_days), ""
    if search is not None:
        try:
            index = refresh_index(store, search)
        except Exception as exc:
            log.warning("vector index not refreshed (searches still see every region): %s", exc)
    return tables, index
