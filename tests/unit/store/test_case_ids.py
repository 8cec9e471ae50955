"""A slide's case (IDC's PatientID, a manifest's case_id) goes from its listing into
``slides.lance`` and back to every reader of the slide, also in a table written before the column."""

import lance
import pyarrow as pa

from hipt_ray.config import load_config
from hipt_ray.slides import synthetic
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.tiler import make_cache, tile_slide
from hipt_ray.store import SLIDES, SLIDES_SCHEMA, Store
from hipt_ray.store.commit import status_row
from hipt_ray.store.run import plan_run


def test_the_listed_case_is_planned_tiled_and_stored_with_the_slide(tmp_path):
    path = tmp_path / "s.tiff"
    synthetic.make_slide(path, width_um=1500, height_um=1100, mpp=0.5, seed=3, n_blobs=1)
    out = str(tmp_path / "out")
    cfg = load_config(
        "tile",
        values={"slides": "x", "out": out},
        overrides=["qc.enabled=false", f"storage.cache_dir={tmp_path / 'c'}"],
    )
    listed = SlideSpec("s", str(path), case_id="TCGA-AA-0001")
    refused = SlideSpec("twin", str(tmp_path / "twin.svs"), error="an id two files share", case_id="TCGA-AA-0002")
    store = Store(out)
    plan = plan_run(store, [listed.to_ref()], spec_hash="h", refused=[(refused.to_ref(), refused.error)])
    assert [r.case_id for r in plan.todo] == ["TCGA-AA-0001"] and plan.base["s"]["case_id"] == "TCGA-AA-0001"
    assert plan.carried[0]["case_id"] == "TCGA-AA-0002"  # a slide refused as listed keeps its case too
    # a table written before the column: appending adds it, null for the rows already there
    old = status_row({"slide_id": "old", "uri": "/o.svs", "spec_hash": "h"}, status="ok", n_regions=1)
    without = pa.schema([f for f in SLIDES_SCHEMA if f.name != "case_id"])
    lance.write_dataset(pa.Table.from_pylist([old], schema=without), store.uri(SLIDES))
    result = tile_slide(plan.todo[0], cfg, cache=make_cache(cfg), spec_hash="h")
    assert result.slide["status"] == "ok" and result.slide["case_id"] == "TCGA-AA-0001"
    store.append_slides([status_row(result.slide, status="ok", n_regions=len(result.regions))], result.regions)
    cases = dict(zip(*store.read(SLIDES, columns=["slide_id", "case_id"]).to_pydict().values()))
    assert cases == {"old": None, "s": "TCGA-AA-0001"}
    refs = store.slide_refs("h")
    assert refs["s"].case_id == "TCGA-AA-0001" and refs["old"].case_id is None
