"""Regions decoded next to the model: the CPU route gives the read path's pixels exactly; the
GPU route (torchvision's batched decoder, run here on its CPU twin) gives pixels within a level
or two and embeddings with cosine ≥ 0.9999; a level whose GPU colours differ and a GPU decode
that raises fall back to the CPU, counted; a corrupt tile fails with the read path's reason."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile
import torch

from hipt_ray.config import load_config
from hipt_ray.data.regions import RegionReader
from hipt_ray.embed.decode import RegionDecoder
from hipt_ray.models import create_model
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides import synthetic, synthetic_dicom
from hipt_ray.slides.dicom import DicomSlide
from hipt_ray.slides.packed import COLUMNS, PackedRegion
from hipt_ray.slides.reader import Slide
from hipt_ray.slides.tiles import TiledTiff

CPU = torch.device("cpu")
# torchvision's CPU decoder is libjpeg-turbo, as imagecodecs' is: identical pixels; nvJPEG rounds
# its IDCT and chroma upsampling differently (a level or two), which the cosine bound covers
MAX_DIFF = 2


def _reader(tmp_path, decode: str = "auto") -> RegionReader:
    cfg = load_config(
        "embed",
        values={"slides": "x", "out": str(tmp_path / "o")},
        overrides=[f"storage.cache_dir={tmp_path / 'cache'}", f"embed.decode={decode}"],
    )
    return RegionReader(cfg_dict=cfg.to_dict())


def _row(path, xy, size, mpp, **kw) -> dict:
    ref = SlideRef(path.stem, str(path), **kw)
    return dict(
        slide_id=ref.slide_id, uri=ref.uri, mpp_override=ref.mpp_override, slide_version=None,
        region_index=0, x=xy[0], y=xy[1], read_w=size[0], read_h=size[1], mpp=mpp,
    )  # fmt: skip


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as Ray Data's numpy batch format gives them to the model actor."""
    batch = {k: np.empty(len(rows), object) for k in rows[0]}
    for i, r in enumerate(rows):
        for k, v in r.items():
            batch[k][i] = v
    return batch


REGIONS = [  # (slide, corner, size, mpp): as stored, an edge, 40× reduced, Lanczos
    ("good", (0, 0), (1024, 1024), 0.5),
    ("good", (1500, 1000), (1024, 1024), 0.5),
    ("forty", (0, 0), (1024, 1024), 0.5),
    ("good", (0, 0), (768, 512), 0.7),
]


def test_cpu_decode_is_the_read_path_and_moves_about_the_tile_bytes(slide_set, tmp_path):
    reader = _reader(tmp_path)
    rows = [reader(_row(slide_set[n], xy, size, mpp)) for n, xy, size, mpp in REGIONS]
    decoded = RegionDecoder(device=CPU, gpu=False, threads=2)(_batch(rows))
    for i, (n, xy, size, mpp) in enumerate(REGIONS):
        with Slide(str(slide_set[n])) as ref:  # OpenSlide's pixels (Lanczos: the tile backend's)
            want = ref.read_region(xy, size, mpp)[0] if mpp == 0.5 else None
        with Slide(str(slide_set[n]), source=TiledTiff(str(slide_set[n]))) as ours:
            want = ours.read_region(xy, size, mpp)[0] if want is None else want
        assert np.array_equal(decoded.pixels(i).numpy(), want), i
    assert decoded.where == ["cpu"] * 4 and all(s > 0 for s in decoded.seconds)
    ratio = np.array(decoded.transfer_bytes) / np.array(decoded.tile_bytes)
    assert (ratio < 1.2).all(), ratio
    as_pixels = _reader(tmp_path, "reader")  # today's route moves the pixels: ≈ 16× more
    pixels = RegionDecoder(device=CPU, gpu=False, threads=1)(
        _batch([as_pixels(_row(slide_set["good"], *REGIONS[0][1:]))])
    )
    assert pixels.where == ["reader"] and pixels.tile_bytes == [0]
    assert pixels.transfer_bytes[0] > 1024 * 1024 * 3 > 5 * decoded.transfer_bytes[0]


