"""The DICOM backend reads what OpenSlide 4 reads from the same series folder (levels,
downsamples, MPP properties, pixels of every level and at the edges), the pixels of the TIFF the
series was made from, locates frames by the cheapest index the file has, and fails a bad series
alone with a reason."""

from __future__ import annotations

import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import HTJ2K, JPEGLSLossless

from hipt_ray.config import load_config
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides import synthetic_dicom
from hipt_ray.slides.dicom import DicomSlide
from hipt_ray.slides.manifest import list_slides
from hipt_ray.slides.reader import Slide, SlideError, open_slide
from hipt_ray.slides.tiler import make_cache
from hipt_ray.slides.tiles import TiledTiff

VARIANTS = {  # name → (writer arguments, the frame index the reader should use)
    "tiff": (dict(tiff=True), "tiff"),
    "extended": (dict(offset_table="extended"), "extended"),
    "basic": (dict(offset_table="basic"), "basic"),
    "walk": ({}, "walk"),
    "jpeg2k": (dict(codec="jpeg2k", tiff=True), "tiff"),
    "jpeg2k-lossy": (dict(codec="jpeg2k-lossy", offset_table="basic"), "basic"),  # as TCGA's JPEG 2000 slides
    "fragments": (dict(offset_table="basic", fragments=3), "basic"),  # each frame split over 3 items
}


