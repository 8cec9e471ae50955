"""A region packed as its compressed tiles decodes to exactly the pixels the read path gives
(every resampling kind, edges, DCT-scaled 40×), travels as a few plain columns about the size
of its tiles, and fails a corrupt tile with the read path's reason."""

from __future__ import annotations

import numpy as np
import pytest

from hipt_ray.slides import synthetic
from hipt_ray.slides.packed import PackedRegion, TileError, decode_region, region_error
from hipt_ray.slides.reader import Slide, SlideError
from hipt_ray.slides.tiles import TiledTiff


def _through_columns(region: PackedRegion) -> PackedRegion:
    cols = region.to_columns()
    assert set(cols) == {"tiles", "layout", "tables", "packing"}
    return PackedRegion.from_columns(**cols)


@pytest.mark.parametrize(
    "name, xy, size, mpp, scaled, resample, scale",
    [
        ("good", (0, 0), (1024, 768), 0.5, False, "none", 1),  # level 0 as stored
        ("good", (3000, 1500), (2048, 2048), 0.5, False, "none", 1),  # across the slide's corner
        ("good", (512, 256), (512, 512), 2.0, False, "none", 1),  # a coarser level
        ("good", (1000, 600), (700, 500), 0.7, False, "lanczos", 1),  # non-integer: Lanczos
        ("forty", (0, 0), (2048, 2048), 0.5, False, "reduce", 1),  # 40× read at 20×: exact reduce
        ("forty", (4000, 2000), (2048, 2048), 0.5, False, "reduce", 1),  # … at the edge
        ("forty", (0, 0), (2048, 2048), 0.5, True, "none", 2),  # DCT-scaled 40×
        ("forty", (-512, -512), (1024, 1024), 0.5, True, "none", 2),  # scaled, before the corner
    ],
)
def test_packed_region_decodes_to_the_read_pixels(slide_set, name, xy, size, mpp, scaled, resample, scale):
    path = str(slide_set[name])
    with Slide(path, source=TiledTiff(path), scaled_decode=scaled) as slide:
        region = slide.pack_region(xy, size, mpp)
        assert region is not None and (region.resample, region.tiles.scale) == (resample, scale)
        got = decode_region(_through_columns(region))
        want, _ = slide.read_region(xy, size, mpp)
    assert got.shape == (size[1], size[0], 3) and np.array_equal(got, want)
    if scale == 1 and resample != "lanczos":  # and they are OpenSlide's pixels
        with Slide(path) as ref:
            assert np.array_equal(got, ref.read_region(xy, size, mpp)[0])


def test_packed_columns_are_about_the_size_of_the_tiles(slide_set):
    path = str(slide_set["good"])
    with Slide(path, source=TiledTiff(path)) as slide:
        region = slide.pack_region((0, 0), (4096, 4096), 0.5)
        cols = region.to_columns()
        tiles = region.compressed_bytes
        total = sum(len(v) if isinstance(v, (bytes, str)) else v.nbytes for v in cols.values())
        assert tiles == len(cols["tiles"]) > 0 and len(region.tiles) > 100  # 256 px tiles
        assert total / tiles < 1.05, total / tiles
        assert slide.pack_region((10**6, 10**6), (256, 256), 0.5).compressed_bytes == 0  # outside: no tiles
        outside = decode_region(slide.pack_region((10**6, 10**6), (256, 256), 0.5))
        assert (outside == 255).all()


def test_openslide_slides_do_not_pack(slide_set):
    with Slide(str(slide_set["good"])) as slide:
        assert slide.pack_region((0, 0), (512, 512), 0.5) is None


def test_a_corrupt_tile_fails_with_the_read_paths_reason(tmp_path):
    path = tmp_path / "bad.tiff"
    synthetic.make_slide(path, width_um=1500, height_um=1100, seed=3, n_blobs=1)
    synthetic.corrupt_tiles(path)
    with Slide(str(path), source=TiledTiff(str(path))) as slide:
        region = _through_columns(slide.pack_region((0, 0), (512, 512), 0.5))  # packing does not decode
        with pytest.raises(SlideError) as read:
            slide.read_region((0, 0), (512, 512), 0.5)
    with pytest.raises(TileError) as decoded:
        decode_region(region)
    assert region_error(decoded.value) == str(read.value)
    assert "failed to decode" in str(read.value) and str(path) in str(read.value)


class _OwnDecoder:
    """Another container's picklable tile decoder (as the DICOM backend's frame decoder is)."""

    jpeg = True

    def __call__(self, data: bytes, index: int, jpegtables: bytes | None = None) -> tuple:
        import imagecodecs

        return imagecodecs.jpeg8_decode(data, tables=jpegtables, colorspace="YCBCR", outcolorspace="RGB"), None, None


def test_another_containers_picklable_decoder_travels_with_the_region(slide_set):
    path = str(slide_set["good"])
    source = TiledTiff(path)
    with Slide(path, source=TiledTiff(path)) as ref:
        want = ref.read_region((256, 256), (1024, 512), 0.5)[0]
    source._levels[0].codec = _OwnDecoder()
    with Slide(path, source=source) as slide:
        region = _through_columns(slide.pack_region((256, 256), (1024, 512), 0.5))
    assert isinstance(region.tiles.codec, _OwnDecoder) and np.array_equal(decode_region(region), want)
    source = TiledTiff(path)
    source._levels[0].codec = None  # a level whose decoder cannot travel: read as pixels
    with Slide(path, source=source) as slide:
        assert slide.pack_region((256, 256), (1024, 512), 0.5) is None
        assert np.array_equal(slide.read_region((256, 256), (1024, 512), 0.5)[0], want)


def test_dicom_items_are_joined_and_a_broken_run_is_refused():
    """A frame a Basic Offset Table locates is its run of items; a run that is not whole items
    (a wrong table, a truncated file) is refused, and the tile read names the file as corrupt."""
    import struct

    from hipt_ray.slides.packed import join_items

    def item(b: bytes) -> bytes:
        return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(b)) + b

    assert join_items(item(b"\xff\xd8ab") + item(b"cd\xff\xd9")) == b"\xff\xd8abcd\xff\xd9"
    assert join_items(b"") == b""
    assert join_items(item(b"abcd")[:-1]) is None  # cut short
    assert join_items(b"\xff\xd8" + item(b"ab")) is None  # not an item header where one must be
