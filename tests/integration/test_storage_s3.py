"""The staging cache and slide listing against a real S3 API (moto's server on 127.0.0.1)."""

import os
import time

import pytest

from hipt_ray.slides.manifest import list_slides
from hipt_ray.storage import StagingCache, StorageError, stat


def test_cache_stages_atomically_and_refetches_changed_objects(s3fs_client, tmp_path):
    s3fs_client.mkdir("cache-bkt")
    s3fs_client.pipe("cache-bkt/a.svs", b"A" * 1000)
    cache = StagingCache(str(tmp_path), max_bytes=2500)
    path, info = cache.fetch("s3://cache-bkt/a.svs")
    assert open(path, "rb").read() == b"A" * 1000 and info.size == 1000 and info.version
    again, _ = cache.fetch("s3://cache-bkt/a.svs")
    assert again == path  # a hit, no second copy
    s3fs_client.pipe("cache-bkt/a.svs", b"B" * 1000)  # same size, new ETag
    changed, info2 = cache.fetch("s3://cache-bkt/a.svs")
    assert changed != path and open(changed, "rb").read() == b"B" * 1000 and info2.version != info.version
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_cache_evicts_least_recently_used(s3fs_client, tmp_path):
    s3fs_client.mkdir("lru-bkt")
    for name in "abc":
        s3fs_client.pipe(f"lru-bkt/{name}.svs", name.encode() * 1000)
    cache = StagingCache(str(tmp_path), max_bytes=2500)
    pa_, _ = cache.fetch("s3://lru-bkt/a.svs")
    time.sleep(0.02)
    pb, _ = cache.fetch("s3://lru-bkt/b.svs")
    time.sleep(0.02)
    cache.fetch("s3://lru-bkt/a.svs")  # a is now more recent than b
    time.sleep(0.02)
    pc, _ = cache.fetch("s3://lru-bkt/c.svs")
    assert os.path.exists(pa_) and os.path.exists(pc) and not os.path.exists(pb)
    assert sum(os.path.getsize(tmp_path / p) for p in os.listdir(tmp_path)) <= 2500


def test_object_larger_than_cache_is_a_clear_error(s3fs_client, tmp_path):
    s3fs_client.mkdir("big-bkt")
    s3fs_client.pipe("big-bkt/big.svs", b"x" * 5000)
    with pytest.raises(StorageError, match="raise storage.cache_max_bytes"):
        StagingCache(str(tmp_path), max_bytes=1000).fetch("s3://big-bkt/big.svs")


def test_list_s3_prefix_and_missing_objects(s3fs_client):
    s3fs_client.mkdir("list-bkt")
    for key in ("p/one.svs", "p/two.tiff", "p/readme.txt", "q/three.svs"):
        s3fs_client.pipe(f"list-bkt/{key}", b"x")
    specs = list_slides("s3://list-bkt/p/")
    assert [(s.slide_id, s.uri) for s in specs] == [
        ("one", "s3://list-bkt/p/one.svs"),
        ("two", "s3://list-bkt/p/two.tiff"),
    ]
    with pytest.raises(FileNotFoundError):
        stat("s3://list-bkt/p/missing.svs")


def test_checkpoint_export_and_load_through_s3(s3fs_client):
    import torch

    from hipt_ray.models import CheckpointError, create_model, export_checkpoint, load_checkpoint, model_id

    s3fs_client.mkdir("ckpt-bkt")
    src = create_model("vit4k_tiny")
    export_checkpoint(src, "s3://ckpt-bkt/run1/vit4k.pth")
    dst = load_checkpoint(create_model("vit4k_tiny"), "s3://ckpt-bkt/run1/vit4k.pth")
    assert model_id(dst) == model_id(src)
    x = torch.randn(1, 48, 6, 6)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    with pytest.raises(CheckpointError, match="checkpoint not found: s3://ckpt-bkt/run1/missing.pth"):
        load_checkpoint(create_model("vit4k_tiny"), "s3://ckpt-bkt/run1/missing.pth")


