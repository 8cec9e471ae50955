from datetime import UTC, datetime, timedelta

import lance
import pyarrow as pa
import pytest

from hipt_ray.storage import OutputStoreError
from hipt_ray.store import REGIONS, SLIDES, Store


def _slide(sid, status, t=0, spec="h1"):
    return {
        "slide_id": sid,
        "uri": f"/x/{sid}.svs",
        "status": status,
        "spec_hash": spec,
        "n_regions": 1,
        "model_id": "",
        "time": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=t),
    }


def _region(sid, i, spec="h1"):
    return {"slide_id": sid, "region_index": i, "x": 4096 * i, "y": 0, "spec_hash": spec, "model_id": ""}


def test_round_trip_and_latest_status(tmp_path):
    store = Store(str(tmp_path))
    assert store.completed("h1") == {}
    store.append_slides([_slide("a", "failed")], [])
    store.append_slides([_slide("a", "ok", 1), _slide("b", "no_tissue", 1)], [_region("a", 0), _region("a", 1)])
    assert store.completed("h1") == {"a": "/x/a.svs", "b": "/x/b.svs"}
    assert store.completed("other") == {}
    table = lance.dataset(str(tmp_path / "regions.lance")).to_table()
    assert table.num_rows == 2 and table.schema.field("x").type == "int64"
    assert store.regions("h1")["region_index"].to_pylist() == [0, 1]
    assert lance.dataset(str(tmp_path / "slides.lance")).count_rows() == 3


def test_orphan_regions_of_a_killed_run_are_invisible_then_removed(tmp_path):
    store = Store(str(tmp_path))
    store.append_slides([_slide("a", "ok")], [_region("a", 0)])
    # a run killed between the two commits: regions of "b" without its status row
    store._append(REGIONS, store.read(REGIONS).slice(0, 0))  # no-op append is allowed
    store.append_slides([], [_region("b", 0), _region("b", 1)])
    assert store.regions("h1")["slide_id"].to_pylist() == ["a"]
    assert store.remove_orphans("h1") == ["b"]
    assert store.read(REGIONS)["slide_id"].to_pylist() == ["a"]
    assert store.read(SLIDES).num_rows == 1


def _versioned(sid, i, version, spec="h1"):
    return {**_region(sid, i, spec), "slide_version": version}


def _slide_v(sid, size, etag, t, status="ok"):
    return {**_slide(sid, status, t), "size": size, "etag": etag}


def test_regions_are_returned_once_whatever_the_table_holds(tmp_path):
    # What two runs on one output used to leave: every row and status row twice.
    store = Store(str(tmp_path))
    for t in (0, 1):
        store.append_slides([_slide("a", "ok", t)], [_region("a", 0), _region("a", 1)])
    assert store.read(REGIONS).num_rows == 4
    assert store.regions("h1")["region_index"].to_pylist() == [0, 1]
    # and from a table made by the current code as well (versions recorded)
    for t in (2, 3):
        store.append_slides([_slide_v("b", 10, "e1", t)], [_versioned("b", 0, "10:e1")])
    got = store.regions("h1", ["a", "b"], columns=["slide_id", "region_index"])
    assert list(zip(got["slide_id"].to_pylist(), got["region_index"].to_pylist())) == [("a", 0), ("a", 1), ("b", 0)]


def test_a_changed_slide_file_replaces_its_regions_at_its_status_commit(tmp_path):
    store = Store(str(tmp_path))
    store.append_slides([_slide_v("a", 10, "old", 0)], [_versioned("a", i, "10:old") for i in range(3)])
    # The file changed: a new grid of 2 regions is committed first (the job could die here) …
    store.append_slides([], [_versioned("a", i, "12:new") for i in range(2)])
    assert store.regions("h1", columns=["region_index", "slide_version"]).to_pylist() == [
        {"region_index": i, "slide_version": "10:old"} for i in range(3)
    ]
    # … and replaces the old grid when its status row lands; the old rows are then deleted.
    store.append_slides([_slide_v("a", 12, "new", 1)], [], replaces=["a"])
    assert store.regions("h1", columns=["region_index", "slide_version"]).to_pylist() == [
        {"region_index": i, "slide_version": "12:new"} for i in range(2)
    ]
    assert sorted(store.read(REGIONS)["slide_version"].to_pylist()) == ["12:new", "12:new"]