def test_gpu_route_on_torchvisions_cpu_decoder_matches_the_cpu_decode(slide_set, tmp_path):
    reader = _reader(tmp_path)
    regions = [*REGIONS, ("forty", (0, 0), (1024, 1024), 0.5)]
    rows = [reader(_row(slide_set[n], xy, size, mpp)) for n, xy, size, mpp in REGIONS]
    scaled = load_config(
        "embed", values={"slides": "x", "out": str(tmp_path / "o")}, overrides=["reader.scaled_decode=true"]
    )
    rows.append(RegionReader(cfg_dict=scaled.to_dict())(_row(slide_set["forty"], (0, 0), (1024, 1024), 0.5)))
    gpu = RegionDecoder(device=CPU, gpu=True, threads=1, jpeg_device="cpu")(_batch(rows))
    cpu = RegionDecoder(device=CPU, gpu=False, threads=1)(_batch(rows))
    assert gpu.where == ["gpu"] * 4 + ["cpu"]  # DCT-scaled regions decode on the CPU (nvJPEG cannot scale)
    model = create_model("hipt4k_tiny").eval()
    for i in range(len(regions)):
        a, b = gpu.pixels(i), cpu.pixels(i)
        diff = int((a.int() - b.int()).abs().max())
        with torch.no_grad():
            ea, eb = (model.forward_uint8(x[None])["emb4k"][0] for x in (a, b))
        cos = float(torch.nn.functional.cosine_similarity(ea, eb, dim=0))
        print(f"region {regions[i]}: max |Δ| {diff}, embedding cosine {cos:.6f}")
        assert a.shape == b.shape and diff <= MAX_DIFF and cos >= 0.9999, (i, diff, cos)


def _aperio_rgb_jpeg(path, rgb: np.ndarray) -> None:
    """A tiled TIFF whose JPEG tiles hold RGB components with no marker saying so (no Adobe
    segment, component ids 1, 2, 3), as Aperio writes them: only a decoder told by the TIFF
    tags (photometric RGB) reads the colours right."""
    tifffile.imwrite(
        path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb", compressionargs={"outcolorspace": "RGB"},
        resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
    )  # fmt: skip
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        spans = [(int(o), int(n)) for o, n in zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts)]
    for off, n in spans:
        i = off + 2
        while i < off + n:
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
            if marker == 0xEE:  # APP14 Adobe → a comment of the same length
                data[i + 1] = 0xFE
            elif marker == 0xC0:  # frame: component ids R, G, B → 1, 2, 3
                for c in range(3):
                    data[i + 10 + 3 * c] = c + 1
            elif marker == 0xDA:  # scan: the same ids, then the entropy-coded data
                for c in range(3):
                    data[i + 5 + 2 * c] = c + 1
                break
            i += 2 + length
    path.write_bytes(bytes(data))


def test_gpu_colours_that_differ_and_gpu_failures_fall_back_to_the_cpu(tmp_path, monkeypatch):
    rgb, _ = synthetic.render(1024, 1024, mpp=0.5, seed=3)
    path = tmp_path / "aperio_rgb.tiff"
    _aperio_rgb_jpeg(path, rgb)
    reader = _reader(tmp_path)
    rows = [reader(_row(path, (0, 0), (512, 512), 0.5)), reader(_row(path, (512, 0), (512, 512), 0.5))]
    assert not rows[0]["error"] and rows[0]["packing"]
    with Slide(str(path)) as ref:  # OpenSlide reads the tags too
        want = [ref.read_region((x, 0), (512, 512), 0.5)[0] for x in (0, 512)]
    assert np.abs(want[0].astype(int) - rgb[:512, :512]).mean() < 3  # the file's colours are right
    decoder = RegionDecoder(device=CPU, gpu=True, threads=1, jpeg_device="cpu")
    got = decoder(_batch(rows))
    assert got.where == ["gpu→cpu", "gpu→cpu"] and decoder.same_colours == {(str(path), 0): False}
    assert all(np.array_equal(got.pixels(i).numpy(), want[i]) for i in range(2))

    import torchvision.io

    synthetic.make_slide(tmp_path / "ycbcr.tiff", width_um=600, height_um=600, seed=5)
    rows = [reader(_row(tmp_path / "ycbcr.tiff", (0, 0), (512, 512), 0.5))]

    def broken(*args, **kwargs):  # what an nvJPEG failure looks like to the caller
        raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    got = decoder(_batch(rows))
    assert got.where == ["gpu→cpu"]
    with Slide(str(tmp_path / "ycbcr.tiff")) as ref:
        assert np.array_equal(got.pixels(0).numpy(), ref.read_region((0, 0), (512, 512), 0.5)[0])