def test_a_missing_output_bucket_is_a_usage_error_and_is_not_created(s3fs_client, slide_set, tmp_path, capsys):
    from hipt_ray.cli import main

    from ..conftest import copy_slides

    src = copy_slides(slide_set, ["small"], tmp_path / "slides")
    code = main(["tile", "--slides", str(src), "--out", "s3://nobucket-typo/out", f"storage.cache_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "s3://nobucket-typo" in err and "does not exist" in err and err.count("\n") == 0
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists("nobucket-typo")


def test_output_store_errors_are_one_line_with_the_cause_and_the_fix(s3_auth_endpoint, slide_set, tmp_path, capsys):
    from hipt_ray.cli import main
    from hipt_ray.storage import OutputStoreError
    from hipt_ray.store import SLIDES, Store

    from ..conftest import copy_slides, free_port

    src = copy_slides(slide_set, ["small"], tmp_path / "slides")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for endpoint, cause in (
        (s3_auth_endpoint, "access denied (Forbidden); check AWS_ACCESS_KEY_ID"),
        (dead, f"cannot reach the object store at {dead}; check AWS_ENDPOINT_URL"),
    ):
        code = main(
            [
                "tile",
                "--slides",
                str(src),
                "--out",
                "s3://locked/out",
                f"storage.s3_endpoint_url={endpoint}",
                f"storage.cache_dir={tmp_path}",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "output s3://locked/out: " + cause in err, err
    # Lance's own errors (raw XML from the server) become the same one line, as a setting to fix.
    with pytest.raises(OutputStoreError) as exc:
        Store("s3://locked/out", endpoint_url=s3_auth_endpoint).read(SLIDES)
    text = str(exc.value)
    assert exc.value.config and "\n" not in text and "<?xml" not in text
    assert text.startswith("output s3://locked/out/slides.lance: access denied (InvalidAccessKeyId: ")


def test_transient_errors_are_retried_with_backoff(monkeypatch):
    from hipt_ray import storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("LanceError(IO): Generic S3 error: connection reset by peer")
        return "ok"

    assert storage.with_retries(flaky, what="x") == "ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        storage.with_retries(denied, what="x")
    assert len(calls) == 1  # a refused credential is never retried


def test_a_crafted_checkpoint_in_s3_is_refused_before_its_code_runs(s3fs_client, tmp_path):
    import io

    import torch

    from hipt_ray.models import CheckpointError, create_model, load_checkpoint

    from ..unit.models.test_models import RunsCode

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"teacher": {"x": RunsCode(str(marker))}}, buf)
    s3fs_client.mkdir("pickle-bkt")
    s3fs_client.pipe_file("pickle-bkt/evil.pth", buf.getvalue())
    with pytest.raises(
        CheckpointError,
        match=r"^s3://pickle-bkt/evil.pth: refused to unpickle it.*"
        r"model\.allow_unsafe_pickle=true$",
    ):
        load_checkpoint(create_model("vit4k_tiny"), "s3://pickle-bkt/evil.pth")
    assert not marker.exists()


def test_tile_backend_reads_only_the_needed_tiles_from_s3_and_stages_nothing(s3fs_client, slide_set, tmp_path):
    import numpy as np
    import tifffile

    from hipt_ray.config import load_config
    from hipt_ray.slides.manifest import SlideSpec
    from hipt_ray.slides.reader import Slide
    from hipt_ray.slides.tiler import make_cache, tile_slide
    from hipt_ray.slides.tiles import TiledTiff

    s3fs_client.mkdir("range-bkt")
    s3fs_client.put(str(slide_set["good"]), "range-bkt/good.tiff")
    remote = TiledTiff("s3://range-bkt/good.tiff", range_gap=0)
    header, header_requests = remote.bytes_read, remote.requests
    assert header < slide_set["good"].stat().st_size / 10  # the structure, not the slide
    with Slide("s3://range-bkt/good.tiff", source=remote) as ours, Slide(str(slide_set["good"])) as ref:
        before = remote.bytes_read
        region, level = ours.read_region((1024, 2048), (2048, 1024), 0.5)
        assert np.array_equal(region, ref.read_region((1024, 2048), (2048, 1024), 0.5)[0])
    with tifffile.TiffFile(slide_set["good"]) as tif:
        page = tif.pages[0]
        cols = -(-page.imagewidth // 256)
        needed = [r * cols + c for r in range(8, 12) for c in range(4, 12)]
        compressed = sum(int(page.databytecounts[i]) for i in needed)
    assert remote.bytes_read - before == compressed  # exactly the 32 tiles' bytes (no gap allowed)
    assert remote.requests - header_requests <= 4  # one coalesced range per tile row here
    cfg = load_config(
        "tile",
        values={"slides": "x", "out": str(tmp_path / "out")},
        overrides=[f"storage.cache_dir={tmp_path / 'cache'}"],
    )
    result = tile_slide(SlideSpec("good", "s3://range-bkt/good.tiff"), cfg, cache=make_cache(cfg), spec_hash="h")
    assert result.slide["status"] == "ok" and result.slide["backend"] == "tiles"
    assert not any((tmp_path / "cache").iterdir())  # nothing staged


def test_an_object_replaced_while_open_fails_its_reads(s3fs_client, slide_set):
    from hipt_ray.slides.reader import Slide, SlideError
    from hipt_ray.slides.tiles import TiledTiff

    s3fs_client.mkdir("swap-bkt")
    s3fs_client.put(str(slide_set["good"]), "swap-bkt/s.tiff")
    with Slide("s3://swap-bkt/s.tiff", source=TiledTiff("s3://swap-bkt/s.tiff")) as slide:
        slide.read_region((0, 0), (512, 512), 0.5)
        s3fs_client.put(str(slide_set["small"]), "swap-bkt/s.tiff")  # same name, other content
        with pytest.raises(SlideError, match="the object changed while it was being read"):
            slide.read_region((0, 0), (512, 512), 0.5)