def test_leftovers_of_an_earlier_file_version_are_orphans(tmp_path):
    store = Store(str(tmp_path))
    store.append_slides([_slide("a", "ok", 0)], [_region("a", 0)])  # a table from before versions
    store.append_slides([], [_versioned("a", 0, "12:new"), _versioned("a", 1, "12:new")])
    store.append_slides([_slide_v("a", 12, "new", 1)], [])  # killed before retiring the old row
    assert store.regions("h1", columns=["region_index", "slide_version"]).to_pylist() == [
        {"region_index": 0, "slide_version": "12:new"},
        {"region_index": 1, "slide_version": "12:new"},
    ]
    assert store.remove_orphans("h1") == ["a"]
    assert store.read(REGIONS)["slide_version"].to_pylist() == ["12:new", "12:new"]
    assert store.remove_orphans("h1") == []


def test_current_regions_keeps_each_slides_current_rows_once_in_order():
    """Every rule of the selection at once, on a table in several chunks: a slide's rows of its
    current version only; unversioned rows only where a slide has no versioned row; unwanted
    slides dropped; duplicates once; rows sorted by slide then region index whatever they came in."""
    import pyarrow as pa

    from hipt_ray.store.tables import current_regions

    rows = [
        ("b", 1, "v2", "b1"),
        ("a", 0, None, "a0"),
        ("b", 0, "v1", "old"),
        ("c", 2, None, "c2"),
        ("b", 0, "v2", "b0"),
        ("a", 1, None, "a1"),
        ("z", 0, "v1", "no"),
        ("b", 1, "v2", "dup"),
        ("c", 0, "v9", "c0"),
        ("a", 0, None, "dup"),
        ("c", 1, None, "c1-unversioned"),
    ]
    cols = list(zip(*rows))
    table = pa.Table.from_arrays([pa.array(c) for c in cols], ["slide_id", "region_index", "slide_version", "tag"])
    table = pa.concat_tables([table.slice(0, 4), table.slice(4, 3), table.slice(7)])  # three chunks
    got = current_regions(table, {"a": "v1", "b": "v2", "c": "v9"})
    assert list(zip(got["slide_id"].to_pylist(), got["region_index"].to_pylist(), got["tag"].to_pylist())) == [
        ("a", 0, "a0"),
        ("a", 1, "a1"),
        ("b", 0, "b0"),
        ("b", 1, "b1"),
        ("c", 0, "c0"),
    ]
    assert current_regions(table, {}).num_rows == 0
    assert current_regions(table.slice(0, 0), {"a": "v1"}).num_rows == 0


def _file(tmp_path, name, data=b"x" * 10):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_plan_tiling_skips_done_redoes_changed_and_carries_refused(tmp_path):
    import os

    from hipt_ray.slide_ref import SlideRef
    from hipt_ray.storage import stat
    from hipt_ray.store.run import plan_run
    from hipt_ray.store.tables import slide_version

    store = Store(str(tmp_path / "out"))
    a, b, c = (_file(tmp_path, f"{s}.svs") for s in "abc")
    info = {p: stat(p) for p in (a, b)}
    store.append_slides(
        [{**_slide(s, "ok"), "uri": p, "size": info[p].size, "etag": info[p].version} for s, p in (("a", a), ("b", b))],
        [_region("a", 0), _region("b", 0)],
    )
    os.utime(b, (1, 1))  # b's file changes after it was tiled
    refs = [SlideRef("a", a), SlideRef("b", b, mpp_override=0.5), SlideRef("c", c)]
    plan = plan_run(store, refs, spec_hash="h1", refused=[(SlideRef("a", "/elsewhere/a.svs"), "shared id")])
    assert [r.slide_id for r in plan.todo] == ["b", "c"] and plan.todo[0].mpp_override == 0.5
    assert plan.skipped == 1 and plan.changed == 1 and plan.replaces == {"a", "b"}
    assert [(r["slide_id"], r["status"], r["error"]) for r in plan.carried] == [("a", "failed", "shared id")]
    row = plan.status_row("c", status="ok", n_regions=3)
    assert (row["uri"], row["spec_hash"], row["n_regions"], row["model_id"]) == (c, "h1", 3, "")
    assert all(r.version is None for r in plan.todo)  # new tilings record what they find
    assert slide_version(info[a].size, info[a].version) == f"{info[a].size}:{info[a].version}"


