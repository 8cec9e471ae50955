"""S3 errors on the wire (a fault-injecting proxy in front of moto, tests/faults.py): throttled
tile reads are retried, then fail their slide alone with a reason; a fragment write refused
half-way through `embed` fails that slide alone, and a rerun completes it with one row per
region."""

from __future__ import annotations

import time

import pytest
import s3fs

from hipt_ray.cli import main
from hipt_ray.store import REGIONS, Store

from ..conftest import TINY, tile_one
from ..faults import FaultProxy, Rule


@pytest.fixture()
def proxy(s3_endpoint):
    p = FaultProxy(s3_endpoint.split("://", 1)[1])
    endpoint = p.start()
    yield p, endpoint
    p.stop()


def test_throttled_tile_reads_are_retried_then_fail_the_slide_alone(
    proxy, s3fs_client, slide_set, tmp_path, monkeypatch
):
    p, endpoint = proxy
    s3fs_client.mkdir("throttle-bkt")
    s3fs_client.put(str(slide_set["small"]), "throttle-bkt/small.tiff")
    uri = "s3://throttle-bkt/small.tiff"

    def tile(*overrides: str):
        return tile_one(uri, tmp_path, endpoint, *overrides)

    clean = tile()
    # tile fetches (ranged GETs conditional on the ETag) answered 503 SlowDown twice
    p.rules[:] = [rule := Rule("GET", r"/throttle-bkt/small\.tiff", 503, times=2, header="If-Match")]
    row = tile()
    assert rule.failed == 2 and row["status"] == "ok" and row["n_regions"] == clean["n_regions"] > 0
    # throttled for good: the slide fails with a reason, after the retries (the S3 client's two
    # attempts and none of ours here: a test needs no minute of backoff)
    p.rules[:] = [rule := Rule("GET", r"/throttle-bkt/small\.tiff", 503, header="If-Match")]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # read by each new botocore client
    s3fs.S3FileSystem.clear_instance_cache()
    t0 = time.perf_counter()
    row = tile("storage.retries=0")
    assert row["status"] == "failed" and rule.failed > 1  # the S3 client's own retries
    assert row["error"].startswith(uri) and "still failing after retries" in row["error"]
    assert "rerun later" in row["error"] and time.perf_counter() - t0 < 30
    assert not list((tmp_path / "c").glob("*.tiff"))  # nothing staged: a throttled read never fell back


@pytest.mark.ray
def test_a_fragment_write_refused_half_way_fails_its_slide_and_a_rerun_completes_it(
    ray_local, proxy, s3fs_client, slide_set, tmp_path, capsys
):
    p, endpoint = proxy
    bucket = "fragfault-bkt"
    s3fs_client.mkdir(bucket)
    for name in ("good", "small", "objective"):
        s3fs_client.put(str(slide_set[name]), f"{bucket}/slides/{slide_set[name].name}")
    out = f"s3://{bucket}/out"
    args = [
        "--slides",
        f"s3://{bucket}/slides/",
        "--out",
        out,
        "--config",
        TINY,
        f"storage.cache_dir={tmp_path / 'cache'}",
        f"storage.s3_endpoint_url={endpoint}",
    ]
    assert main(["tile", *args]) == 0
    p.seen.clear()
    # region data files: two 503s (S3 throttling: Lance's client retries them), then one PUT
    # refused for good (403) after the first went through
    p.rules[:] = [
        slow := Rule("PUT", rf"/{bucket}/out/regions\.lance/data/", 503, times=2),
        denied := Rule("PUT", rf"/{bucket}/out/regions\.lance/data/", 403, times=1, skip=1),
    ]
    capsys.readouterr()
    code = main(["embed", *args])
    text = capsys.readouterr().out
    assert slow.failed == 2 and denied.failed == 1
    assert code == 3 and "slides: 3 (2 embedded, 1 failed" in text, text
    failed = [r for r in Store(out).latest_slides().to_pylist() if r["status"] == "failed"]
    assert len(failed) == 1 and "writing region rows to s3://fragfault-bkt/out/regions.lance" in failed[0]["error"]
    assert "access denied" in failed[0]["error"]
    p.rules.clear()
    assert main(["embed", *args]) == 0
    assert "slides: 3 (1 embedded, 0 failed, 0 no tissue, 2 already done)" in capsys.readouterr().out
    rows = Store(out).read(REGIONS, columns=["slide_id", "region_index", "model_id"])
    keys = [(r["slide_id"], r["region_index"]) for r in rows.to_pylist() if r["model_id"]]
    assert len(keys) == len(set(keys)) > 0
