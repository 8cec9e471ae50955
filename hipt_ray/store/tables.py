"""The Lance tables under an output URI: ``OUT/slides.lance`` and ``OUT/regions.lance``.

Visibility rule: a slide's region rows are committed *before* its status row, and readers only
trust regions whose slide has a completed status row for the same tiling spec and model. A job
killed between the two commits leaves orphan regions that :func:`remove_orphans` deletes on the
next run, so a rerun never sees a half-written slide.

Every region row also records ``slide_version``, the size and ETag (or mtime) of the file it was
cut from. A slide whose file changed is tiled and embedded again; readers take only the regions
of the version its newest status row names, so the new grid replaces the old one at the commit
of that status row, and the old rows are deleted right after. Readers also return each
``(slide_id, region_index)`` once, whatever an older table (or a run of an older version) holds.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hipt_ray.config import InputError
from hipt_ray.slide_ref import SlideRef, slide_version
from hipt_ray.storage import OutputStoreError, is_remote, join, lance_retry_options, output_error, with_retries
from hipt_ray.store.lease import check_lease

SLIDES = "slides.lance"
REGIONS = "regions.lance"
DONE_STATUSES = ("ok", "no_tissue")
# ≈ 200 MB files with tokens256 (≈ 200 KB a row): big enough for fast scans, small enough to
# rewrite when rows are deleted
REGION_ROWS_PER_FRAGMENT = 1024

SLIDES_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("vendor", pa.string()),
        ("mpp", pa.float64()),  # the slide's level-0 MPP
        ("mpp_source", pa.string()),  # metadata | objective | override
        ("width", pa.int64()),  # level-0 pixels
        ("height", pa.int64()),
        ("n_regions", pa.int32()),
        ("status", pa.string()),  # ok | failed | no_tissue
        ("error", pa.string()),
        ("spec_hash", pa.string()),  # tiling + tissue settings
        ("model_id", pa.string()),  # "" until a model has embedded the slide
        ("qc_uri", pa.string()),
        ("backend", pa.string()),  # what read the pixels: tiles | openslide
        ("seconds", pa.float64()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("case_id", pa.string()),  # the patient, when the slide source says (idc:, a manifest); null before it
    ]
)

REGIONS_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("region_index", pa.int32()),
        ("x", pa.int64()),  # level-0 pixels, top-left corner
        ("y", pa.int64()),
        ("level", pa.int32()),  # pyramid level read
        ("level0_w", pa.int64()),  # level-0 pixels covered
        ("level0_h", pa.int64()),
        ("read_w", pa.int32()),  # pixels at the target MPP (multiple of the patch size)
        ("read_h", pa.int32()),
        ("valid_w", pa.int32()),  # of which slide content; the rest is white padding
        ("valid_h", pa.int32()),
        ("mpp", pa.float64()),  # target MPP of the region pixels
        ("read_mpp", pa.float64()),  # MPP of the pyramid level read before resampling
        ("mpp_source", pa.string()),
        ("tissue_fraction", pa.float32()),
        ("spec_hash", pa.string()),
        ("model_id", pa.string()),  # "" for rows written by `tile` (no embeddings)
        ("slide_version", pa.string()),  # "size:etag" of the slide file; null in tables before it
    ]
)


def row_version(row: dict) -> str:
    """:func:`slide_version` of a ``slides.lance`` row."""
    return slide_version(row.get("size"), row.get("etag"))


def recorded_override(row: dict | None) -> float | None:
    """The MPP to reopen a tiled slide with, from its ``slides.lance`` row: the override its
    tiling used (a manifest ``mpp`` or ``tiling.mpp_overrides``), else ``None`` (its metadata
    gives the recorded MPP again)."""
    if row and row.get("mpp_source") == "override" and row.get("mpp"):
        return float(row["mpp"])
    return None


def slide_ref(row: dict) -> SlideRef:
    """The reference of the slide a ``slides.lance`` row describes: every later reader opens it
    with the MPP override its tiling used and refuses a file that is no longer that version."""
    return SlideRef(
        slide_id=row["slide_id"],
        uri=row["uri"],
        mpp_override=recorded_override(row),
        version=row_version(row),
        case_id=row.get("case_id"),
    )


def sql_string(value: str) -> str:
    """``value`` as an SQL string literal (quotes doubled): every value a filter names."""
    return "'" + value.replace("'", "''") + "'"


def tokens_to_grid(tokens: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A region's ``tokens256`` as stored, flattened row-major ``[rows·cols·D]`` → grid
    ``[D, rows, cols]``."""
    return np.ascontiguousarray(tokens.reshape(rows, cols, -1).transpose(2, 0, 1))  # (rows, cols, D) → (D, rows, cols)


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_string(v) for v in values)})"