@pytest.fixture(scope="module")
def series(slide_set, tmp_path_factory) -> dict[str, Path]:
    """The 'small' synthetic slide (0.5 µm/px) as a series in each layout, and 'forty' (an
    Aperio SVS at 0.25 µm/px, 40×) as an IDC-like JPEG series with a TIFF personality."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for name, (kw, _) in VARIANTS.items():
        synthetic_dicom.write_dicom_twin(slide_set["small"], root / name, mpp=0.5, **kw)
        out[name] = root / name
    synthetic_dicom.write_dicom_twin(slide_set["forty"], root / "forty", mpp=0.25, objective=40, tiff=True)
    out["forty"] = root / "forty"
    return out


def _boxes(level_dims: tuple[int, int], ds: float) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    lw, lh = level_dims
    boxes = [((0, 0), (lw + 37, lh + 21))] if lw * lh < 2e7 else []  # the whole level and beyond its edges
    if ds == round(ds):
        step = round(ds)
        boxes += [
            ((256 * step, 512 * step), (700, 300)),
            (((lw - 200) * step, (lh - 100) * step), (512, 400)),  # the bottom-right edge
            ((-100 * step, -50 * step), (300, 200)),
        ]
    return boxes


@pytest.mark.parametrize("name", [*VARIANTS, "forty"])
def test_same_geometry_properties_and_pixels_as_openslide(series, name):
    folder = series[name]
    ref = Slide(str(folder / "level-0.dcm"))  # OpenSlide finds the other instances beside it
    ours = Slide(f"{folder}/", source=DicomSlide(f"{folder}/"))
    assert ref.vendor == ours.vendor == "dicom"
    assert ours._osr.level_dimensions == ref._osr.level_dimensions and len(ref.level_downsamples) >= 2
    assert ours.level_downsamples == ref.level_downsamples
    assert (
        (ours.mpp, ours.mpp_info.source)
        == (ref.mpp, ref.mpp_info.source)
        == ((0.25, "metadata") if name == "forty" else (0.5, "metadata"))
    )
    if name == "forty":
        assert ours.properties["openslide.objective-power"] == "40.0"
    method = VARIANTS.get(name, (None, "tiff"))[1]
    assert ours.properties["hipt-ray.frame-index"] == ",".join([method] * len(ref.level_downsamples))
    assert ours._osr.associated == ["thumbnail"]  # kept out of the pyramid
    for level, ds in enumerate(ref.level_downsamples):
        for xy, size in _boxes(ref._osr.level_dimensions[level], ds):
            a = np.asarray(ref._osr.read_region(xy, level, size))
            a = np.where(a[..., 3:] == 0, 0, a)  # OpenSlide's transparent pixels are (0, 0, 0, 0) too
            assert np.array_equal(a, ours._osr.read_region(xy, level, size)), (name, level, xy)
    w, h = ref.dimensions
    for args in (((0, 0), (2048, 2048), 0.5), ((w - 1500, h - 900), (2048, 2048), 0.5), ((0, 0), (512, 512), 2.0)):
        assert np.array_equal(ref.read_region(*args)[0], ours.read_region(*args)[0])
    assert np.array_equal(ref.read_lowres(8.0)[0], ours.read_lowres(8.0)[0])


@pytest.mark.parametrize("name", ["tiff", "walk", "jpeg2k", "fragments"])
def test_pixels_equal_the_tiff_the_series_was_made_from(series, slide_set, name):
    """JPEG frames are the TIFF's tiles, JPEG 2000 frames its decoded tiles losslessly: the
    same pixels either way, so the same embeddings."""
    tif, dcm = TiledTiff(str(slide_set["small"])), DicomSlide(f"{series[name]}/")
    assert tif.level_dimensions == dcm.level_dimensions
    for level, (lw, lh) in enumerate(tif.level_dimensions):
        assert np.array_equal(tif.read_rgb((0, 0), level, (lw, lh)), dcm.read_rgb((0, 0), level, (lw, lh)))
    assert dcm.can_scale(0, 2) is (name != "jpeg2k")  # DCT-scaled decoding is JPEG's alone
    lv = dcm._levels[0]
    decode = pickle.loads(pickle.dumps(lv.decode))  # a level's decode travels to other processes
    (frame,) = dcm._fetch([(int(lv.offsets[5]), int(lv.counts[5]))])
    frame = lv.codestream(frame)  # the fragments joined where a frame spans several
    assert np.array_equal(decode(frame, 5)[0], lv.decode(frame, 5)[0])
    if name != "jpeg2k":
        assert np.array_equal(
            tif.read_rgb((0, 0), 0, (512, 512), scale=2), dcm.read_rgb((0, 0), 0, (512, 512), scale=2)
        )


def test_tiff_personality_finds_frames_in_a_few_small_reads(series):
    """The TIFF personality's IFD (at the end of each file) is one ranged read per instance;
    the walk over item headers reads all the pixel data once."""
    sizes = sum(p.stat().st_size for p in series["tiff"].glob("level-*.dcm"))
    tiff, walk = DicomSlide(f"{series['tiff']}/"), DicomSlide(f"{series['walk']}/")
    n_levels = len(tiff.level_dimensions)
    assert tiff.requests == n_levels and tiff.bytes_read < 0.01 * sizes
    assert walk.requests == n_levels and walk.bytes_read > 0.95 * sizes
    before = tiff.requests, tiff.bytes_read
    region = tiff.read_rgb((0, 0), 0, (1024, 1024))
    assert region.shape == (1024, 1024, 3)
    lv = tiff._levels[0]
    frames = [r * lv.cols + c for r in range(4) for c in range(4)]
    assert tiff.requests - before[0] == 4  # 4 rows of 4 neighbouring frames: one coalesced read a row
    assert tiff.bytes_read - before[1] <= 1.15 * int(lv.counts[frames].sum())


def _cfg(tmp_path, *overrides: str):
    return load_config(
        "tile",
        values={"slides": "x", "out": str(tmp_path / "o")},
        overrides=[f"storage.cache_dir={tmp_path / 'c'}", *overrides],
    )


def test_open_slide_lists_reads_and_versions_a_series_folder(series, slide_set, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(series["tiff"], src / "case-1")
    shutil.copytree(series["jpeg2k"], src / "case-2")
    shutil.copy(slide_set["good"], src / "good.tiff")
    specs = list_slides(str(src))
    assert [(s.slide_id, s.uri) for s in specs] == [
        ("case-1", f"{src}/case-1/"),
        ("case-2", f"{src}/case-2/"),
        ("good", str(src / "good.tiff")),
    ]
    cfg = _cfg(tmp_path)
    slide, info = open_slide(specs[0].to_ref(), cfg, cache=make_cache(cfg))
    assert slide.backend == "tiles" and info.uri == f"{src}/case-1/" and info.version.startswith("series-")
    assert info.size == sum(p.stat().st_size for p in (src / "case-1").iterdir())
    ref = SlideRef("case-1", specs[0].uri, version=f"{info.size}:{info.version}")
    assert open_slide(ref, cfg, cache=make_cache(cfg))[1].version == info.version  # unchanged: opens
    forced = _cfg(tmp_path, "reader.backend=openslide")
    by_openslide, same = open_slide(ref, forced, cache=make_cache(cfg))
    assert by_openslide.backend == "openslide" and same.version == info.version
    (src / "case-1" / "thumbnail.dcm").unlink()  # any instance removed or replaced: another version
    with pytest.raises(SlideError, match="changed after it was tiled"):
        open_slide(ref, cfg, cache=make_cache(cfg))


# ---------------------------------------------------------------- bad input: one slide fails, with a reason


def _broken(series: dict[str, Path], tmp_path: Path, name: str = "extended") -> Path:
    folder = tmp_path / "bad"
    shutil.copytree(series[name], folder)
    return folder


JPEG_XL = "1.2.840.10008.1.2.4.112"  # pydicom 3.0 writes no JPEG XL: put in by hand (same length as HTJ2K's UID)


def _rewrite(path: Path, **changes) -> None:
    ds = dcmread(path)
    for key, value in changes.items():
        if key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = HTJ2K if value == JPEG_XL else value
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    if changes.get("TransferSyntaxUID") == JPEG_XL:
        data = path.read_bytes()
        path.write_bytes(data[:1024].replace(HTJ2K.encode(), JPEG_XL.encode()) + data[1024:])


def _fails(folder: Path, tmp_path: Path, match: str) -> str:
    cfg = _cfg(tmp_path)
    with pytest.raises(SlideError, match=match) as err:
        slide, _ = open_slide(SlideRef("bad", f"{folder}/"), cfg, cache=make_cache(cfg))
        slide.read_region((0, 0), slide.dimensions, slide.mpp)
    assert str(folder) in str(err.value)
    return str(err.value)


def test_missing_full_resolution_level(series, tmp_path):
    folder = _broken(series, tmp_path)
    (folder / "level-0.dcm").unlink()
    _fails(folder, tmp_path, "full-resolution level file is missing")


def test_frame_index_past_the_end_of_the_object(series, tmp_path):
    folder = _broken(series, tmp_path)
    ds = dcmread(folder / "level-1.dcm")
    eot = np.frombuffer(ds.ExtendedOffsetTable, "<u8").copy()
    eot[-1] += 10**9
    _rewrite(folder / "level-1.dcm", ExtendedOffsetTable=eot.tobytes())
    _fails(folder, tmp_path, r"frame 8 of its extended frame index lies at bytes .*the end of the object")


def test_truncated_and_corrupt_frames(series, tmp_path):
    folder = _broken(series, tmp_path, "walk")
    data = (folder / "level-1.dcm").read_bytes()
    (folder / "level-1.dcm").write_bytes(data[: len(data) - 5000])  # cut inside the last frame
    _fails(folder, tmp_path, "level-1.dcm: the encapsulated PixelData ends without its delimiter")
    shutil.rmtree(folder)
    folder = _broken(series, tmp_path, "extended")
    lv = DicomSlide(f"{folder}/")._levels[0]
    at, n = int(lv.offsets[0]) - (1 << 40), int(lv.counts[0])  # frame 0 of level 0 (instance 0)
    data = bytearray((folder / "level-0.dcm").read_bytes())
    data[at : at + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    (folder / "level-0.dcm").write_bytes(bytes(data))
    _fails(folder, tmp_path, "tile .* of level 0 failed to decode")


def test_tiff_personality_that_disagrees_with_the_header(series, tmp_path):
    folder = _broken(series, tmp_path, "tiff")
    path = folder / "level-0.dcm"
    data = bytearray(path.read_bytes())
    (ifd_at,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd_at)
    for k in range(n):
        at = ifd_at + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 256:  # ImageWidth
            struct.pack_into("<I", data, at + 8, 2999)
    path.write_bytes(bytes(data))
    _fails(folder, tmp_path, r"TIFF personality disagrees with its DICOM header \(TIFF 2999×2200")
    struct.pack_into("<I", data, ifd_at + 2 + 12 * 1 + 8, 3000)  # ImageWidth right again (entry 1) …
    path.write_bytes(bytes(data))
    DicomSlide(f"{folder}/")
    for k in range(n):
        at = ifd_at + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 324:  # … and TileOffsets[3] into the header
            offsets_at = struct.unpack_from("<I", data, at + 8)[0]
            struct.pack_into("<I", data, offsets_at + 4 * 3, 200)
    path.write_bytes(bytes(data))
    _fails(folder, tmp_path, r"frame 3 of its tiff frame index lies at bytes 200–.*outside the PixelData")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            dict(TransferSyntaxUID=JPEGLSLossless),
            r"transfer syntax JPEG-LS Lossless Image Compression \(1.2.840.10008.1.2.4.80\)",
        ),
        (dict(TransferSyntaxUID=HTJ2K), "transfer syntax High-Throughput JPEG 2000"),
        (dict(TransferSyntaxUID=JPEG_XL), r"transfer syntax JPEG XL \("),
        (dict(DimensionOrganizationType="TILED_SPARSE"), "DimensionOrganizationType TILED_SPARSE is not read"),
    ],
)
def test_unsupported_instances(series, tmp_path, changes, match):
    folder = _broken(series, tmp_path)
    _rewrite(folder / "level-1.dcm", **changes)
    _fails(folder, tmp_path, match)


def test_an_instance_of_another_series_in_the_folder(series, tmp_path):
    folder = _broken(series, tmp_path)
    shutil.copy(series["basic"] / "level-2.dcm", folder / "stray.dcm")
    message = _fails(folder, tmp_path, "instances of 2 series in one folder")
    assert "stray.dcm" in message


def test_an_icc_profile_is_recorded_and_frames_read_as_stored(series, tmp_path):
    folder = _broken(series, tmp_path)
    ds = dcmread(folder / "level-0.dcm")
    ds.OpticalPathSequence[0].ICCProfile = b"\0" * 3144  # the size of sRGB's v2 profile
    ds.save_as(folder / "level-0.dcm", enforce_file_format=True)
    profiled, plain = DicomSlide(f"{folder}/"), DicomSlide(f"{series['extended']}/")
    assert profiled.properties["hipt-ray.icc-profile-bytes"] == "3144"
    assert "hipt-ray.icc-profile-bytes" not in plain.properties
    assert np.array_equal(profiled.read_rgb((0, 0), 0, (600, 600)), plain.read_rgb((0, 0), 0, (600, 600)))


def test_two_series_folders_claiming_one_slide_id(series, tmp_path):
    for site in ("site-a", "site-b"):
        shutil.copytree(series["tiff"], tmp_path / site / "TCGA-XX-0001")
    specs = list_slides(str(tmp_path))
    assert [s.uri for s in specs] == [f"{tmp_path}/site-a/TCGA-XX-0001/", f"{tmp_path}/site-b/TCGA-XX-0001/"]
    assert all("slide id 'TCGA-XX-0001' is shared by 2 files" in s.error for s in specs)


def test_a_bad_series_fails_alone_in_the_tile_stage(series, slide_set, tmp_path):
    from hipt_ray.slides.tiler import tile_slide  # noqa: PLC0415 - as the tile tests use it

    folder = _broken(series, tmp_path)
    (folder / "level-0.dcm").unlink()
    cfg = _cfg(tmp_path)
    ok = tile_slide(SlideRef("small", f"{series['tiff']}/"), cfg, cache=make_cache(cfg), spec_hash="h")
    bad = tile_slide(SlideRef("bad", f"{folder}/"), cfg, cache=make_cache(cfg), spec_hash="h")
    assert ok.slide["status"] == "ok" and ok.regions
    assert bad.slide["status"] == "failed" and "full-resolution level file is missing" in bad.slide["error"]
