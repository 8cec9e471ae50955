"""Similar-region search: a Lance vector index on ``regions.emb4k`` and nearest-neighbour queries
restricted to one embedding model and tiling spec (the region table holds tile rows without
embeddings, and may hold several models).

Rows appended after the index was built are still searched (Lance scans unindexed fragments
exactly); :func:`refresh_index` folds them into the index, and the embed job calls it after
every run.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pyarrow as pa

from hipt_ray.config import ConfigError, InputError
from hipt_ray.store.tables import REGIONS, Store, current_regions, row_version, sql_string

log = logging.getLogger(__name__)
INDEX_NAME = "emb4k_idx"
COLUMN = "emb4k"
os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # index stats without centroids


def _sub_vectors(dim: int, wanted: int | None) -> int:
    if wanted:
        if dim % wanted:
            raise ConfigError(f"search.num_sub_vectors={wanted} must divide the embedding size {dim}")
        return wanted
    for per_code in (8, 4, 2, 1):  # about 8 dimensions per PQ code
        if dim % per_code == 0:
            return dim // per_code
    return 1


def index_info(store: Store) -> dict:
    """``{"indexed": rows, "unindexed": rows, "type": ...}`` of the emb4k index (empty if none)."""
    ds = store.dataset(REGIONS)
    if ds is None:
        return {}
    index = next((i for i in ds.list_indices() if i["name"] == INDEX_NAME), None)
    if index is None:
        return {}
    stats = ds.stats.index_stats(INDEX_NAME)
    return {"indexed": stats["num_indexed_rows"], "unindexed": stats["num_unindexed_rows"], "type": index["type"]}


def build_index(store: Store, sc, *, num_partitions: int | None = None) -> dict:
    """(Re)build the index over every embedded row."""
    ds = store.existing(REGIONS)
    n = ds.count_rows(filter=f"{COLUMN} IS NOT NULL")
    dim = ds.schema.field(COLUMN).type.list_size
    parts = num_partitions or sc.num_partitions or max(1, min(4096, round(math.sqrt(n))))
    kwargs = {"num_partitions": parts, "metric": sc.metric, "replace": True, "name": INDEX_NAME}
    if "PQ" in sc.index_type:
        kwargs["num_sub_vectors"] = _sub_vectors(dim, sc.num_sub_vectors)
    ds.create_index(COLUMN, sc.index_type, **kwargs)
    return index_info(store)


def refresh_index(store: Store, sc, *, rebuild: bool = False) -> str:
    """Bring the index up to date: build it once the table holds ``search.min_rows`` embedded
    regions, else fold new rows into it. Returns what was done, for the job summary."""
    ds = store.dataset(REGIONS)
    if ds is None or COLUMN not in ds.schema.names:
        return "no embeddings to index"
    info = index_info(store)
    if info and not rebuild:
        if info["unindexed"] == 0:
            return f"vector index up to date ({info['type']})"
        ds.optimize.optimize_indices(index_names=[INDEX_NAME])
        return f"vector index refreshed: new regions folded in ({info['type']})"
    n = ds.count_rows(filter=f"{COLUMN} IS NOT NULL")
    if n < sc.min_rows and not rebuild:
        return f"exact search: {n} embedded regions < search.min_rows={sc.min_rows}, no index needed"
    info = build_index(store, sc)
    return f"vector index built over {n} embedded regions ({info['type']})"


def find_region(store: Store, slide_id: str, xy: tuple[int, int], *, model_id: str, spec_hash: str) -> dict:
    """The embedded region of ``slide_id`` that contains level-0 point ``xy``."""
    rows = store.regions(
        spec_hash,
        [slide_id],
        model_id=model_id,
        columns=["slide_id", "region_index", "x", "y", "level0_w", "level0_h", COLUMN],
    )
    if rows.num_rows == 0:
        raise InputError(
            f"slide {slide_id!r} has no embedded regions in {store.out} (model {model_id}); "
            "check the slide id (see slides.lance) or embed it first"
        )
    x, y = xy
    for r in rows.to_pylist():
        if r["x"] <= x < r["x"] + r["level0_w"] and r["y"] <= y < r["y"] + r["level0_h"]:
            return r
    corners = ", ".join(f"{r['x']},{r['y']}" for r in rows.to_pylist()[:12])
    raise InputError(
        f"no region of {slide_id} contains {x},{y}; its regions start at {corners}"
        + (" …" if rows.num_rows > 12 else "")
    )


def search(
    store: Store, query: np.ndarray, *, model_id: str, spec_hash: str, k: int, sc, exact: bool = False
) -> pa.Table:
    """The ``k`` nearest embedded regions to ``query`` (same model and tiling spec), nearest first,
    with ``_distance``; ``exact`` bypasses the index (brute force, for recall measurements)."""
    ds = store.existing(REGIONS)
    versions = {sid: row_version(r) for sid, r in store.done_rows(spec_hash, model_id).items()}
    cols = ["slide_id", "region_index", "x", "y", "level0_w", "level0_h", "read_w", "read_h", "mpp", "_distance"]
    versioned = "slide_version" in ds.schema.names
    fetch = k
    while True:  # ask for more neighbours while duplicates or rows of unfinished slides crowd k out
        nearest = {
            "column": COLUMN,
            "q": np.asarray(query, np.float32),
            "k": fetch,
            "metric": sc.metric,
            "nprobes": sc.nprobes,
            "use_index": not exact,
        }
        if sc.refine_factor and not exact:
            nearest["refine_factor"] = sc.refine_factor
        table = ds.to_table(
            columns=cols + (["slide_version"] if versioned else []),
            nearest=nearest,
            prefilter=True,
            disable_scoring_autoprojection=True,
            filter=f"model_id = {sql_string(model_id)} AND spec_hash = {sql_string(spec_hash)}",
        )
        if not versioned:
            table = table.append_column("slide_version", pa.nulls(table.num_rows, pa.string()))
        found = current_regions(table, versions)
        if found.num_rows >= k or table.num_rows < fetch:
            return found.sort_by("_distance").slice(0, k).select(cols)
        fetch *= 4