def test_plan_embedding_takes_the_slides_as_tiled(tmp_path):
    from hipt_ray.slide_ref import SlideRef
    from hipt_ray.store.run import plan_run
    from hipt_ray.store.tables import REGIONS_SCHEMA, embedding_fields

    store = Store(str(tmp_path))
    tiled = [
        {**_slide_v("a", 10, "e", 0), "n_regions": 2, "mpp": 0.25, "mpp_source": "override"},
        {**_slide_v("b", 10, "e", 0), "n_regions": 1},
        {**_slide_v("c", 10, "e", 0, status="failed"), "error": "c: corrupt"},
        {**_slide_v("d", 10, "e", 0, status="no_tissue")},
    ]
    store.append_slides(tiled, [_versioned("a", 0, "10:e"), _versioned("a", 1, "10:e"), _versioned("b", 0, "10:e")])
    # b was embedded from an earlier file; d was found empty for this model already
    store.append_slides(
        [
            {**_slide_v("b", 9, "old", 1), "model_id": "m"},
            {**_slide_v("d", 10, "e", 1, status="no_tissue"), "model_id": "m"},
        ]
    )
    schema = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(4, 8))
    plan = plan_run(
        store, [SlideRef(s, f"/x/{s}.svs") for s in "abcd"], spec_hash="h1", model_id="m", regions_schema=schema
    )
    assert plan.todo == [SlideRef("a", "/x/a.svs", 0.25, "10:e"), SlideRef("b", "/x/b.svs", None, "10:e")]
    assert plan.expected == {"a": 2, "b": 1} and plan.changed == 1 and plan.skipped == 1
    assert [(r["slide_id"], r["status"], r["model_id"]) for r in plan.carried] == [("c", "failed", "m")]
    assert plan.replaces == {"b"} and plan.regions_schema.field("emb4k").type == pa.list_(pa.float32(), 4)
    assert plan.status_row("a", status="ok", n_regions=2)["mpp_source"] == "override"
    assert store.slide_refs("h1")["a"] == plan.todo[0]  # one way from a row to a reference


def test_region_reads_carry_the_slide_reference(tmp_path):
    from hipt_ray.slide_ref import SlideRef

    store = Store(str(tmp_path))
    store.append_slides([_slide_v("a", 10, "e", 0)], [_versioned("a", 1, "10:e"), _versioned("a", 0, "10:e")])
    rows = store.region_reads("h1", [SlideRef("a", "/x/a.svs", 0.5, "10:e")], ["region_index", "x"]).to_pylist()
    assert [SlideRef.of_region(r) for r in rows] == [SlideRef("a", "/x/a.svs", 0.5, "10:e")] * 2
    assert [r["region_index"] for r in rows] == [0, 1]


def test_filters_quote_every_value(tmp_path):
    store = Store(str(tmp_path))
    store.append_slides([{**_slide("a", "ok"), "model_id": "it's"}])
    assert store.latest_slides("h1", "it's")["slide_id"].to_pylist() == ["a"]
    assert store.latest_slides("h1' OR '1'='1", "")["slide_id"].to_pylist() == []


def test_tokens_to_grid_is_row_major():
    import numpy as np

    from hipt_ray.store.tables import tokens_to_grid

    tokens = np.arange(2 * 3 * 4, dtype=np.float32)  # rows 2, cols 3, D 4
    grid = tokens_to_grid(tokens, 2, 3)
    assert grid.shape == (4, 2, 3) and grid.flags.c_contiguous
    assert grid[:, 1, 2].tolist() == tokens[(1 * 3 + 2) * 4 : (1 * 3 + 3) * 4].tolist()  # patch k = row·cols + col


def test_a_copy_that_keeps_size_and_mtime_is_seen_as_changed(tmp_path):
    # #31.4: cp -p / rsync -a keep the mtime; a different slide of the same size must not keep
    # the old one's regions
    import os

    from hipt_ray.slide_ref import SlideRef, same_version
    from hipt_ray.storage import stat
    from hipt_ray.store.run import plan_run

    path = _file(tmp_path, "a.svs", b"A" * 200_000)
    before = stat(path)
    store = Store(str(tmp_path / "out"))
    store.append_slides([{**_slide("a", "ok"), "uri": path, "size": before.size, "etag": before.version}])
    assert plan_run(store, [SlideRef("a", path)], spec_hash="h1").skipped == 1
    mtime = os.stat(path).st_mtime_ns
    with open(path, "r+b") as fh:  # another slide's bytes, same size, mtime put back
        fh.seek(199_000)
        fh.write(b"B")
    os.utime(path, ns=(mtime, mtime))
    now = stat(path)
    assert now.size == before.size and now.version.split("#")[0] == before.version.split("#")[0]
    plan = plan_run(store, [SlideRef("a", path)], spec_hash="h1")
    assert plan.changed == 1 and [r.slide_id for r in plan.todo] == ["a"]
    # a table written before fingerprints recorded the mtime alone: not every slide is redone
    assert same_version(f"10:{mtime}", f"10:{mtime}#abc") and not same_version(f"10:{mtime}#abd", f"10:{mtime}#abc")
    assert not same_version("10:1", "10:2#abc")


def test_existing_names_a_missing_table_and_opens_a_written_one(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(OutputStoreError, match=r"regions\.lance: the table is missing") as info:
        store.existing(REGIONS)
    assert info.value.config is False  # not a setting: rerunning writes it again
    store.append_slides([_slide("a", "ok")], [_region("a", 0)])
    assert store.existing(REGIONS).count_rows() == 1
