"""DICOM series served from a real S3 API (moto's server on 127.0.0.1): listed as one slide per
series folder, read by byte range with the same pixels as from disk, the TIFF personality found
in a few small reads, a replaced instance refused mid-read, and the embed job giving a series the
embeddings of the TIFF it was made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hipt_ray.cli import main
from hipt_ray.slides import synthetic_dicom
from hipt_ray.slides.dicom import DicomSlide
from hipt_ray.slides.manifest import list_slides
from hipt_ray.slides.tiles import TileError
from hipt_ray.store import read_embeddings

from ..conftest import TINY

BUCKET = "dcm-bkt"


@pytest.fixture(scope="module")
def served(slide_set, s3fs_client, tmp_path_factory) -> dict[str, Path]:
    """The 'small' slide as an IDC-like JPEG series (TIFF personality), with an Extended Offset
    Table, and as lossless JPEG 2000, on disk and under s3://dcm-bkt/series/<name>/."""
    root = tmp_path_factory.mktemp("dicom-s3")
    s3fs_client.mkdir(BUCKET)
    local = {}
    for name, kw in {
        "tiff": dict(tiff=True),
        "extended": dict(offset_table="extended"),
        "jpeg2k": dict(codec="jpeg2k"),
    }.items():
        for path in synthetic_dicom.write_dicom_twin(slide_set["small"], root / name, mpp=0.5, **kw):
            s3fs_client.put(str(path), f"{BUCKET}/series/{name}/{path.name}")
        local[name] = root / name
    s3fs_client.put(str(slide_set["small"]), f"{BUCKET}/series/small.tiff")
    return local


def test_series_folders_list_as_slides_and_read_as_from_disk(served, s3_endpoint):
    specs = list_slides(f"s3://{BUCKET}/series/")
    assert [(s.slide_id, s.uri) for s in specs] == [
        ("extended", f"s3://{BUCKET}/series/extended/"),
        ("jpeg2k", f"s3://{BUCKET}/series/jpeg2k/"),
        ("small", f"s3://{BUCKET}/series/small.tiff"),
        ("tiff", f"s3://{BUCKET}/series/tiff/"),
    ]
    for name, folder in served.items():
        remote, disk = DicomSlide(f"s3://{BUCKET}/series/{name}/"), DicomSlide(f"{folder}/")
        assert remote.level_dimensions == disk.level_dimensions and remote.properties == disk.properties
        for level, (lw, lh) in enumerate(disk.level_dimensions):
            box = ((0, 0), level, (min(lw, 1500), min(lh, 1200)))
            assert np.array_equal(remote.read_rgb(*box), disk.read_rgb(*box)), (name, level)
        assert remote.info.size == disk.info.size and remote.info.version.startswith("series-")


def test_tiff_personality_opens_in_a_few_requests_and_reads_only_the_frames(served, s3_endpoint):
    slide = DicomSlide(f"s3://{BUCKET}/series/tiff/")
    n_instances, n_levels = len(slide.instances), len(slide.level_dimensions)
    # per instance one header read (64 KiB covers it), per level one read of the IFD at the end
    assert slide.requests == n_instances + n_levels, slide.requests
    assert slide.bytes_read <= n_instances * 64 * 1024 + 16 * 1024
    lv = slide._levels[0]
    before = slide.requests, slide.bytes_read
    slide.read_rgb((0, 0), 0, (lv.width, 2048))  # 8 whole rows of frames: contiguous in the file
    needed = int(lv.counts[: 8 * lv.cols].sum())
    assert slide.requests - before[0] == 1
    assert needed <= slide.bytes_read - before[1] <= 1.15 * needed


def test_an_instance_replaced_while_open_is_refused(served, s3fs_client, s3_endpoint, tmp_path):
    for path in served["extended"].iterdir():
        s3fs_client.put(str(path), f"{BUCKET}/changing/{path.name}")
    slide = DicomSlide(f"s3://{BUCKET}/changing/")
    s3fs_client.pipe(f"{BUCKET}/changing/level-0.dcm", (served["extended"] / "level-0.dcm").read_bytes() + b"\0\0")
    with pytest.raises(TileError, match="the object changed while it was being read"):
        slide.read_rgb((0, 0), 0, (512, 512))


@pytest.mark.ray
def test_embeddings_of_a_series_equal_those_of_its_tiff_twin(ray_local, served, tmp_path, capsys):
    """The issue's "done when": JPEG and lossless JPEG 2000 series embed from S3, nothing
    staged, with the TIFF twin's embeddings (the same pixels)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "slide_id,uri\n"
        f"twin,s3://{BUCKET}/series/small.tiff\n"
        f"dcm-jpeg,s3://{BUCKET}/series/tiff/\n"
        f"dcm-j2k,s3://{BUCKET}/series/jpeg2k/\n"
    )
    cache = tmp_path / "cache"
    out = f"s3://{BUCKET}/out"
    args = ["--slides", str(manifest), "--out", out, "--config", TINY, f"storage.cache_dir={cache}"]
    assert main(["embed", *args]) == 0, capsys.readouterr().out
    assert not cache.exists() or not any(cache.iterdir())  # nothing staged
    emb = read_embeddings(out)
    twin = emb["twin"]
    for sid in ("dcm-jpeg", "dcm-j2k"):
        got = emb[sid]
        assert len(got["emb4k"]) == len(twin["emb4k"]) > 0
        order = np.lexsort((np.asarray(got["y"]), np.asarray(got["x"])))
        ref_order = np.lexsort((np.asarray(twin["y"]), np.asarray(twin["x"])))
        assert np.array_equal(np.asarray(got["x"])[order], np.asarray(twin["x"])[ref_order])
        assert np.allclose(np.asarray(got["emb4k"])[order], np.asarray(twin["emb4k"])[ref_order], atol=1e-6), sid
