"""The tile backend reads what OpenSlide reads: same levels, downsamples, MPP properties and
pixels (interior, edge and beyond-the-edge regions, every level), and fails bad tiles alone."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hipt_ray.config import load_config
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.reader import Slide, SlideError, open_slide
from hipt_ray.slides.tiler import make_cache, tile_slide
from hipt_ray.slides.tiles import TiledTiff, open_tiled


@pytest.mark.parametrize("name", ["good", "forty", "small", "objective"])
def test_same_geometry_properties_and_pixels_as_openslide(slide_set, name):
    path = str(slide_set[name])
    ref, ours = Slide(path), Slide(path, source=TiledTiff(path))
    assert ours.backend == "tiles" and ref.backend == "openslide"
    assert ours._osr.level_dimensions == ref._osr.level_dimensions
    assert ours.level_downsamples == ref.level_downsamples
    assert (ours.mpp, ours.mpp_info.source, ours.vendor) == (ref.mpp, ref.mpp_info.source, ref.vendor)
    w, h = ref.dimensions
    for level, ds in enumerate(ref.level_downsamples):
        lw, lh = ref._osr.level_dimensions[level]
        boxes = [((0, 0), (lw + 37, lh + 21))]  # the whole level and a margin beyond its edges
        if ds == round(ds):  # level coordinates are whole: interior, edge and before-the-corner boxes
            step = round(ds)
            boxes += [((256 * step, 512 * step), (700, 300)), (((lw - 200) * step, (lh - 100) * step), (512, 400)),
                      ((-100 * step, -50 * step), (300, 200))]
        # (at fractional level coordinates OpenSlide interpolates and the tile backend takes the
        # nearest level pixel; region corners fall on whole level pixels where a pyramid halves exactly)
        for (x, y), size in boxes:
            a = np.asarray(ref._osr.read_region((x, y), level, size))
            b = ours._osr.read_region((x, y), level, size)
            a = np.where(a[..., 3:] == 0, 0, a)  # OpenSlide's transparent pixels are (0, 0, 0, 0) too
            assert np.array_equal(a, b), (level, x, y)
    for args in (((0, 0), (4096, 4096), 0.5), ((w - 1500, h - 900), (2048, 2048), 0.5), ((0, 0), (512, 512), 2.0)):
        assert np.array_equal(ref.read_region(*args)[0], ours.read_region(*args)[0])
    assert np.array_equal(ref.read_lowres(8.0)[0], ours.read_lowres(8.0)[0])


def test_auto_falls_back_to_openslide_and_tiles_alone_refuses(slide_set, tmp_path):
    gray = np.tile(np.linspace(40, 230, 1024, dtype=np.uint8), (768, 1))
    tifffile.imwrite(tmp_path / "gray.tiff", gray, tile=(256, 256), compression="jpeg", photometric="minisblack")
    assert open_tiled(str(tmp_path / "gray.tiff")) is None  # one sample per pixel: not this backend's
    cfg = load_config("tile", values={"slides": "x", "out": str(tmp_path / "o")},
                      overrides=[f"storage.cache_dir={tmp_path / 'c'}", "tiling.mpp_overrides={gray: 0.5}"])
    slide, _ = open_slide(str(tmp_path / "gray.tiff"), cfg, cache=make_cache(cfg), mpp_override=0.5)
    assert slide.backend == "openslide" and slide.dimensions == (1024, 768)
    slide, _ = open_slide(str(slide_set["good"]), cfg, cache=make_cache(cfg))
    assert slide.backend == "tiles"
    tiles_only = load_config("tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.backend=tiles"])
    with pytest.raises(SlideError, match="reader.backend=tiles reads generic tiled TIFF and Aperio SVS only"):
        open_slide(str(tmp_path / "gray.tiff"), tiles_only, cache=make_cache(cfg), mpp_override=0.5)
    forced = load_config("tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.backend=openslide"])
    assert open_slide(str(slide_set["good"]), forced, cache=make_cache(cfg))[0].backend == "openslide"


def test_bad_tiles_fail_the_slide_with_a_reason(slide_set, tmp_path):
    good = slide_set["small"]
    with tifffile.TiffFile(good) as tif:
        page = tif.pages[0]
        off, n = int(page.dataoffsets[1]), int(page.databytecounts[1])
        tags = {t.name: t for t in page.tags}
    data = bytearray(good.read_bytes())
    # a zero-length tile: its byte count rewritten to 0
    counts = tags["TileByteCounts"]
    kind = {3: "<H", 4: "<I", 16: "<Q"}[counts.dtype]
    import struct

    zero = bytearray(data)
    width = struct.calcsize(kind)
    struct.pack_into(kind, zero, counts.valueoffset + width, 0)
    (tmp_path / "zero.tiff").write_bytes(bytes(zero))
    # garbage in place of a tile's JPEG data
    junk = bytearray(data)
    junk[off : off + n] = bytes(n)
    (tmp_path / "junk.tiff").write_bytes(bytes(junk))
    cfg = load_config("tile", values={"slides": "x", "out": str(tmp_path / "o")},
                      overrides=[f"storage.cache_dir={tmp_path / 'c'}"])
    for name, reason in (("zero", r"tile \(1, 0\) of level 0 is empty"), ("junk", r"tile \(1, 0\) of level 0 failed to decode")):
        with Slide(str(tmp_path / f"{name}.tiff"), source=TiledTiff(str(tmp_path / f"{name}.tiff"))) as s:
            with pytest.raises(SlideError, match=reason + r".*re-export or re-upload it"):
                s.read_region((0, 0), (512, 256), 0.5)
    result = tile_slide(SlideSpec("junk", str(tmp_path / "junk.tiff")), cfg, cache=make_cache(cfg), spec_hash="h")
    if result.slide["status"] == "failed":  # the probe patch may or may not touch the bad tile
        assert "failed to decode" in result.slide["error"] and str(tmp_path / "junk.tiff") in result.slide["error"]
    assert result.slide["backend"] == "tiles"
