import csv

import numpy as np
import openslide
import pytest

from hipt_ray.slides import synthetic


def test_synthetic_slide_is_a_real_pyramid(slide_set):
    s = openslide.OpenSlide(str(slide_set["good"]))
    assert s.level_count >= 2 and s.dimensions == (10000, 6000)
    assert float(s.properties["openslide.mpp-x"]) == 0.5
    assert s.properties["tiff.ImageDescription"] if "tiff.ImageDescription" in s.properties else True
    s.close()
    svs = openslide.OpenSlide(str(slide_set["forty"]))
    assert svs.properties["openslide.vendor"] == "aperio"
    assert svs.properties["openslide.objective-power"] == "40"


def test_planted_subtypes_differ_in_colour():
    means = [synthetic.tissue_tile(subtype=k).reshape(-1, 3).mean(0) for k in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(means[i] - means[j]).max() > 8


def test_planted_risk_darkens_tissue():
    low, high = synthetic.tissue_tile(risk=0.0), synthetic.tissue_tile(risk=1.0)
    assert high.mean() < low.mean() - 2


def test_demo_data_writes_slides_and_labels(tmp_path):
    out = synthetic.make_demo_data(tmp_path, n_slides=3, seed=1)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["slide_id"] for r in rows] == ["demo-000", "demo-001", "demo-002"]
    assert set(rows[0]) >= {"slide_id", "case_id", "subtype", "survival_months", "event"}
    for r in rows:
        assert float(r["survival_months"]) > 0 and r["event"] in ("0", "1")
    files = sorted(p.name for p in (out / "slides").iterdir())
    assert files == ["demo-000.tiff", "demo-001.svs", "demo-002.tiff"]


@pytest.mark.parametrize("size_um", [(1200.0, 1200.0), (1200.0, 1400.0)])
def test_demo_data_takes_any_size_range_with_min_at_most_max(tmp_path, size_um):
    import openslide

    from hipt_ray.slides.synthetic import make_demo_data

    out = make_demo_data(tmp_path / "d", n_slides=6, seed=0, size_um=size_um)  # slide 5 is 40×
    slides = sorted((out / "slides").iterdir())
    assert len(slides) == 6
    for p in slides:
        with openslide.OpenSlide(str(p)) as s:
            mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
            side_um = max(s.dimensions) * mpp
        lo, hi = size_um
        assert min(lo * 0.73, hi * 0.6) - 1 <= side_um <= hi + 1


def test_demo_data_refuses_min_above_max(tmp_path, capsys):
    from hipt_ray.cli import main

    assert main(["make-demo-data", str(tmp_path / "d"), "--size-um", "6000", "3000"]) == 2
    assert "--size-um" in capsys.readouterr().err and not (tmp_path / "d").exists()
