"""Worker-side fragment writes and the driver's committer, on real Lance tables (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hipt_ray.store import REGIONS, REGIONS_SCHEMA, SLIDES, Store, embedding_fields
from hipt_ray.store.fragments import RegionCommitter, write_region_fragments
from hipt_ray.store.tables import SLIDES_SCHEMA

SPEC, MID = "spec1", "model1"


def _embedded(rows: list[tuple[str, int, str]]) -> pa.Table:
    """What the model actors return: coordinates, embeddings, an error per region."""
    n = len(rows)
    return pa.table(
        {
            "slide_id": [r[0] for r in rows],
            "region_index": pa.array([r[1] for r in rows], pa.int32()),
            "x": pa.array([r[1] * 4096 for r in rows], pa.int64()),
            "spec_hash": [SPEC] * n,
            "slide_version": ["10:e"] * n,
            "emb4k": [np.full(4, r[1], np.float32) for r in rows],
            "mean256": [np.zeros(2, np.float32)] * n,
            "tokens256": [np.zeros(3, np.float16)] * n,
            "error": [r[2] for r in rows],
            "read_node": ["nodeA"] * n,
            "model_node": ["nodeB"] * n,
            "model_seconds": [0.5] * n,  # float64 here, as the actors return it (no read_seconds)
            "decoded": ["gpu→cpu" if r[1] % 2 else "reader" for r in rows],  # odd regions came packed
            "transfer_bytes": [1100 if r[1] % 2 else 5000 for r in rows],
            "tile_bytes": [1000 if r[1] % 2 else 0 for r in rows],
        }
    )


def _status(sid: str, status: str, error: str, n: int) -> dict:
    import datetime

    row = {f.name: None for f in SLIDES_SCHEMA}
    return {
        **row,
        "slide_id": sid,
        "uri": f"/s/{sid}.tiff",
        "size": 10,
        "etag": "e",
        "status": status,
        "error": error,
        "n_regions": n,
        "spec_hash": SPEC,
        "model_id": MID,
        "time": datetime.datetime.now(datetime.UTC),
    }


@pytest.fixture()
def store(tmp_path) -> tuple[Store, pa.Schema]:
    store = Store(str(tmp_path / "out"))
    schema = store.prepare_regions(pa.schema(list(REGIONS_SCHEMA) + embedding_fields(4, 2)))
    return store, schema


def _committer(store: Store, expected: dict[str, int], finished: list) -> RegionCommitter:
    return RegionCommitter(
        store, expected=expected, status_row=_status, batch_slides=1, on_finished=lambda *a: finished.append(a[:2])
    )


def test_rows_become_visible_with_their_slide_and_failed_slides_leave_nothing(store):
    store, schema = store
    finished: list = []
    committer = _committer(store, {"a": 3, "b": 2, "c": 2}, finished)
    kw = dict(uri=store.uri(REGIONS), schema=schema, model_id=MID)
    # a's regions arrive in two batches; b has a failed region; c never completes
    meta = write_region_fragments(_embedded([("a", 0, ""), ("a", 1, ""), ("b", 0, ""), ("c", 0, "")]), **kw)
    assert meta.num_rows == 4 and set(meta["fragment"].to_pylist()) != {""}
    assert len({k for k in meta["fragment"].to_pylist()}) == 3  # one fragment per slide
    committer.add(meta)
    assert store.regions(SPEC, model_id=MID).num_rows == 0  # nothing finished: nothing visible
    committer.add(write_region_fragments(_embedded([("b", 1, "b: failed to decode"), ("a", 2, "")]), **kw))
    assert sorted(finished) == [("a", "ok"), ("b", "failed")]
    rows = store.regions(SPEC, model_id=MID)
    assert rows["slide_id"].to_pylist() == ["a"] * 3 and rows["region_index"].to_pylist() == [0, 1, 2]
    assert np.asarray(rows["emb4k"].to_pylist())[:, 0].tolist() == [0.0, 1.0, 2.0]
    committer.add(write_region_fragments(_embedded([("a", 1, "")]), **kw))  # a retried region
    assert committer.duplicates == 1
    committer.close()
    latest = {r["slide_id"]: r for r in store.latest_slides(SPEC, MID).to_pylist()}
    assert {s: r["status"] for s, r in latest.items()} == {"a": "ok", "b": "failed", "c": "failed"}
    assert latest["b"]["error"] == "b: failed to decode"
    assert "only 1 of 2 regions" in latest["c"]["error"]
    left = store.read(REGIONS, columns=["slide_id"], filter=f"model_id = '{MID}'")["slide_id"].to_pylist()
    assert sorted(left) == ["a", "a", "a"]  # the rows b and c wrote were deleted with their failure
    assert store.remove_orphans(SPEC, MID) == []
    assert committer.fragments == 4 and committer.nodes["read"] == {"nodeA": 6}
    assert committer.stage_seconds == {"read": 0.0, "model": 3.0} and committer.returned == 6  # not the duplicate
    assert committer.decoded == {"reader": 4, "gpu→cpu": 2}  # (a0 a1 b0 c0 b1 a2; not the duplicate a1)
    assert committer.moved == {"transfer_bytes": 4 * 5000 + 2 * 1100, "packed_bytes": 2200, "tile_bytes": 2000,
                               "decode_seconds": 0.0}  # fmt: skip
    assert committer.bytes_in / 6 < 2048  # what reached the driver per region


def test_a_failed_write_fails_its_slide_and_the_others_go_on(store, tmp_path, caplog):
    store, schema = store
    bad = tmp_path / "not-a-table"
    bad.write_text("a file where the table's directory should be")
    meta = write_region_fragments(
        _embedded([("a", 0, ""), ("b", 0, "")]), uri=str(bad / REGIONS), schema=schema, model_id=MID
    )
    assert "retrying" not in caplog.text  # "Not a directory (os error 20)" does not go away by waiting
    assert meta["fragment"].to_pylist() == ["", ""]
    assert all(e.startswith("writing region rows to ") and "not-a-table" in e for e in meta["error"].to_pylist())
    finished: list = []
    committer = _committer(store, {"a": 1, "b": 1}, finished)
    committer.add(meta)
    committer.close()
    assert {r["slide_id"]: r["status"] for r in store.latest_slides(SPEC, MID).to_pylist()} == {
        "a": "failed",
        "b": "failed",
    }


def test_uncommitted_fragments_are_removed_and_committed_ones_kept(store):
    store, schema = store
    kw = dict(uri=store.uri(REGIONS), schema=schema, model_id=MID)
    committer = _committer(store, {"a": 1}, [])
    committer.add(write_region_fragments(_embedded([("a", 0, "")]), **kw))
    write_region_fragments(_embedded([("z", 0, "")]), **kw)  # written by a run that then died
    assert store.remove_uncommitted(keep_versions_days=7) > 0
    assert store.remove_uncommitted(keep_versions_days=7) == 0
    assert store.regions(SPEC, model_id=MID)["slide_id"].to_pylist() == ["a"]
    assert store.read(SLIDES).num_rows == 1


def test_tidy_merges_the_fragments_of_many_commits_and_keeps_every_row(store):
    store, schema = store
    kw = dict(uri=store.uri(REGIONS), schema=schema, model_id=MID)
    committer = _committer(store, {f"s{i}": 2 for i in range(6)}, [])
    for i in range(6):
        committer.add(write_region_fragments(_embedded([(f"s{i}", 0, ""), (f"s{i}", 1, "")]), **kw))
    committer.close()
    before = store.regions(SPEC, model_id=MID)
    assert len(store.dataset(REGIONS).get_fragments()) >= 6 and len(store.dataset(SLIDES).get_fragments()) == 6
    line = store.tidy(keep_versions_days=0)
    assert len(store.dataset(REGIONS).get_fragments()) == 1 == len(store.dataset(SLIDES).get_fragments())
    assert line == "regions.lance 1 fragments, 1 versions; slides.lance 1 fragments, 1 versions"
    assert store.regions(SPEC, model_id=MID).equals(before)
