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
        resolve_mpp({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.8"}, override=None, mpp_range=(0.1, 2), name="x")


@pytest.mark.parametrize(
    "name, match",
    [
        ("notaslide", "not a slide OpenSlide can read"),
        ("empty", "empty"),
        ("truncated", "corrupt or truncated|not a slide"),
    ],
)
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


def _region_row(ref, **kw):
    return {
        "slide_id": ref.slide_id,
        "uri": ref.uri,
        "mpp_override": ref.mpp_override,
        "slide_version": ref.version,
        "region_index": 0,
        "x": 0,
        "y": 0,
        "read_w": 512,
        "read_h": 256,
        "mpp": 0.5,
        **kw,
    }


def test_region_reader_opens_each_slide_once_and_refuses_a_changed_file(slide_set, tmp_path):
    from hipt_ray.config import load_config
    from hipt_ray.data import regions
    from hipt_ray.data.regions import RegionReader, read_region, reader_kwargs
    from hipt_ray.slide_ref import SlideRef, slide_version
    from hipt_ray.slides.packed import COLUMNS as PACKED_COLUMNS
    from hipt_ray.slides.packed import PackedRegion, decode_region
    from hipt_ray.storage import stat

    cfg = load_config(
        "embed",
        values={"slides": "x", "out": str(tmp_path / "o")},
        overrides=[f"storage.cache_dir={tmp_path / 'cache'}"],
    )
    info = stat(str(slide_set["good"]))
    ref = SlideRef("good", str(slide_set["good"]), version=slide_version(info.size, info.version))
    reader = RegionReader(cfg_dict=cfg.to_dict(), max_open=1)
    first = reader(_region_row(ref))  # packed: the compressed tiles leave, not the pixels
    assert first["error"] == "" and first["image"].size == 0 and first["read_seconds"] > 0
    region = PackedRegion.from_columns(**{c: first[c] for c in PACKED_COLUMNS})
    pixels = RegionReader(cfg_dict={**cfg.to_dict(), "embed": {**cfg.to_dict()["embed"], "decode": "reader"}})
    as_pixels = pixels(_region_row(ref))
    assert as_pixels["image"].shape == (256, 512, 3) and as_pixels["tiles"] == b"" and as_pixels["packing"] == ""
    assert np.array_equal(decode_region(region), as_pixels["image"])
    handle = reader.slide(ref)
    assert reader(_region_row(ref, x=512))["error"] == "" and reader.slide(ref) is handle  # kept open
    stale = SlideRef("good", ref.uri, version="1:not-this-file")
    bad = reader(_region_row(stale))
    assert "changed after it was tiled" in bad["error"] and bad["image"].size == 0 and bad["tiles"] == b""
    assert list(reader._open) == [ref]  # the failed open left nothing behind
    nompp = SlideRef("nompp", str(slide_set["nompp"]), mpp_override=0.5)
    assert reader(_region_row(nompp))["error"] == "" and list(reader._open) == [nompp]  # LRU of one
    # the task function keeps one reader per worker process and configuration
    kwargs = reader_kwargs(cfg)
    read_region(_region_row(ref), **kwargs)
    kept = regions._READERS[kwargs["key"]]
    read_region(_region_row(ref), **kwargs)
    assert regions._READERS[kwargs["key"]] is kept and reader_kwargs(cfg)["key"] == kwargs["key"]
    # stage-1 pretraining cuts patches right after the read: pixels whatever embed.decode says
    as_read = read_region(_region_row(ref), **reader_kwargs(cfg, pixels=True))
    assert as_read["tiles"] == b"" and np.array_equal(as_read["image"], as_pixels["image"])


def test_one_gpu_decision():
    import torch

    from hipt_ray.models.inference import inference_device, wants_gpu

    assert wants_gpu("auto", available=True) and not wants_gpu("auto", available=False)
    assert wants_gpu(True, available=False) and not wants_gpu(False, available=True)
    assert inference_device(False).type == "cpu"
    assert inference_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_listed_slide_and_a_region_row_give_one_reference():
    from hipt_ray.slide_ref import SlideRef
    from hipt_ray.slides.manifest import SlideSpec

    assert SlideSpec("a", "/s/a.svs", mpp=0.25).to_ref({"a": 0.5}) == SlideRef("a", "/s/a.svs", 0.25)
    assert SlideSpec("a", "/s/a.svs").to_ref({"a": 0.5}) == SlideRef("a", "/s/a.svs", 0.5)
    assert SlideSpec("b", "/s/b.svs").to_ref({"a": 0.5}) == SlideRef("b", "/s/b.svs")
    row = {"slide_id": "a", "uri": "/s/a.svs", "mpp_override": float("nan"), "slide_version": "1:e"}
    assert SlideRef.of_region(row) == SlideRef("a", "/s/a.svs", None, "1:e")