def _strict_decode_jpeg(monkeypatch) -> list[bytes]:
    """torchvision's decoder made to reject a stream with bytes after its EOI (as nvJPEG may; the
    CPU twin ignores them); returns the list of streams it was given."""
    import torchvision.io

    real, seen = torchvision.io.decode_jpeg, []

    def strict(streams, *args, **kwargs):
        for s in streams:
            seen.append(bytes(s.numpy()))
            if not seen[-1].endswith(b"\xff\xd9"):
                raise RuntimeError("nvjpegJpegStreamParse failed: NVJPEG_STATUS_BAD_JPEG")
        return real(streams, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", strict)
    return seen


DICOM_REGIONS = [((0, 0), (1024, 1024), 0.5), ((700, 300), (1024, 1024), 0.5), ((0, 0), (768, 512), 0.7)]


def test_dicom_jpeg_frames_reach_the_gpu_decoder_without_their_pad_byte(slide_set, tmp_path, monkeypatch):
    folder = tmp_path / "series"
    synthetic_dicom.write_dicom_twin(slide_set["small"], folder, mpp=0.5, offset_table="basic")
    padded = (folder / "level-0.dcm").read_bytes().count(b"\xff\xd9\x00\xfe\xff\x00\xe0")  # EOI, pad, next item
    assert padded > 0  # the Basic Offset Table's frame lengths include the pad byte
    reader = _reader(tmp_path)
    rows = [reader(_row(folder, xy, size, mpp)) for xy, size, mpp in DICOM_REGIONS]
    assert all(r["packing"] and not r["error"] for r in rows)
    for row in rows:  # what travels: the frames alone, their lengths in the layout
        packed = PackedRegion.from_columns(*(row[c] for c in COLUMNS)).tiles
        assert all(packed.tile_bytes(k).endswith(b"\xff\xd9") for k in range(len(packed)))
        assert int(packed.layout[:, 1].sum()) == len(packed.data)
    seen = _strict_decode_jpeg(monkeypatch)
    gpu = RegionDecoder(device=CPU, gpu=True, threads=1, jpeg_device="cpu")(_batch(rows))
    cpu = RegionDecoder(device=CPU, gpu=False, threads=1)(_batch(rows))
    assert gpu.where == ["gpu"] * 3 and len(seen) > 3  # no fallback: every frame a clean JPEG stream
    assert sum(gpu.tile_bytes) == sum(len(t) for t in _batch(rows)["tiles"])
    for i, (xy, size, mpp) in enumerate(DICOM_REGIONS):
        a, b = gpu.pixels(i).numpy(), cpu.pixels(i).numpy()
        assert a.shape == b.shape and int(np.abs(a.astype(int) - b).max()) <= MAX_DIFF, i
        with Slide(f"{folder}/", source=DicomSlide(f"{folder}/")) as ref:  # the read path's pixels
            assert np.array_equal(b, ref.read_region(xy, size, mpp)[0]), i


@pytest.mark.parametrize("marked", [True, False])
def test_dicom_rgb_frames_decode_on_the_gpu_only_when_it_reads_their_colours(tmp_path, monkeypatch, marked):
    """PhotometricInterpretation RGB: JPEG frames of RGB components without the YCbCr transform.
    torchvision cannot be told the header's colour space: a frame that says so itself (an Adobe
    segment, as libjpeg writes it) decodes on the GPU; one that does not (as Aperio's tiles, copied
    into DICOM) is caught by the first tile's colour check and decoded on the CPU, as declared."""
    rgb, _ = synthetic.render(1024, 1024, mpp=0.5, seed=3)
    tiff = tmp_path / "rgb.tiff"
    if marked:
        tifffile.imwrite(
            tiff, rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
            compressionargs={"outcolorspace": "RGB"}, resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
        )  # fmt: skip
    else:
        _aperio_rgb_jpeg(tiff, rgb)
    folder = tmp_path / "series"
    synthetic_dicom.write_dicom_twin(tiff, folder, mpp=0.5)
    assert dcmread_photometric(folder / "level-0.dcm") == "RGB"
    reader = _reader(tmp_path)
    rows = [reader(_row(folder, (x, 0), (512, 512), 0.5)) for x in (0, 512)]
    _strict_decode_jpeg(monkeypatch)
    decoder = RegionDecoder(device=CPU, gpu=True, threads=1, jpeg_device="cpu")
    got = decoder(_batch(rows))
    assert got.where == (["gpu"] * 2 if marked else ["gpu→cpu"] * 2)
    assert list(decoder.same_colours.values()) == [marked]  # one check for the level
    for i, x in enumerate((0, 512)):
        pixels = got.pixels(i).numpy()
        assert np.abs(pixels.astype(int) - rgb[:512, x : x + 512]).mean() < 3, i  # the colours are right
        with Slide(f"{folder}/", source=DicomSlide(f"{folder}/")) as ref:
            want = ref.read_region((x, 0), (512, 512), 0.5)[0]
        assert int(np.abs(pixels.astype(int) - want).max()) <= (MAX_DIFF if marked else 0), i


def dcmread_photometric(path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).PhotometricInterpretation)


