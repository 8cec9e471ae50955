import numpy as np
import pytest

from hipt_ray.slides.reader import Slide, SlideError, composite_on_white, resolve_mpp


def test_metadata_and_objective_mpp(slide_set):
    with Slide(str(slide_set["good"])) as s:
        assert s.mpp_info.source == "metadata" and s.mpp == pytest.approx(0.5)
        assert s.vendor == "generic-tiff" and len(s.level_downsamples) >= 2
    with Slide(str(slide_set["forty"])) as s:
        assert s.vendor == "aperio" and s.mpp == pytest.approx(0.25)
    with Slide(str(slide_set["objective"])) as s:
        assert s.mpp_info.source == "objective" and s.mpp == pytest.approx(10 / 20)


def test_missing_mpp_says_how_to_override(slide_set):
    with pytest.raises(SlideError, match=r"no MPP.*'mpp' column.*tiling\.mpp_overrides"):
        Slide(str(slide_set["nompp"]), name="nompp")
    with Slide(str(slide_set["nompp"]), mpp_override=0.5) as s:
        assert s.mpp_info.source == "override"


def test_absurd_mpp_is_an_error_not_a_guess(slide_set):
    with pytest.raises(SlideError, match=r"MPP 50 .*outside the sane range 0.1–2"):
        Slide(str(slide_set["absurd"]))
    with pytest.raises(SlideError, match="non-square"):
        resolve_mpp({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.8"}, override=None,
                    mpp_range=(0.1, 2), name="x")


@pytest.mark.parametrize("name, match", [
    ("notaslide", "not a slide OpenSlide can read"),
    ("empty", "empty"),
    ("truncated", "corrupt or truncated|not a slide"),
])
def test_unreadable_files_name_the_problem(slide_set, name, match):
    with pytest.raises(SlideError, match=match):
        Slide(str(slide_set[name]), name=str(slide_set[name]))


def test_region_exact_size_and_edge_padding_is_white(slide_set):
    with Slide(str(slide_set["good"])) as s:
        w0, h0 = s.dimensions
        rgb, level = s.read_region((w0 - 1000, h0 - 500), (2048, 1024), 0.5)
        assert rgb.shape == (1024, 2048, 3) and rgb.dtype == np.uint8 and level == 0
        assert (rgb[:, 1000:] == 255).all() and (rgb[500:] == 255).all()
        assert (rgb[:500, :1000] != 255).any()
        # 2 µm/px is read from the 4× level, not resampled from level 0
        rgb, level = s.read_region((0, 0), (512, 512), 2.0)
        assert rgb.shape == (512, 512, 3) and s.level_downsamples[level] == pytest.approx(4, rel=1e-3)


def test_40x_region_covers_8192_level0_px_and_matches_20x_twin(twin_slides):
    p40, p20 = twin_slides
    with Slide(str(p40)) as s40, Slide(str(p20)) as s20:
        assert s40.mpp == pytest.approx(0.25) and s20.mpp == pytest.approx(0.5)
        a, level40 = s40.read_region((0, 0), (4096, 4096), 0.5)
        b, _ = s20.read_region((0, 0), (4096, 4096), 0.5)
        assert level40 == 0 and a.shape == b.shape == (4096, 4096, 3)
        # and the next region starts 8192 level-0 px to the right on the 40× slide
        c, _ = s40.read_region((8192, 0), (256, 4096), 0.5)
        d, _ = s20.read_region((4096, 0), (256, 4096), 0.5)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert (a != 255).mean() > 0.05  # the region holds tissue, not only glass
    assert diff.mean() < 3.0, diff.mean()
    assert np.abs(c.astype(np.int16) - d.astype(np.int16)).mean() < 3.0
    # a misplaced read (one patch off) would differ far more
    assert np.abs(a[:, 256:].astype(np.int16) - b[:, :-256].astype(np.int16)).mean() > 3 * diff.mean()


def test_composite_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    out = composite_on_white(rgba)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]