MEAN = "mean256"


def embedding_fields(dim4k: int, dim256: int, mean_column: str = MEAN) -> list[pa.Field]:
    """Columns the embedding job adds to ``regions``: fixed-size vectors (what vector indexes
    need) and the per-patch tokens, row-major, flattened (``read_h/256 · read_w/256 · dim256``
    values; a full region has 256·384). The mean of the patch embeddings goes to ``mean_column``
    (see :meth:`Store.mean_column`: patch encoders of other widths side by side in one table)."""
    return [
        pa.field("emb4k", pa.list_(pa.float32(), dim4k)),
        pa.field(mean_column, pa.list_(pa.float32(), dim256)),
        pa.field("tokens256", pa.list_(pa.float16())),
    ]


def _mean_columns(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n == MEAN or n.startswith(f"{MEAN}_")]


def lance_storage_options(out: str, endpoint_url: str | None = None) -> dict[str, str] | None:
    """Lance's object-store options (its retries within storage.retry_seconds); without an
    explicit endpoint it reads the AWS variables."""
    if not is_remote(out):
        return None
    opts = lance_retry_options()
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return opts
    opts["aws_endpoint"] = endpoint
    if endpoint.startswith("http://"):
        opts["allow_http"] = "true"
    return opts


class Store:
    """Reads and appends the tables under ``out`` (a local path or ``s3://`` URI)."""

    def __init__(self, out: str, *, endpoint_url: str | None = None) -> None:
        self.out = out
        self.options = lance_storage_options(out, endpoint_url)

    def uri(self, table: str) -> str:
        return join(self.out, table)

    def _io(self, table: str, fn):
        """``fn()`` against the store, retried on transient errors; any other failure becomes one
        :class:`OutputStoreError` line naming the table, the cause and the fix."""
        try:
            return with_retries(fn, what=self.uri(table))
        except OutputStoreError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, ValueError) and "lanceerror(io)" not in str(exc).lower():
                raise  # a bad filter or schema: our bug or the caller's, not the store's
            raise output_error(self.uri(table), exc) from None

    def dataset(self, table: str) -> lance.LanceDataset | None:
        def open_():
            try:
                return lance.dataset(self.uri(table), storage_options=self.options)
            except (FileNotFoundError, ValueError, OSError) as exc:
                if isinstance(exc, FileNotFoundError) or "was not found" in str(exc).lower():
                    return None
                raise

        return self._io(table, open_)

    def existing(self, table: str) -> lance.LanceDataset:
        """``table``, which must exist by now: this run created or changed it under the writer
        lease, or a finished stage wrote it."""
        ds = self.dataset(table)
        if ds is None:
            raise OutputStoreError(
                f"output {self.uri(table)}: the table is missing (deleted while in use?); rerun the "
                "stage that writes it (tile, then embed)",
                config=False,
            )
        return ds

    def read(self, table: str, *, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        ds = self.dataset(table)
        schema = SLIDES_SCHEMA if table == SLIDES else REGIONS_SCHEMA
        if ds is None:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return self._io(table, lambda: ds.to_table(columns=columns, filter=filter))

    def _append(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        check_lease(self.out)  # a run whose lease was taken over commits nothing more
        ds = self.dataset(table)
        if ds is None:
            self._io(
                table, lambda: lance.write_dataset(data, self.uri(table), mode="create", storage_options=self.options)
            )
            return
        ds = self._with_columns(table, ds, data.schema)
        data = data.select([n for n in ds.schema.names if n in data.schema.names])
        self._io(table, lambda: lance.write_dataset(data, self.uri(table), mode="append", storage_options=self.options))

    def _with_columns(self, table: str, ds: lance.LanceDataset, schema: pa.Schema) -> lance.LanceDataset:
        """``ds`` with every column of ``schema`` (missing ones added all-null, e.g. embeddings
        on a table `tile` created); a column stored with another type is an error."""
        missing = [f for f in schema if f.name not in ds.schema.names]
        if missing:
            self._io(table, lambda: ds.add_columns(missing))
            ds = self.existing(table)
        for f in schema:
            have = ds.schema.field(f.name).type
            if have != f.type:
                raise ValueError(
                    f"{self.uri(table)} stores {f.name} as {have}, this run writes {f.type} "
                    "(a model of another size?): write to a new --out"
                )
        return ds

    def mean_column(self, dim256: int) -> str:
        """Where a patch encoder of width ``dim256`` keeps ``mean256`` in this output's regions
        table: ``mean256`` when the table has none yet or has it at that width, else
        ``mean256_<dim256>`` (so UNI's 1024-d means sit beside HIPT's 384-d ones; ``emb4k``,
        192-d for every ViT-4K XS, and the variable-length ``tokens256`` are shared)."""
        ds = self.dataset(REGIONS)
        if ds is None or MEAN not in ds.schema.names or ds.schema.field(MEAN).type.list_size == dim256:
            return MEAN
        return f"{MEAN}_{dim256}"

    def mean_column_of(self, model_id: str) -> str:
        """The column holding ``mean256`` for the rows of ``model_id`` (see :meth:`mean_column`)."""
        ds = self.dataset(REGIONS)
        names = _mean_columns(ds.schema) if ds is not None else []
        if ds is None or len(names) <= 1:
            return MEAN
        row = self._io(
            REGIONS, lambda: ds.to_table(columns=names, filter=f"model_id = {sql_string(model_id)}", limit=1)
        )
        return next((n for n in names if row.num_rows and row[n][0].is_valid), MEAN)

    def token_width(self, model_id: str) -> int:
        """The width of ``model_id``'s patch embeddings (its ``tokens256`` and ``mean256``)."""
        return int(self.existing(REGIONS).schema.field(self.mean_column_of(model_id)).type.list_size)

    def prepare_regions(self, schema: pa.Schema) -> pa.Schema:
        """Make ``regions.lance`` hold every column of ``schema`` (creating it empty if need
        be) and return the table's schema: what workers writing fragments must write."""
        check_lease(self.out)
        ds = self.dataset(REGIONS)
        if ds is None:
            self._io(
                REGIONS,
                lambda: lance.write_dataset(schema.empty_table(), self.uri(REGIONS), storage_options=self.options),
            )
            ds = self.existing(REGIONS)
        return self._with_columns(REGIONS, ds, schema).schema

    def _commit_fragments(self, fragments: list[lance.FragmentMetadata]) -> None:
        if not fragments:
            return
        check_lease(self.out)
        ds = self.existing(REGIONS)  # the workers wrote the fragments into the table prepare_regions made
        # appends never conflict with each other: Lance rebases on newer versions by itself
        self._io(
            REGIONS,
            lambda: lance.LanceDataset.commit(
                self.uri(REGIONS),
                lance.LanceOperation.Append(fragments),
                read_version=ds.version,
                storage_options=self.options,
            ),
        )

    def remove_uncommitted(self, keep_versions_days: float) -> int:
        """Delete data files of ``regions.lance`` that no version references (fragments written
        by a run that died before committing them) and versions older than
        ``keep_versions_days``; bytes removed. Safe only under the writer lease."""
        ds = self.dataset(REGIONS)
        if ds is None:
            return 0
        check_lease(self.out)
        stats = self._io(
            REGIONS,
            lambda: ds.cleanup_old_versions(older_than=timedelta(days=keep_versions_days), delete_unverified=True),
        )
        return stats.bytes_removed

    def tidy(self, keep_versions_days: float) -> str:
        """Keep the tables' shape healthy however many runs appended to them: merge small
        fragments (each commit adds one per table, workers one per slide and batch), then
        delete versions older than ``keep_versions_days``. Returns one line on what is left.
        Safe only under the writer lease."""
        parts = []
        for table, rows in ((REGIONS, REGION_ROWS_PER_FRAGMENT), (SLIDES, None)):
            ds = self.dataset(table)
            if ds is None:
                continue
            check_lease(self.out)
            if len(ds.get_fragments()) > 1:
                self._io(table, lambda: ds.optimize.compact_files(target_rows_per_fragment=rows))
                ds = self.existing(table)
            self._io(table, lambda: ds.cleanup_old_versions(older_than=timedelta(days=keep_versions_days)))
            parts.append(f"{table} {len(ds.get_fragments())} fragments, {len(ds.versions())} versions")
        return "; ".join(parts)

    def append_slides(
        self,
        slide_rows: list[dict],
        region_rows: Sequence[dict] | pa.Table = (),
        regions_schema: pa.Schema = REGIONS_SCHEMA,
        *,
        fragments: Sequence[lance.FragmentMetadata] = (),
        replaces: Iterable[str] = (),
    ) -> None:
        """Commit regions (rows, or ``fragments`` workers wrote), then the slides' status rows
        (see the module's visibility rule).

        ``replaces``: slides of this batch that were completed before (their file changed) or
        whose rows must go (they failed); once the new status rows are committed, their other
        region rows are deleted.
        """
        regions = (
            region_rows
            if isinstance(region_rows, pa.Table)
            else pa.Table.from_pylist(list(region_rows), schema=regions_schema)
        )
        self._append(REGIONS, regions)
        self._commit_fragments(list(fragments))
        self._append(SLIDES, pa.Table.from_pylist(slide_rows, schema=SLIDES_SCHEMA))
        replaces = set(replaces)
        for row in slide_rows:
            if row["slide_id"] in replaces:
                keep = row_version(row) if row["status"] == "ok" else None
                self._delete_versions({row["slide_id"]: keep}, row["spec_hash"], row["model_id"])

    def _delete_versions(self, keep: dict[str, str | None], spec_hash: str, model_id: str) -> None:
        """Delete the region rows of each slide in ``keep`` except those of version ``keep[slide]``
        (all of them for ``None``)."""
        ds = self.dataset(REGIONS)
        if ds is None or not keep:
            return
        versioned = "slide_version" in ds.schema.names
        conds = []
        for sid, version in keep.items():
            cond = f"slide_id = {sql_string(sid)}"
            if version is not None and versioned:
                cond += f" AND (slide_version IS NULL OR slide_version != {sql_string(version)})"
            elif version is not None:
                continue  # a table without versions holds only what the status row names
            conds.append(f"({cond})")
        for i in range(0, len(conds), 200):
            where = (
                f"spec_hash = {sql_string(spec_hash)} AND model_id = {sql_string(model_id)} AND "
                f"({' OR '.join(conds[i : i + 200])})"
            )
            self._io(REGIONS, lambda: ds.delete(where))

    def latest_slides(self, spec_hash: str | None = None, model_id: str | None = None) -> pa.Table:
        """The newest status row of each slide (optionally for one tiling spec and model)."""
        conds = []
        if spec_hash:
            conds.append(f"spec_hash = {sql_string(spec_hash)}")
        if model_id is not None:
            conds.append(f"model_id = {sql_string(model_id)}")
        filt = " AND ".join(conds) or None
        rows = self.read(SLIDES, filter=filt)
        if rows.num_rows == 0:
            return rows
        rows = rows.sort_by([("slide_id", "ascending"), ("time", "descending")])
        ids = rows.column("slide_id").to_pylist()
        keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        return rows.take(keep)

    def done_rows(self, spec_hash: str, model_id: str = "") -> dict[str, dict]:
        """slide_id → the latest status row of slides whose latest row for ``spec_hash`` and
        ``model_id`` ("" for tiling alone) is ok or no_tissue."""
        latest = self.latest_slides(spec_hash, model_id)
        done = latest.filter(pc.is_in(latest["status"], pa.array(DONE_STATUSES)))
        return {r["slide_id"]: r for r in done.to_pylist()}

    def slide_refs(self, spec_hash: str, model_id: str = "") -> dict[str, SlideRef]:
        """slide_id → the reference (see :func:`slide_ref`) of each slide :meth:`done_rows`
        returns: what every reader of a tiled or embedded slide opens."""
        return {sid: slide_ref(r) for sid, r in self.done_rows(spec_hash, model_id).items()}

    def completed(self, spec_hash: str, model_id: str = "") -> dict[str, str]:
        """slide_id → uri of the slides :meth:`done_rows` returns."""
        return {sid: r["uri"] for sid, r in self.done_rows(spec_hash, model_id).items()}

    def remove_orphans(self, spec_hash: str, model_id: str = "") -> list[str]:
        """Delete region rows no reader takes: those of slides without a completed status row (a
        killed job's leftovers) and those of an earlier version of a slide's file."""
        ds = self.dataset(REGIONS)
        if ds is None:
            return []
        versioned = "slide_version" in ds.schema.names
        rows = self._io(
            REGIONS,
            lambda: ds.to_table(
                columns=["slide_id"] + (["slide_version"] if versioned else []),
                filter=f"spec_hash = {sql_string(spec_hash)} AND model_id = {sql_string(model_id)}",
            ),
        )
        done = self.done_rows(spec_hash, model_id)
        present: dict[str, set] = {}
        for r in rows.group_by(rows.column_names).aggregate([]).to_pylist():
            present.setdefault(r["slide_id"], set()).add(r.get("slide_version"))
        keep: dict[str, str | None] = {}
        for sid, versions in present.items():
            if sid not in done:
                keep[sid] = None
                continue
            current = row_version(done[sid])
            # rows of another version; rows without one only once the current version's are there
            if versions - {current, None} or (None in versions and current in versions):
                keep[sid] = current
        self._delete_versions(keep, spec_hash, model_id)
        return sorted(keep)

    def regions(
        self,
        spec_hash: str,
        slide_ids: Iterable[str] | None = None,
        model_id: str = "",
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Region rows of completed slides only, one per region of the slide's current file,
        sorted by slide and region index."""
        done = self.done_rows(spec_hash, model_id)
        if slide_ids is not None:
            wanted = set(slide_ids)
            done = {sid: r for sid, r in done.items() if sid in wanted}
        ds = self.dataset(REGIONS)
        names = ds.schema.names if ds is not None else REGIONS_SCHEMA.names
        cols = list(columns) if columns else list(names)
        read_cols = [
            c
            for c in dict.fromkeys(cols + ["slide_id", "region_index", "slide_version"])
            if c != "slide_version" or c in names
        ]
        filt = f"spec_hash = {sql_string(spec_hash)} AND model_id = {sql_string(model_id)}"
        if slide_ids is not None and len(done) <= 1000:
            filt += f" AND {_in('slide_id', done)}" if done else " AND false"
        rows = (
            self._io(REGIONS, lambda: ds.to_table(columns=read_cols, filter=filt))
            if ds is not None
            else REGIONS_SCHEMA.empty_table().select(read_cols)
        )
        if "slide_version" not in rows.column_names:  # a table written before versions
            rows = rows.append_column("slide_version", pa.nulls(rows.num_rows, pa.string()))
        rows = current_regions(rows, {sid: row_version(r) for sid, r in done.items()})
        return rows.select(cols)

    def region_reads(self, spec_hash: str, refs: Sequence[SlideRef], columns: Sequence[str]) -> pa.Table:
        """The tiled regions of the slides ``refs`` name, as rows a region reader takes: the
        tiling's ``columns`` plus the slide reference's :attr:`SlideRef.COLUMNS`."""
        by_id = {r.slide_id: r for r in refs}
        cols = list(dict.fromkeys([*columns, "slide_id", "slide_version"]))
        rows = self.regions(spec_hash, list(by_id), model_id="", columns=cols)
        mine = [by_id[s] for s in rows["slide_id"].to_pylist()]
        rows = rows.append_column("uri", pa.array([r.uri for r in mine], pa.string()))
        return rows.append_column("mpp_override", pa.array([r.mpp_override for r in mine], pa.float64()))


def current_regions(rows: pa.Table, versions: dict[str, str]) -> pa.Table:
    """Of ``rows`` (with ``slide_id``, ``region_index``, ``slide_version``), those of the slides in
    ``versions`` and of each one's current version (rows without a version count only for a slide
    that has none with it), one row per region, sorted by slide and region index.

    The order is decided on the three key columns alone and the wide columns (emb4k, mean256,
    tokens) are gathered once: filtering and sorting the whole table copied them three times
    (28 of 34 s reading 400,000 regions, bench/tables.py)."""
    if rows.num_rows == 0:
        return rows
    wanted = pa.array(sorted(versions), pa.string())
    pos = pc.index_in(rows["slide_id"].combine_chunks(), value_set=wanted)  # null: not wanted
    have = rows["slide_version"].combine_chunks()
    target = pa.array([versions[s] for s in wanted.to_pylist()], pa.string()).take(pos)
    exact = pc.fill_null(pc.equal(have, target), False).to_numpy(zero_copy_only=False)
    rank = pc.fill_null(pos, -1).to_numpy()  # the slide's rank among the wanted ids; -1: not wanted
    has_exact = np.zeros(len(wanted) + 1, dtype=bool)  # [-1] stays False
    has_exact[rank[exact]] = True
    unversioned = pc.is_null(have).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(exact | ((rank >= 0) & unversioned & ~has_exact[rank]))
    # ``wanted`` is sorted, so (rank, region index) is (slide id, region index) order
    region = rows["region_index"].to_numpy()[keep]
    order = np.lexsort((region, rank[keep]))
    keep, region, rank = keep[order], region[order], rank[keep][order]
    first = np.ones(len(keep), dtype=bool)
    first[1:] = (rank[1:] != rank[:-1]) | (region[1:] != region[:-1])
    return rows.take(pa.array(keep[first]))


def resolve_embedding(
    store: Store, model_id: str | None = None, spec_hash: str | None = None, *, key: str = "model_id"
) -> tuple[str, str]:
    """The (model id, tiling spec) of the embeddings under ``store``; each may be left out when
    the output holds only one. ``key`` is the setting that chooses the model (``heads.model_id``):
    an output holding several models' embeddings (patch encoders side by side) and no choice is
    an error that lists them with their slide counts."""
    latest = store.read(SLIDES, columns=["slide_id", "model_id", "spec_hash", "status"])
    ok = latest.filter(pc.and_(pc.equal(latest["status"], "ok"), pc.not_equal(latest["model_id"], "")))
    if model_id is None:
        counts = Counter(m for _, m in set(zip(ok["slide_id"].to_pylist(), ok["model_id"].to_pylist())))
        if len(counts) > 1:
            listed = ", ".join(f"{m} ({n} slides)" for m, n in sorted(counts.items()))
            raise InputError(
                f"{store.out} holds the embeddings of {len(counts)} models: {listed}; choose one with {key}=<id>"
            )
        model_id = next(iter(counts), None)
    if model_id is None:
        raise InputError(f"{store.out} holds no embeddings; run `hipt-ray embed` with this --out first")
    if spec_hash is None:  # the tilings this model embedded (a patch encoder's own, or HIPT's)
        specs = sorted(set(ok.filter(pc.equal(ok["model_id"], model_id))["spec_hash"].to_pylist()))
        if not specs:
            models = sorted(set(ok["model_id"].to_pylist()))
            raise InputError(f"{store.out} holds no embeddings of {key}={model_id}; it holds {models or 'none'}")
        if len(specs) != 1:
            raise InputError(
                f"{store.out} holds embeddings of {model_id} for spec_hash in {specs or 'none'}; pass spec_hash=…"
            )
        spec_hash = specs[0]
    return model_id, spec_hash


def read_embeddings(
    out: str,
    slide_ids: Iterable[str] | None = None,
    *,
    model_id: str | None = None,
    spec_hash: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, dict]:
    """Per-slide arrays from an embedded output: ``{slide_id: {"emb4k": [n, D4k], "mean256":
    [n, D256], "x": [n], "y": [n], "slide_emb": [D4k]}}`` (``slide_emb`` = mean of ``emb4k``, for
    probes). Only slides whose embedding completed are returned.

    ``model_id`` / ``spec_hash`` may be left out when the output holds a single one of each.
    """
    store = Store(out, endpoint_url=endpoint_url)
    model_id, spec_hash = resolve_embedding(store, model_id, spec_hash)
    mean = store.mean_column_of(model_id)
    rows = store.regions(
        spec_hash, slide_ids, model_id=model_id, columns=["slide_id", "region_index", "x", "y", "emb4k", mean]
    )
    out_dict: dict[str, dict] = {}
    if rows.num_rows == 0:
        return out_dict
    ids = rows["slide_id"].to_numpy(zero_copy_only=False)
    # rows come sorted by slide: cut them at each slide's first row (one pass, not one filter
    # of the whole table per slide, which grew with slides × rows)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]

    def matrix(name: str) -> np.ndarray:
        col = rows[name].combine_chunks()
        if col.null_count:  # not written by this version's jobs; keep the slow, general path
            return np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
        return np.asarray(col.flatten(), np.float32).reshape(len(ids), -1)

    emb_all, m256_all = matrix("emb4k"), matrix(mean)
    xs, ys = rows["x"].to_numpy(), rows["y"].to_numpy()
    for a, b in zip(starts, ends):
        emb = emb_all[a:b]
        out_dict[ids[a]] = {
            "emb4k": emb,
            "mean256": m256_all[a:b],
            "x": xs[a:b],
            "y": ys[a:b],
            "slide_emb": emb.mean(axis=0),
        }
    return out_dict