def test_a_corrupt_tile_fails_with_the_read_paths_reason(tmp_path):
    path = tmp_path / "breaks.tiff"
    synthetic.make_slide(path, width_um=1500, height_um=1100, seed=3, n_blobs=1)
    synthetic.corrupt_tiles(path)
    rows = [_reader(tmp_path)(_row(path, (0, 0), (512, 512), 0.5))]
    today = _reader(tmp_path, "reader")(_row(path, (0, 0), (512, 512), 0.5))
    assert rows[0]["error"] == "" and "failed to decode" in today["error"]  # packing does not decode
    for gpu in (False, True):
        got = RegionDecoder(device=CPU, gpu=gpu, threads=1, jpeg_device="cpu")(_batch(rows))
        assert got.pixels(0) == today["error"], gpu


@pytest.mark.parametrize("route, where", [("auto", "cpu"), ("cpu", "cpu"), ("gpu", "gpu")])
def test_the_route_setting(slide_set, tmp_path, route, where):
    from hipt_ray.embed.decode import decoder_for

    decoder = decoder_for(route, CPU, 1)
    decoder.jpeg_device = CPU
    row = _reader(tmp_path)(_row(slide_set["small"], (0, 0), (256, 256), 0.5))
    assert decoder(_batch([row])).where == [where]


def test_the_summary_line_counts_bytes_and_where_regions_were_decoded():
    from hipt_ray.embed.job import EmbedSummary

    tiles = 8 * 3_100_000  # 8 packed regions of 3.1 MB of tiles, 1 region of pixels
    moved = dict(transfer_bytes=tiles * 1.04 + 50_331_648, packed_bytes=tiles * 1.04, tile_bytes=tiles)
    line = EmbedSummary(
        decoded={"gpu": 6, "gpu→cpu": 2, "reader": 1}, moved={**moved, "decode_seconds": 0.16}
    ).transfer_line()
    assert line == (
        "transfer: 8.46 MB a region through the object store, 1.04× its compressed tiles; 1 of 9 regions moved "
        "as pixels; decoded: gpu 6, gpu→cpu 2, reader 1, 20 ms a packed region"
    )
