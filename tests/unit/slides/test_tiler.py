import io
import re

import pytest
from PIL import Image

from hipt_ray.config import load_config
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.tiler import make_cache, tile_slide

from ...conftest import EXPECTED

# What each bad input's reason must say: the problem and what to do.
REASONS = {
    "notaslide": "not a slide OpenSlide can read",
    "empty": r"empty \(0 bytes\)",
    "truncated": "corrupt or truncated|not a slide",
    "corrupt": "failed to decode.*re-export or re-upload",
    "nompp": "no MPP.*mpp_overrides",
    "absurd": "outside the sane range",
    "blank": "no region reaches tiling.min_tissue_fraction",
}


@pytest.fixture(scope="module")
def results(slide_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cfg = load_config(
        "tile", values={"slides": "unused", "out": str(out)}, overrides=[f"storage.cache_dir={out / 'cache'}"]
    )
    cache = make_cache(cfg)
    return {
        name: tile_slide(SlideSpec(name, str(path)), cfg, cache=cache, spec_hash="h")
        for name, path in slide_set.items()
    }, out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_input_gets_its_status_and_reason(results, slide_set, name):
    result = results[0][name]
    assert result.slide["status"] == EXPECTED[name], result.slide["error"]
    if name in REASONS:
        assert str(slide_set[name]) in result.slide["error"]  # names the file
        assert result.slide["error"].count("\n") == 0
        assert re.search(REASONS[name], result.slide["error"]), result.slide["error"]
    if EXPECTED[name] != "ok":
        assert result.regions == [] and result.slide["n_regions"] == 0


def test_ok_slides_record_scale_and_provenance(results):
    res = results[0]
    forty = res["forty"]
    assert forty.slide["mpp"] == pytest.approx(0.25) and forty.slide["mpp_source"] == "metadata"
    assert all(r["level0_w"] in (8192, r["read_w"] * 2) for r in forty.regions)
    assert res["objective"].slide["mpp_source"] == "objective"
    (small,) = res["small"].regions
    assert (small["valid_w"], small["valid_h"], small["read_w"], small["read_h"]) == (3000, 2200, 3072, 2304)
    good = res["good"]
    assert good.slide["n_regions"] == len(good.regions) >= 2
    assert [r["region_index"] for r in good.regions] == list(range(len(good.regions)))
    assert all(r["tissue_fraction"] >= 0.1 for r in good.regions)


def test_qc_png_drawn(results):
    res, out = results
    png = (out / "qc" / "good.png").read_bytes()
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (625, 375)  # 5000×3000 µm at 8 µm/px (≤ 1024)
    px = img.convert("RGB").getdata()
    assert (20, 60, 255) in set(px) and (0, 200, 0) in set(px)  # region boxes and tissue contour
    assert res["good"].slide["qc_uri"].endswith("qc/good.png")


def test_mpp_override_from_config(slide_set, tmp_path):
    cfg = load_config(overrides=["tiling.mpp_overrides={nompp: 0.5}", f"storage.cache_dir={tmp_path}"])
    r = tile_slide(SlideSpec("nompp", str(slide_set["nompp"])), cfg, cache=make_cache(cfg), spec_hash="h")
    assert r.slide["status"] == "ok" and r.slide["mpp_source"] == "override"


@pytest.mark.parametrize("slide_id", ["nompp", "TCGA-A1.01"])
def test_the_mpp_hint_pastes_as_written(slide_set, tmp_path, slide_id):
    import shlex

    cfg = load_config(overrides=[f"storage.cache_dir={tmp_path}"])
    spec = SlideSpec(slide_id, str(slide_set["nompp"]))
    failed = tile_slide(spec, cfg, cache=make_cache(cfg), spec_hash="h").slide["error"]
    hint = re.search(r"adding (tiling\.mpp_overrides='[^']*') to the command", failed).group(1)
    assert slide_id in hint and str(slide_set["nompp"]) not in hint  # the id, not the path
    (override,) = shlex.split(hint)  # as a shell passes it
    cfg = load_config(overrides=[override, f"storage.cache_dir={tmp_path}"])
    r = tile_slide(spec, cfg, cache=make_cache(cfg), spec_hash="h")
    assert r.slide["status"] == "ok" and r.slide["mpp_source"] == "override" and r.slide["mpp"] == 0.5


def test_a_slide_over_the_region_cap_fails_with_a_reason(slide_set, tmp_path):
    cfg = load_config(overrides=["tiling.max_regions_per_slide=1", f"storage.cache_dir={tmp_path}"])
    r = tile_slide(SlideSpec("good", str(slide_set["good"])), cfg, cache=make_cache(cfg), spec_hash="h")
    assert r.slide["status"] == "failed" and r.regions == []
    assert "tiling.max_regions_per_slide=1" in r.slide["error"] and str(slide_set["good"]) in r.slide["error"]


def test_a_slide_larger_than_any_glass_slide_fails_with_its_size(slide_set, tmp_path):
    # a widened mpp_range let a wrong MPP turn a small image into hundreds of regions silently
    cfg = load_config(
        "tile", values={"slides": "unused", "out": str(tmp_path)}, overrides=["tiling.mpp_range=[0.1,300]"]
    )
    spec = SlideSpec("good", str(slide_set["good"]), mpp=100.0)  # 10000×6000 px → 1000 × 600 mm
    r = tile_slide(spec, cfg, cache=make_cache(cfg), spec_hash="h")
    assert r.slide["status"] == "failed" and r.regions == []
    assert re.search(
        r"at 100 µm/px \(from override\) its 10000×6000 pixels would measure 1,000 × 600 mm, "
        r"larger than any glass slide",
        r.slide["error"],
    ), r.slide["error"]
    ok = tile_slide(SlideSpec("good", str(slide_set["good"]), mpp=2.0), cfg, cache=make_cache(cfg), spec_hash="h")
    assert ok.slide["status"] == "ok", ok.slide["error"]  # 20 × 12 mm: a real slide's size
