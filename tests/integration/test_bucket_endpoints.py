"""storage.bucket_endpoints: a bucket served by another endpoint than the output's (IDC's public
bucket on AWS while the output is on MinIO) is read there. Two moto servers stand in for the two
stores: the output's (the session's, at storage.s3_endpoint_url) and another holding the slides."""

from __future__ import annotations

import json

import pytest
import s3fs

from hipt_ray import storage

from ..conftest import _start_moto, free_port, tile_one

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def other_store(slide_set):
    """A second S3 server holding 'far-slides/small.tiff'."""
    port = free_port()
    proc = _start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("far-slides")
    fs.put(str(slide_set["small"]), "far-slides/small.tiff")
    try:
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def _tile(tmp_path, s3_endpoint: str, endpoints: dict[str, str]) -> dict:
    storage.set_bucket_endpoints(endpoints)  # what the CLI does before Ray starts
    s3fs.S3FileSystem.clear_instance_cache()
    setting = f"storage.bucket_endpoints={json.dumps(endpoints)}"  # checked by the config as the CLI's is
    return tile_one("s3://far-slides/small.tiff", tmp_path, s3_endpoint, setting, "storage.retries=0")


def test_a_bucket_is_read_at_its_own_endpoint_and_without_one_the_error_names_the_setting(
    other_store, s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.delenv(storage.BUCKET_ENDPOINTS_ENV, raising=False)
    row = _tile(tmp_path, s3_endpoint, {"far-slides": other_store})
    assert row["status"] == "ok" and row["n_regions"] > 0, row["error"]
    assert not list((tmp_path / "c").glob("*"))  # read by byte range there, nothing staged
    # the output's endpoint does not hold the bucket: one reason, naming the endpoint and the fix
    row = _tile(tmp_path, s3_endpoint, {})
    assert row["status"] == "failed"
    assert f"the bucket does not exist at the endpoint {s3_endpoint}" in row["error"], row["error"]
    assert "storage.bucket_endpoints={far-slides: aws}" in row["error"], row["error"]
