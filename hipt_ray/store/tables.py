"""The Lance tables under an output URI: ``OUT/slides.lance`` and ``OUT/regions.lance``.

Visibility rule: a slide's region rows are committed *before* its status row, and readers only
trust regions whose slide has a completed status row for the same tiling spec. A job killed
between the two commits leaves orphan regions that :func:`remove_orphans` deletes on the next
run, so a rerun never sees a half-written slide.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import lance
import pyarrow as pa
import pyarrow.compute as pc

from hipt_ray.storage import is_remote, join

SLIDES = "slides.lance"
REGIONS = "regions.lance"
DONE_STATUSES = ("ok", "no_tissue")

SLIDES_SCHEMA = pa.schema([
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
    ("seconds", pa.float64()),
    ("time", pa.timestamp("us", tz="UTC")),
])

REGIONS_SCHEMA = pa.schema([
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
])


def embedding_fields(dim4k: int, dim256: int) -> list[pa.Field]:
    """Columns the embedding job adds to ``regions``: fixed-size vectors (what vector indexes
    need) and the per-patch tokens, row-major, flattened (``read_h/256 · read_w/256 · dim256``
    values; a full region has 256·384)."""
    return [
        pa.field("emb4k", pa.list_(pa.float32(), dim4k)),
        pa.field("mean256", pa.list_(pa.float32(), dim256)),
        pa.field("tokens256", pa.list_(pa.float16())),
    ]


def lance_storage_options(out: str, endpoint_url: str | None = None) -> dict[str, str] | None:
    """Lance's object-store options; without an explicit endpoint it reads the AWS variables."""
    if not is_remote(out):
        return None
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    opts = {"aws_endpoint": endpoint}
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

    def dataset(self, table: str) -> lance.LanceDataset | None:
        try:
            return lance.dataset(self.uri(table), storage_options=self.options)
        except (FileNotFoundError, ValueError, OSError) as exc:
            if "not found" in str(exc).lower() or "does not exist" in str(exc).lower() or isinstance(exc, FileNotFoundError):
                return None
            raise

    def read(self, table: str, *, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        ds = self.dataset(table)
        schema = SLIDES_SCHEMA if table == SLIDES else REGIONS_SCHEMA
        if ds is None:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return ds.to_table(columns=columns, filter=filter)

    def _append(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        ds = self.dataset(table)
        if ds is None:
            lance.write_dataset(data, self.uri(table), mode="create", storage_options=self.options)
            return
        missing = [f for f in data.schema if f.name not in ds.schema.names]
        if missing:  # e.g. embeddings appended to a table `tile` created: add all-null columns
            ds.add_columns(missing)
            ds = self.dataset(table)
        for f in data.schema:
            have = ds.schema.field(f.name).type
            if have != f.type:
                raise ValueError(
                    f"{self.uri(table)} stores {f.name} as {have}, this run writes {f.type} "
                    "(a model of another size?): write to a new --out"
                )
        data = data.select([n for n in ds.schema.names if n in data.schema.names])
        lance.write_dataset(data, self.uri(table), mode="append", storage_options=self.options)

    def append_slides(self, slide_rows: list[dict], region_rows: list[dict] | pa.Table,
                      regions_schema: pa.Schema = REGIONS_SCHEMA) -> None:
        """Commit regions, then the slides' status rows (see the module's visibility rule)."""
        regions = region_rows if isinstance(region_rows, pa.Table) else pa.Table.from_pylist(
            region_rows, schema=regions_schema)
        self._append(REGIONS, regions)
        self._append(SLIDES, pa.Table.from_pylist(slide_rows, schema=SLIDES_SCHEMA))

    def latest_slides(self, spec_hash: str | None = None, model_id: str | None = None) -> pa.Table:
        """The newest status row of each slide (optionally for one tiling spec and model)."""
        conds = []
        if spec_hash:
            conds.append(f"spec_hash = '{spec_hash}'")
        if model_id is not None:
            conds.append(f"model_id = '{model_id}'")
        filt = " AND ".join(conds) or None
        rows = self.read(SLIDES, filter=filt)
        if rows.num_rows == 0:
            return rows
        rows = rows.sort_by([("slide_id", "ascending"), ("time", "descending")])
        ids = rows.column("slide_id").to_pylist()
        keep = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        return rows.take(keep)

    def completed(self, spec_hash: str, model_id: str = "") -> dict[str, str]:
        """slide_id → uri of slides whose latest row for ``spec_hash`` and ``model_id`` ("" for
        tiling alone) is ok or no_tissue."""
        latest = self.latest_slides(spec_hash, model_id)
        done = latest.filter(pc.is_in(latest["status"], pa.array(DONE_STATUSES)))
        return dict(zip(done["slide_id"].to_pylist(), done["uri"].to_pylist()))

    def remove_regions(self, slide_ids: Iterable[str], spec_hash: str, model_id: str = "") -> None:
        ids = sorted(set(slide_ids))
        ds = self.dataset(REGIONS)
        if not ids or ds is None:
            return
        for i in range(0, len(ids), 500):
            quoted = ", ".join("'" + s.replace("'", "''") + "'" for s in ids[i : i + 500])
            ds.delete(f"spec_hash = '{spec_hash}' AND model_id = '{model_id}' AND slide_id IN ({quoted})")

    def remove_orphans(self, spec_hash: str, model_id: str = "") -> list[str]:
        """Delete region rows whose slide has no completed status row (a killed job's leftovers)."""
        regions = self.read(REGIONS, columns=["slide_id"],
                            filter=f"spec_hash = '{spec_hash}' AND model_id = '{model_id}'")
        present = set(pc.unique(regions["slide_id"]).to_pylist())
        orphans = sorted(present - set(self.completed(spec_hash, model_id)))
        self.remove_regions(orphans, spec_hash, model_id)
        return orphans

    def regions(self, spec_hash: str, slide_ids: Iterable[str] | None = None, model_id: str = "",
                columns: list[str] | None = None) -> pa.Table:
        """Region rows of completed slides only, sorted by slide and region index."""
        done = set(self.completed(spec_hash, model_id))
        if slide_ids is not None:
            done &= set(slide_ids)
        rows = self.read(REGIONS, columns=columns,
                         filter=f"spec_hash = '{spec_hash}' AND model_id = '{model_id}'")
        rows = rows.filter(pc.is_in(rows["slide_id"], pa.array(sorted(done), pa.string())))
        return rows.sort_by([("slide_id", "ascending"), ("region_index", "ascending")])


def resolve_embedding(store: Store, model_id: str | None = None,
                      spec_hash: str | None = None) -> tuple[str, str]:
    """The (model id, tiling spec) of the embeddings under ``store``; each may be left out when
    the output holds only one."""
    latest = store.read(SLIDES, columns=["model_id", "spec_hash", "status"])
    ok = latest.filter(pc.and_(pc.equal(latest["status"], "ok"), pc.not_equal(latest["model_id"], "")))
    found = {}
    for name, value in (("model_id", model_id), ("spec_hash", spec_hash)):
        if value is None:
            values = sorted(set(ok[name].to_pylist()))
            if len(values) != 1:
                raise ValueError(f"{store.out} holds embeddings for {name} in {values or 'none'}; pass {name}=…")
            value = values[0]
        found[name] = value
    return found["model_id"], found["spec_hash"]


def read_embeddings(out: str, slide_ids: Iterable[str] | None = None, *, model_id: str | None = None,
                    spec_hash: str | None = None, endpoint_url: str | None = None) -> dict[str, dict]:
    """Per-slide arrays from an embedded output: ``{slide_id: {"emb4k": [n, D4k], "mean256":
    [n, D256], "x": [n], "y": [n], "slide_emb": [D4k]}}`` (``slide_emb`` = mean of ``emb4k``, for
    probes). Only slides whose embedding completed are returned.

    ``model_id`` / ``spec_hash`` may be left out when the output holds a single one of each.
    """
    import numpy as np

    store = Store(out, endpoint_url=endpoint_url)
    model_id, spec_hash = resolve_embedding(store, model_id, spec_hash)
    rows = store.regions(spec_hash, slide_ids, model_id=model_id,
                         columns=["slide_id", "region_index", "x", "y", "emb4k", "mean256"])
    out_dict: dict[str, dict] = {}
    ids = rows["slide_id"].to_numpy(zero_copy_only=False)
    for sid in dict.fromkeys(ids):
        part = rows.filter(pc.equal(rows["slide_id"], sid))
        emb = np.stack(part["emb4k"].to_numpy(zero_copy_only=False)).astype(np.float32)
        out_dict[sid] = {
            "emb4k": emb,
            "mean256": np.stack(part["mean256"].to_numpy(zero_copy_only=False)).astype(np.float32),
            "x": part["x"].to_numpy(), "y": part["y"].to_numpy(), "slide_emb": emb.mean(axis=0),
        }
    return out_dict
