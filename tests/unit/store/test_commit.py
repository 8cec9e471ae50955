"""The one committer both stages use: counts, batches and the visibility rule, on real Lance."""

from __future__ import annotations

import pytest

from hipt_ray.store import REGIONS, SLIDES, Store
from hipt_ray.store.commit import SlideCommitter, status_row

BASE = {"slide_id": "a", "uri": "/s/a.tiff", "spec_hash": "h1", "size": 10, "etag": "e"}


def _region(sid: str, i: int) -> dict:
    return {
        "slide_id": sid,
        "region_index": i,
        "x": 4096 * i,
        "y": 0,
        "spec_hash": "h1",
        "model_id": "",
        "slide_version": "10:e",
    }


def test_status_row_keeps_what_was_found_and_nulls_the_rest():
    row = status_row(BASE | {"not_a_column": 1}, status="ok", n_regions=3, seconds=1.23456)
    assert row["status"] == "ok" and row["n_regions"] == 3 and row["seconds"] == 1.235
    assert row["size"] == 10 and row["mpp"] is None and row["model_id"] == "" and "not_a_column" not in row
    assert status_row(row, status="failed", error="x", model_id="m")["model_id"] == "m"
    with pytest.raises(AssertionError):
        status_row(BASE, status="done")


def test_slides_are_counted_and_committed_in_batches_regions_first(tmp_path):
    store = Store(str(tmp_path))
    seen: list[tuple] = []
    committer = SlideCommitter(store, batch_slides=2, on_finished=lambda *a: seen.append(a[:2]))
    committer.add_slide(status_row(BASE, status="ok", n_regions=2), [_region("a", 0), _region("a", 1)])
    assert store.dataset(SLIDES) is None  # a batch is two slides: nothing committed yet
    committer.add_slide(status_row(BASE | {"slide_id": "b"}, status="failed", error="b: corrupt"))
    assert store.completed("h1") == {"a": "/s/a.tiff"}
    committer.add_slide(status_row(BASE | {"slide_id": "c"}, status="no_tissue"))
    assert store.read(SLIDES).num_rows == 2  # c waits for its batch …
    committer.close()  # … or the end of the run
    assert sorted(store.completed("h1")) == ["a", "c"]
    assert store.regions("h1")["region_index"].to_pylist() == [0, 1]
    assert dict(committer.counts) == {"ok": 1, "failed": 1, "no_tissue": 1} and committer.regions == 2
    assert seen == [("a", "ok"), ("b", "failed"), ("c", "no_tissue")]
    assert committer.commits == 3  # regions + status rows, then status rows alone


def test_a_slide_done_again_retires_its_old_rows(tmp_path):
    store = Store(str(tmp_path))
    first = SlideCommitter(store, batch_slides=1)
    first.add_slide(status_row(BASE, status="ok", n_regions=2), [_region("a", 0), _region("a", 1)])
    changed = {**BASE, "size": 12, "etag": "f"}
    again = SlideCommitter(store, batch_slides=1, replaces={"a"})
    again.add_slide(status_row(changed, status="ok", n_regions=1), [_region("a", 0) | {"slide_version": "12:f"}])
    assert store.read(REGIONS)["slide_version"].to_pylist() == ["12:f"]
