"""``tiling.mpp_tolerance``: a slide scanned at nearly the target MPP (TCGA's 0.504 µm/px for
0.5, or 0.2527 for 0.25) is read as exactly the target — whole, or reduced by a whole factor —
instead of Lanczos-resampled; 0 (the default) keeps every region at exactly ``tiling.mpp``, and
the tiling's identity changes only when the tolerance is set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hipt_ray.config import load_config
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides import synthetic
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.reader import Slide, make_cache, open_slide, snapped_mpp
from hipt_ray.slides.tiler import tile_slide


@pytest.mark.parametrize(
    ("mpp", "tolerance", "want"),
    [
        (0.504, 0.02, 0.5),  # Aperio 20× → 0.5, read whole
        (0.2527, 0.02, 0.25),  # Aperio 40× → 0.25, reduced by 2
        (0.2527, 0.0, 0.2527),  # no tolerance: exact, as before
        (0.52, 0.02, 0.52),  # 4 % off: not the same magnification
        (0.16, 0.02, 0.16),  # n = 3 would need 4 %
        (0.99, 0.05, 0.99),  # a coarser scan is never snapped finer
        (0.5, 0.02, 0.5),
    ],
)
def test_snapped_mpp(mpp, tolerance, want):
    assert snapped_mpp(mpp, 0.5, tolerance) == pytest.approx(want, abs=1e-12)


def _cfg(tmp_path, tolerance: float):
    return load_config(
        "tile",
        values={"slides": "unused", "out": str(tmp_path / "out")},
        overrides=[f"tiling.mpp_tolerance={tolerance}", f"storage.cache_dir={tmp_path / 'cache'}"],
    )


@pytest.mark.parametrize(("mpp", "resample", "factor"), [(0.504, "none", 1), (0.2527, "reduce", 2)])
def test_a_near_target_scan_is_read_whole_or_reduced_not_resampled(tmp_path, mpp, resample, factor):
    path = tmp_path / "scan.tiff"
    synthetic.make_slide(path, width_um=800, height_um=700, mpp=mpp, seed=3)
    ref = SlideRef("scan", str(path))
    with open_slide(ref, _cfg(tmp_path, 0.0), cache=make_cache(_cfg(tmp_path, 0.0)))[0] as exact:
        assert exact.mpp == exact.measured_mpp == pytest.approx(mpp)
        assert exact.pack_region((0, 0), (512, 512), 0.5).resample == "lanczos"
    cfg = _cfg(tmp_path, 0.02)
    with open_slide(ref, cfg, cache=make_cache(cfg))[0] as slide:
        assert slide.mpp == pytest.approx(0.5 / factor) and slide.measured_mpp == pytest.approx(mpp)
        packed = slide.pack_region((64, 32), (512, 512), 0.5)
        assert (packed.resample, packed.factor) == (resample, factor)
        got, _ = slide.read_region((64, 32), (512, 512), 0.5)
    with Slide(str(path)) as ref_slide:  # OpenSlide's level-0 pixels, box-averaged as PIL reduces
        box = ref_slide.read_region((64, 32), (512 * factor, 512 * factor), mpp)[0]
    want = np.asarray(Image.fromarray(box).reduce(factor)) if factor > 1 else box
    assert np.array_equal(got, want)


def test_the_tiler_records_the_slides_own_mpp_and_grids_at_the_snapped_one(tmp_path):
    path = tmp_path / "scan.tiff"
    synthetic.make_slide(path, width_um=4300, height_um=2100, mpp=0.504, seed=4)  # 2 × 1 regions
    rows = {}
    for tol in (0.0, 0.02):
        cfg = _cfg(tmp_path, tol)
        result = tile_slide(SlideSpec("scan", str(path)), cfg, cache=make_cache(cfg), spec_hash="h")
        assert result.slide["status"] == "ok" and result.slide["mpp"] == pytest.approx(0.504)
        rows[tol] = result.regions
    snapped = rows[0.02]
    assert all(r["read_mpp"] == pytest.approx(0.5) for r in snapped)
    assert all(r["read_mpp"] == pytest.approx(0.504) for r in rows[0.0])
    # a region of 4096 px covers 0.8 % more tissue when snapped: the grid steps 4096 level-0
    # pixels, against 4096 · 0.5 / 0.504 = 4063 exact
    assert sorted({r["x"] for r in snapped}) == [0, 4096]
    assert sorted({r["x"] for r in rows[0.0]}) == [0, 4063]


def test_the_tiling_identity_changes_only_when_a_tolerance_is_set():
    def cfg(*overrides: str):
        return load_config("tile", values={"slides": "x", "out": "o"}, overrides=list(overrides))

    base = cfg().tiling_spec_hash()
    assert cfg("tiling.mpp_tolerance=0").tiling_spec_hash() == base  # earlier outputs keep their identity
    assert cfg("tiling.mpp_tolerance=0.02").tiling_spec_hash() != base
    with pytest.raises(Exception, match="mpp_tolerance"):
        cfg("tiling.mpp_tolerance=0.1")  # 10 % off is another magnification, not a rounding
