"""The tile backend reads what OpenSlide reads: same levels, downsamples, MPP properties and
pixels (interior, edge and beyond-the-edge regions, every level), and fails bad tiles alone."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hipt_ray.config import load_config
from hipt_ray.slide_ref import SlideRef
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
            boxes += [
                ((256 * step, 512 * step), (700, 300)),
                (((lw - 200) * step, (lh - 100) * step), (512, 400)),
                ((-100 * step, -50 * step), (300, 200)),
            ]
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
    cfg = load_config(
        "tile",
        values={"slides": "x", "out": str(tmp_path / "o")},
        overrides=[f"storage.cache_dir={tmp_path / 'c'}", "tiling.mpp_overrides={gray: 0.5}"],
    )
    slide, _ = open_slide(SlideRef("gray", str(tmp_path / "gray.tiff"), 0.5), cfg, cache=make_cache(cfg))
    assert slide.backend == "openslide" and slide.dimensions == (1024, 768)
    slide, _ = open_slide(SlideRef("good", str(slide_set["good"])), cfg, cache=make_cache(cfg))
    assert slide.backend == "tiles"
    tiles_only = load_config(
        "tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.backend=tiles"]
    )
    with pytest.raises(SlideError, match="reader.backend=tiles reads generic tiled TIFF and Aperio SVS only"):
        open_slide(SlideRef("gray", str(tmp_path / "gray.tiff"), 0.5), tiles_only, cache=make_cache(cfg))
    forced = load_config(
        "tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.backend=openslide"]
    )
    assert open_slide(SlideRef("good", str(slide_set["good"])), forced, cache=make_cache(cfg))[0].backend == "openslide"


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
    cfg = load_config(
        "tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=[f"storage.cache_dir={tmp_path / 'c'}"]
    )
    for name, reason in (
        ("zero", r"tile \(1, 0\) of level 0 is empty"),
        ("junk", r"tile \(1, 0\) of level 0 failed to decode"),
    ):
        with Slide(str(tmp_path / f"{name}.tiff"), source=TiledTiff(str(tmp_path / f"{name}.tiff"))) as s:
            with pytest.raises(SlideError, match=reason + r".*re-export or re-upload it"):
                s.read_region((0, 0), (512, 256), 0.5)
    result = tile_slide(SlideSpec("junk", str(tmp_path / "junk.tiff")), cfg, cache=make_cache(cfg), spec_hash="h")
    if result.slide["status"] == "failed":  # the probe patch may or may not touch the bad tile
        assert "failed to decode" in result.slide["error"] and str(tmp_path / "junk.tiff") in result.slide["error"]
    assert result.slide["backend"] == "tiles"


def _split_jpeg(stream: bytes) -> tuple[bytes, bytes]:
    """A whole JPEG → (tables-only stream: SOI, DQT/DHT, EOI; abbreviated stream without them),
    as scanners write TIFF tiles that share one JPEGTables tag."""
    import struct

    tables, rest, i = [], [], 2
    while True:
        marker, length = stream[i + 1], struct.unpack(">H", stream[i + 2 : i + 4])[0]
        part = stream[i : i + 2 + length]
        if marker == 0xDA:  # start of scan: the entropy-coded data and EOI follow
            rest.append(stream[i:])
            break
        (tables if marker in (0xDB, 0xC4) else rest).append(part)
        i += 2 + length
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def _write_abbreviated(src: str, dest, *, with_tables: bool = True) -> tuple[list[np.ndarray], tuple[int, int]]:
    """``src``'s level 0 rewritten with abbreviated tiles and one JPEGTables tag (or none);
    returns the tiles' pixels as written and the tile shape."""
    import simplejpeg

    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        data = open(src, "rb").read()
        tiles = [data[o : o + n] for o, n in zip(page.dataoffsets, page.databytecounts)]
        shape, tile, res = (
            (page.imagelength, page.imagewidth, 3),
            (page.tilelength, page.tilewidth),
            page.tags[282].value,
        )
    # every tile encoded with the same tables, as a scanner does
    pixels = [simplejpeg.decode_jpeg(t, colorspace="RGB") for t in tiles]
    encoded = [simplejpeg.encode_jpeg(p, quality=90, colorspace="RGB", colorsubsampling="420") for p in pixels]
    tables = _split_jpeg(encoded[0])[0]
    abbreviated = [_split_jpeg(e)[1] for e in encoded]
    extratags = [(347, 7, len(tables), tables, True)] if with_tables else []
    tifffile.imwrite(
        dest,
        iter(abbreviated),
        shape=shape,
        dtype=np.uint8,
        tile=tile,
        compression="jpeg",
        photometric="ycbcr",
        subsampling=(2, 2),
        resolution=(res[0] / res[1], res[0] / res[1]),
        resolutionunit="CENTIMETER",
        extratags=extratags,
    )
    return [simplejpeg.decode_jpeg(e, colorspace="RGB") for e in encoded], tile


