from datetime import datetime, timedelta, timezone

import lance

from hipt_ray.store import REGIONS, SLIDES, Store


def _slide(sid, status, t=0, spec="h1"):
    return {"slide_id": sid, "uri": f"/x/{sid}.svs", "status": status, "spec_hash": spec,
            "n_regions": 1, "model_id": "", "time": datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=t)}


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
