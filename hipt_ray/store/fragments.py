"""Region rows written where they are made, committed by the driver as metadata.

At cluster scale the rows with embeddings (≈ 200 KB a region with ``tokens256``) must not pass
through one process. Workers write them as Lance fragments straight to ``OUT/regions.lance``
(:func:`write_region_fragments`) and return only a few bytes per region: its slide, index and
error, and each fragment's metadata. The driver's :class:`RegionCommitter` collects those,
counts each slide's regions against the number it was tiled with, and commits the fragments of
finished slides (a Lance ``Append`` transaction) before their status rows: the store's
visibility rule (see :mod:`hipt_ray.store.tables`). Files of fragments that were written but
never committed (a run killed mid-way, a retried write) belong to no version; the next run
deletes them (:meth:`Store.remove_uncommitted <hipt_ray.store.tables.Store.remove_uncommitted>`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable

import pyarrow as pa

from hipt_ray.storage import describe_error, with_retries
from hipt_ray.store.commit import SlideCommitter

log = logging.getLogger(__name__)

# What a write returns to the driver: one row per region it was given.
META_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("region_index", pa.int32()),
        ("error", pa.string()),  # "" when the region's row was written
        ("fragment", pa.string()),  # key of the fragment holding the row ("" when not written)
        ("fragment_json", pa.string()),  # the fragment's metadata, on its first row only
        ("read_node", pa.string()),
        ("model_node", pa.string()),
        ("read_seconds", pa.float32()),  # how long the region's read and its model call took
        ("model_seconds", pa.float32()),
        ("decoded", pa.string()),  # where its tiles were decoded: reader | cpu | gpu | gpu→cpu
        ("decode_seconds", pa.float32()),  # decoding next to the model
        ("transfer_bytes", pa.int64()),  # what its row moved through the object store to the model
        ("tile_bytes", pa.int64()),  # of which compressed tiles (0: it moved pixels)
    ]
)
_PASSED = META_SCHEMA.names[META_SCHEMA.names.index("read_node") :]  # passed on from the model's rows


def write_region_fragments(
    batch: pa.Table, *, uri: str, schema: pa.Schema, model_id: str, storage_options: dict | None = None
) -> pa.Table:
    """Write the rows of ``batch`` without an error as fragments of the table at ``uri``
    (whose schema is ``schema``), one per slide, and return :data:`META_SCHEMA` rows, one per
    input row. A write that fails after retries marks its rows with the error instead of
    raising: the driver fails that slide and the run goes on."""
    from lance.fragment import write_fragments

    n = batch.num_rows
    errors = [e or "" for e in batch["error"].to_pylist()]
    ok = pa.array([not e for e in errors])
    frag_keys, frag_json = [""] * n, [""] * n
    good = batch.filter(ok)
    if good.num_rows:
        good = good.append_column("model_id", pa.array([model_id] * good.num_rows, pa.string()))
        data = pa.table(
            {
                f.name: (good[f.name].cast(f.type) if f.name in good.column_names else pa.nulls(good.num_rows, f.type))
                for f in schema
            },
            schema=schema,
        )
        rows = [i for i in range(n) if not errors[i]]
        sids = good["slide_id"].to_pylist()
        for sid in dict.fromkeys(sids):  # one fragment per slide: it commits when its slide is done
            mine = [j for j, s in enumerate(sids) if s == sid]
            part = data.take(mine)
            try:
                frags = with_retries(lambda: write_fragments(part, uri, storage_options=storage_options), what=uri)
            except Exception as exc:  # noqa: BLE001 - the driver fails this slide with this reason
                for j in mine:
                    errors[rows[j]] = f"writing region rows to {describe_error(uri, exc)}"
                continue
            start = 0
            for frag in frags:
                key = uuid.uuid4().hex
                for j in mine[start : start + frag.physical_rows]:
                    frag_keys[rows[j]] = key
                frag_json[rows[mine[start]]] = json.dumps(frag.to_json())
                start += frag.physical_rows
            if start != len(mine):  # a short write would be a silent loss: fail the slide
                for j in mine:
                    errors[rows[j]] = f"writing region rows to {uri}: {start} of {len(mine)} rows written"
                    frag_keys[rows[j]] = frag_json[rows[j]] = ""
    passed = {
        c: batch[c].cast(META_SCHEMA.field(c).type)
        if c in batch.column_names
        else pa.nulls(n, META_SCHEMA.field(c).type)
        for c in _PASSED
    }
    return pa.table(
        {
            "slide_id": batch["slide_id"],
            "region_index": batch["region_index"].cast(pa.int32()),
            "error": errors,
            "fragment": frag_keys,
            "fragment_json": frag_json,
            **passed,
        },
        schema=META_SCHEMA,
    )


class RegionCommitter(SlideCommitter):
    """The driver's side: slides complete when all their regions came back; finished slides are
    committed in batches of ``batch_slides``, fragments first, then status rows.

    A fragment is committed once every slide with rows in it is finished (workers write one
    fragment per slide, so that is its slide), and a slide's status row only once all its
    fragments are committed, so a status row never names regions that are not in the table.
    Rows of a slide that failed (one of its regions did) are deleted right after their fragments
    are committed. Slides that finished without reaching the pipeline (tiling failed them, say)
    come in through :meth:`add_slide <hipt_ray.store.commit.SlideCommitter.add_slide>` and
    share the batches.

    Args:
        store, batch_slides, replaces, on_finished: as for
            :class:`~hipt_ray.store.commit.SlideCommitter`.
        expected: slide_id → the number of regions it was tiled with.
        status_row: (slide_id, status, error, n_regions) → its ``slides`` row.
    """

    def __init__(
        self,
        store,
        *,
        expected: dict[str, int],
        status_row: Callable[..., dict],
        batch_slides: int,
        replaces: Iterable[str] = (),
        on_finished: Callable[[str, str, str, int], None] | None = None,
    ) -> None:
        super().__init__(store, batch_slides=batch_slides, replaces=replaces, on_finished=on_finished)
        self.expected, self.status_row = expected, status_row
        self.got: dict[str, set[int]] = defaultdict(set)
        self.error: dict[str, str] = {}
        self.slide_frags: dict[str, set[str]] = defaultdict(set)
        self.frag_slides: dict[str, set[str]] = defaultdict(set)
        self.frag_meta: dict[str, str] = {}
        self.done: dict[str, str] = {}  # slide → ok | failed, not yet committed
        self.committed_frags: set[str] = set()
        self.committed: set[str] = set()
        self.duplicates = 0
        self.fragments = self.bytes_in = 0
        self.nodes: dict[str, dict[str, int]] = {"read": defaultdict(int), "model": defaultdict(int)}
        self.stage_seconds = {"read": 0.0, "model": 0.0}  # summed over the regions that came back
        self.returned = 0  # regions that came back once (ok or failed)
        self.decoded: dict[str, int] = defaultdict(int)  # where regions were decoded → regions
        # summed over regions: bytes moved to the model (all, and those of packed regions), their
        # compressed tile bytes, and the seconds spent decoding them there
        self.moved = {"transfer_bytes": 0, "packed_bytes": 0, "tile_bytes": 0, "decode_seconds": 0.0}

    def add(self, meta: pa.Table) -> None:
        """One batch of :data:`META_SCHEMA` rows."""
        self.bytes_in += meta.nbytes
        touched = set()
        for r in meta.to_pylist():
            sid, idx = r["slide_id"], r["region_index"]
            if idx in self.got[sid] or sid in self.committed:
                self.duplicates += 1  # readers still return each region once
                continue
            self.got[sid].add(idx)
            self.returned += 1
            touched.add(sid)
            if r["error"] and sid not in self.error:
                self.error[sid] = r["error"]
            if r["fragment"]:
                self.slide_frags[sid].add(r["fragment"])
                self.frag_slides[r["fragment"]].add(sid)
            if r["fragment_json"]:
                self.frag_meta[r["fragment"]] = r["fragment_json"]
                self.fragments += 1
            for kind in ("read", "model"):
                if r[f"{kind}_node"]:
                    self.nodes[kind][r[f"{kind}_node"]] += 1
                self.stage_seconds[kind] += r[f"{kind}_seconds"] or 0.0
            if r["decoded"]:
                self.decoded[r["decoded"]] += 1
            for k in ("transfer_bytes", "tile_bytes", "decode_seconds"):
                self.moved[k] += r[k] or 0
            if r["tile_bytes"]:
                self.moved["packed_bytes"] += r["transfer_bytes"] or 0
        for sid in touched:
            if sid not in self.done and len(self.got[sid]) >= self.expected.get(sid, 0):
                self._done(sid, "failed" if sid in self.error else "ok", self.error.get(sid, ""))
        if len(self._ready()[1]) + len(self._rows) >= self.batch_slides:
            self.flush()

    def _done(self, sid: str, status: str, error: str) -> None:
        self.done[sid] = status
        self.error.setdefault(sid, error)
        self._finished(sid, status, error, len(self.got[sid]) if status == "ok" else 0)

    def _ready(self) -> tuple[list[str], list[str]]:
        """(fragments that may be committed, finished slides whose fragments all are)."""
        frags = [
            k
            for k, slides in self.frag_slides.items()
            if k not in self.committed_frags and all(s in self.done or s in self.committed for s in slides)
        ]
        can = self.committed_frags | set(frags)
        slides = [s for s in self.done if self.slide_frags.get(s, set()) <= can]
        return frags, slides

    def flush(self) -> None:
        from lance.fragment import FragmentMetadata

        frags, slides = self._ready()
        missing = [k for k in frags if k not in self.frag_meta]
        if missing:  # cannot happen: a fragment's metadata travels with its rows
            raise RuntimeError(f"fragments without metadata: {missing[:3]}")
        rows = [
            self.status_row(s, self.done[s], self.error.get(s, ""), len(self.got[s]) if self.done[s] == "ok" else 0)
            for s in slides
        ]
        failed_with_rows = [s for s in slides if self.done[s] == "failed" and self.slide_frags.get(s)]
        self._commit(
            self._rows + rows,
            self._region_rows,
            fragments=[FragmentMetadata.from_json(self.frag_meta[k]) for k in frags],
            replaces=failed_with_rows,
        )
        self._rows, self._region_rows = [], []
        self.committed_frags.update(frags)
        for k in frags:
            del self.frag_slides[k], self.frag_meta[k]
        for s in slides:
            del self.done[s]
            self.committed.add(s)
            self.got.pop(s, None)
            self.slide_frags.pop(s, None)

    def close(self) -> None:
        """End of the stream: slides with regions missing fail with that reason; all commit."""
        for sid, n in self.expected.items():
            if sid not in self.done and sid not in self.committed:
                have = len(self.got.get(sid, ()))
                self._done(
                    sid,
                    "failed",
                    self.error.get(sid)
                    or (f"{sid}: only {have} of {n} regions came back from the pipeline; rerun to retry"),
                )
        self.flush()
