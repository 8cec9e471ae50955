"""The one place finished slides are counted and committed.

Both stages end a slide the same way: a ``slides`` status row (``ok``, ``failed`` or
``no_tissue``) committed after the slide's region rows (the visibility rule of
:mod:`hipt_ray.store.tables`), in batches so that a run of thousands of slides makes few
commits. The tile stage hands its region rows over with the slide (a few hundred bytes each);
the embedding job's workers wrote theirs as fragments, which
:class:`~hipt_ray.store.fragments.RegionCommitter` tracks on top of this class.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from hipt_ray.store.tables import SLIDES_SCHEMA

if TYPE_CHECKING:
    from lance import FragmentMetadata

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "no_tissue")


def status_row(
    base: Mapping,
    *,
    status: str,
    error: str = "",
    n_regions: int = 0,
    model_id: str | None = None,
    seconds: float | None = None,
) -> dict:
    """A ``slides`` row: the fields of ``base`` (a slide's tiling row, or just its id, uri and
    spec hash; any field it lacks is null) with this status, error and region count, stamped
    now."""
    assert status in STATUSES, status
    row = {f.name: base.get(f.name) for f in SLIDES_SCHEMA}
    row.update(status=status, error=error, n_regions=n_regions, time=datetime.now(UTC))
    if model_id is not None:
        row["model_id"] = model_id
    row["model_id"] = row["model_id"] or ""
    if seconds is not None:
        row["seconds"] = round(seconds, 3)
    return row


class SlideCommitter:
    """Counts finished slides and commits them in batches of ``batch_slides``: region rows
    first, then status rows.

    Args:
        store: the output's :class:`~hipt_ray.store.tables.Store`.
        batch_slides: status rows per commit.
        replaces: slides completed before whose file changed: once their new status row is
            committed, their other region rows are deleted (see ``Store.append_slides``).
        on_finished: called with (slide_id, status, error, n_regions) as each slide finishes
            (a progress line, say).
    """

    def __init__(
        self,
        store,
        *,
        batch_slides: int,
        replaces: Iterable[str] = (),
        on_finished: Callable[[str, str, str, int], None] | None = None,
    ) -> None:
        self.store, self.batch_slides = store, batch_slides
        self.replaces, self.on_finished = set(replaces), on_finished
        self.counts: Counter[str] = Counter()  # status → slides finished
        self.regions = 0  # regions of the slides finished ok
        self.commits = 0
        self.commit_seconds = 0.0  # wall time spent committing
        self._rows: list[dict] = []  # status rows not yet committed
        self._region_rows: list[dict] = []

    def add_slide(self, row: dict, regions: Iterable[dict] = ()) -> None:
        """A finished slide: its status row (see :func:`status_row`) and region rows."""
        self._finished(row["slide_id"], row["status"], row["error"], row["n_regions"])
        self._rows.append(row)
        self._region_rows.extend(regions)
        if len(self._rows) >= self.batch_slides:
            self.flush()

    def _finished(self, sid: str, status: str, error: str, n_regions: int) -> None:
        self.counts[status] += 1
        if status == "ok":
            self.regions += n_regions
        elif status == "failed":
            log.warning("failed: %s", error)
        if self.on_finished:
            self.on_finished(sid, status, error, n_regions)

    def flush(self) -> None:
        """Commit what has finished."""
        self._commit(self._rows, self._region_rows)
        self._rows, self._region_rows = [], []

    def _commit(
        self,
        rows: list[dict],
        region_rows: Sequence[dict] = (),
        fragments: Sequence[FragmentMetadata] = (),
        replaces: Iterable[str] = (),
    ) -> None:
        if not rows and not fragments:
            return
        t0 = time.perf_counter()
        self.store.append_slides(rows, list(region_rows), fragments=fragments, replaces=self.replaces | set(replaces))
        self.commits += bool(region_rows or fragments) + bool(rows)
        self.commit_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """The end of the run: commit the rest."""
        self.flush()