def test_abbreviated_tiles_read_with_the_shared_jpeg_tables_and_fail_without_them(slide_set, tmp_path):
    pixels, (th, tw) = _write_abbreviated(str(slide_set["small"]), tmp_path / "abbr.tiff")
    src = TiledTiff(str(tmp_path / "abbr.tiff"))
    assert src._levels[0].jpegtables  # the tables came from the tag, the tiles lack them
    first = src.read_rgb((0, 0), 0, (tw, th))
    assert int(np.abs(first.astype(int) - pixels[0]).max()) <= 1
    ref = Slide(str(tmp_path / "abbr.tiff"))  # OpenSlide reads the same file the same way
    assert np.array_equal(
        ref.read_region((0, 0), (1024, 768), 0.5)[0], Slide("abbr", source=src).read_region((0, 0), (1024, 768), 0.5)[0]
    )
    # scaled decoding splices the tables in front of each tile too
    assert src.can_scale(0, 2)
    half = src.read_rgb((0, 0), 0, (tw // 2, th // 2), scale=2)
    exact = np.asarray(ref._osr.read_region((0, 0), 0, (tw, th)))[..., :3].reshape(th // 2, 2, tw // 2, 2, 3)
    assert np.abs(half.astype(float) - exact.mean(axis=(1, 3))).mean() < 3
    _write_abbreviated(str(slide_set["small"]), tmp_path / "notables.tiff", with_tables=False)
    with Slide("notables", source=TiledTiff(str(tmp_path / "notables.tiff"))) as s:
        with pytest.raises(SlideError, match=r"tile \(0, 0\) of level 0 failed to decode.*corrupt"):
            s.read_region((0, 0), (512, 512), 0.5)


def test_an_ifd_loop_fails_the_slide_with_a_reason(slide_set, tmp_path):
    import struct

    path = slide_set["good"]
    with tifffile.TiffFile(path) as tif:
        offsets = [p.offset for p in tif.pages]
        last = tif.pages[-1]
        next_at = last.offset + 8 + 20 * len(last.tags) if tif.is_bigtiff else last.offset + 2 + 12 * len(last.tags)
        fmt = "<Q" if tif.is_bigtiff else "<I"
    data = bytearray(path.read_bytes())
    assert struct.unpack_from(fmt, data, next_at)[0] == 0  # the last IFD ends the chain …
    struct.pack_into(fmt, data, next_at, offsets[0])  # … now it points back to the first
    (tmp_path / "loop.tiff").write_bytes(bytes(data))
    cfg = load_config(
        "tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=[f"storage.cache_dir={tmp_path / 'c'}"]
    )
    result = tile_slide(SlideSpec("loop", str(tmp_path / "loop.tiff")), cfg, cache=make_cache(cfg), spec_hash="h")
    assert result.slide["status"] == "failed"
    assert f"directory {len(offsets) - 1} (at offset {offsets[-1]}) loops back to directory 0" in result.slide["error"]
    assert "corrupt or truncated; re-export or re-upload it" in result.slide["error"]
    assert result.slide["error"].startswith(str(tmp_path / "loop.tiff"))


def test_scaled_decode_is_opt_in_close_to_exact_and_exact_off_the_grid(slide_set, tmp_path):
    path = str(slide_set["forty"])  # 0.25 µm/px: a 0.5 µm/px region reads level 0 and halves it
    exact, scaled = Slide(path, source=TiledTiff(path)), Slide(path, source=TiledTiff(path), scaled_decode=True)
    assert (exact.backend, scaled.backend) == ("tiles", "tiles+scaled")
    assert Slide(path, scaled_decode=True).backend == "openslide"  # OpenSlide has no scaled path
    w, h = exact.dimensions
    for xy in ((0, 0), (w - 2000, h - 1000)):  # interior and across the slide's corner
        a, b = exact.read_region(xy, (2048, 2048), 0.5)[0], scaled.read_region(xy, (2048, 2048), 0.5)[0]
        psnr = 10 * np.log10(255**2 / np.mean((a.astype(float) - b) ** 2))
        assert psnr > 40, (xy, psnr)  # close …
        assert xy != (0, 0) or psnr < 80  # … and really another decoder
    assert (b[500:, :] == 255).all() and (b[:, 1000:] == 255).all()  # beyond the corner: white
    odd = (1001, 777)  # not on the 20× pixel grid: read exactly rather than half a pixel off
    assert np.array_equal(exact.read_region(odd, (512, 512), 0.5)[0], scaled.read_region(odd, (512, 512), 0.5)[0])
    assert not scaled._osr.can_scale(0, 3)
    cfg = load_config("tile", values={"slides": "x", "out": str(tmp_path / "o")})
    on = load_config(
        "tile", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.scaled_decode=true"]
    )
    assert cfg.tiling_spec_hash() != on.tiling_spec_hash()  # scaled pixels never mix with exact ones
    assert open_slide(SlideRef("forty", path), on, cache=make_cache(on))[0].backend == "tiles+scaled"
