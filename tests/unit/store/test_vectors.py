"""The emb4k vector index: built at the size threshold, refreshed on append, filtered by model and
spec, and the same answers as exact search on a clustered table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hipt_ray.config import load_config
from hipt_ray.store import REGIONS_SCHEMA, Store, embedding_fields
from hipt_ray.store.vectors import find_region, index_info, refresh_index, search

DIM = 32
SCHEMA = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(DIM, 48))


def _append(store: Store, vecs: np.ndarray, start: int, model_id: str = "m1") -> None:
    rows = [
        {
            "slide_id": f"s{i}",
            "region_index": 0,
            "x": 0,
            "y": 0,
            "level0_w": 4096,
            "level0_h": 4096,
            "read_w": 4096,
            "read_h": 4096,
            "mpp": 0.5,
            "spec_hash": "spec",
            "model_id": model_id,
            "emb4k": v.astype("float32"),
            "mean256": np.zeros(48, "float32"),
            "tokens256": None,
        }
        for i, v in enumerate(vecs, start)
    ]
    slides = [
        {
            "slide_id": r["slide_id"],
            "uri": r["slide_id"],
            "status": "ok",
            "spec_hash": "spec",
            "model_id": model_id,
            "n_regions": 1,
            "time": None,
        }
        for r in rows
    ]
    store.append_slides(slides, pa.Table.from_pylist(rows, schema=SCHEMA), SCHEMA)


@pytest.fixture()
def vectors():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, DIM))
    return centers[rng.integers(0, 20, 900)] + 0.2 * rng.standard_normal((900, DIM))


def test_index_lifecycle_and_answers(tmp_path, vectors):
    store = Store(str(tmp_path))
    sc = load_config().search.model_copy(update={"min_rows": 500})
    _append(store, vectors[:300], 0)
    assert refresh_index(store, sc).startswith("exact search: 300 embedded regions")
    assert index_info(store) == {}
    _append(store, vectors[300:600], 300)
    assert refresh_index(store, sc).startswith("vector index built over 600")
    assert index_info(store)["unindexed"] == 0
    assert refresh_index(store, sc).startswith("vector index up to date")
    _append(store, vectors[600:], 600)
    _append(store, vectors[:50] + 100.0, 2000, model_id="other")  # another model's rows: never returned
    assert index_info(store)["unindexed"] > 0
    new = search(store, vectors[850], model_id="m1", spec_hash="spec", k=1, sc=sc)
    assert new["slide_id"][0].as_py() == "s850"  # unindexed rows are searched before the refresh
    assert refresh_index(store, sc).startswith("vector index refreshed")
    assert index_info(store)["unindexed"] == 0
    hits = exact = 0
    for q in (5, 77, 420, 850):
        ann = search(store, vectors[q], model_id="m1", spec_hash="spec", k=10, sc=sc)
        ref = search(store, vectors[q], model_id="m1", spec_hash="spec", k=10, sc=sc, exact=True)
        assert ann["slide_id"][0].as_py() == f"s{q}"
        assert all(s.startswith("s") and int(s[1:]) < 900 for s in ann["slide_id"].to_pylist())
        hits += len(set(ann["slide_id"].to_pylist()) & set(ref["slide_id"].to_pylist()))
        exact += 10
    assert hits / exact >= 0.8


def test_find_region_names_the_fix(tmp_path, vectors):
    store = Store(str(tmp_path))
    _append(store, vectors[:3], 0)
    assert find_region(store, "s1", (100, 100), model_id="m1", spec_hash="spec")["region_index"] == 0
    with pytest.raises(ValueError, match="no region of s1 contains 9000,9000; its regions start at 0,0"):
        find_region(store, "s1", (9000, 9000), model_id="m1", spec_hash="spec")
    with pytest.raises(ValueError, match="has no embedded regions"):
        find_region(store, "nope", (0, 0), model_id="m1", spec_hash="spec")


def test_search_returns_each_region_once_and_only_finished_slides(tmp_path, vectors):
    store = Store(str(tmp_path))
    sc = load_config().search
    _append(store, vectors[:40], 0)
    _append(store, vectors[:40], 0)  # what two runs on one output used to leave: every row twice
    # rows of a slide whose status row never landed (a killed run): not returned
    store._append(
        "regions.lance",
        pa.Table.from_pylist(
            [
                {
                    "slide_id": "half",
                    "region_index": 0,
                    "spec_hash": "spec",
                    "model_id": "m1",
                    "emb4k": vectors[3].astype("float32"),
                    "mean256": np.zeros(48, "float32"),
                }
            ],
            schema=SCHEMA,
        ),
    )
    got = search(store, vectors[3], model_id="m1", spec_hash="spec", k=10, sc=sc)
    ids = got["slide_id"].to_pylist()
    assert len(ids) == 10 and len(set(ids)) == 10 and ids[0] == "s3" and "half" not in ids
    assert got["_distance"].to_pylist() == sorted(got["_distance"].to_pylist())
