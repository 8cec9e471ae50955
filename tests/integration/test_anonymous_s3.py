"""Public buckets read without credentials (storage.anonymous_buckets), against moto's S3 server:
moto serves an unsigned request only for an object whose ACL lets everyone read it, as S3 does,
so a bucket that refuses anonymous reads fails each of its slides alone, with the bucket and the
fix named."""

from __future__ import annotations

import pytest
import s3fs

from hipt_ray import storage

from ..conftest import tile_one


@pytest.fixture()
def buckets(s3fs_client, slide_set, monkeypatch):
    """'open-slides' holds a slide everyone may read; 'closed-slides' the same slide, private."""
    for bucket, acl in (("open-slides", "public-read"), ("closed-slides", "private")):
        if not s3fs_client.exists(bucket):
            s3fs_client.mkdir(bucket)
        s3fs_client.put(str(slide_set["small"]), f"{bucket}/small.tiff", ACL=acl)
    monkeypatch.setenv(storage.ANONYMOUS_ENV, "open-slides,closed-slides")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _tile(uri: str, tmp_path, endpoint: str) -> dict:
    return tile_one(uri, tmp_path, endpoint, "storage.retries=0")


def test_a_public_bucket_is_read_with_unsigned_requests(buckets, s3_endpoint, tmp_path):
    fs, path = storage.filesystem("s3://open-slides/small.tiff", s3_endpoint)
    assert fs.anon and path == "open-slides/small.tiff"
    assert storage.stat("s3://open-slides/small.tiff", s3_endpoint).size > 0
    row = _tile("s3://open-slides/small.tiff", tmp_path, s3_endpoint)
    assert row["status"] == "ok" and row["n_regions"] > 0, row["error"]
    assert not list((tmp_path / "c").glob("*"))  # read by byte range, nothing staged


def test_a_bucket_that_refuses_anonymous_reads_fails_its_slide_with_the_bucket_and_the_fix(
    buckets, s3_endpoint, tmp_path, monkeypatch
):
    uri = "s3://closed-slides/small.tiff"
    with pytest.raises(PermissionError):  # unsigned: the private object is refused
        storage.stat(uri, s3_endpoint)
    row = _tile(uri, tmp_path, s3_endpoint)
    assert row["status"] == "failed" and row["error"].startswith(uri)
    assert "the bucket closed-slides refuses anonymous reads" in row["error"]
    assert "take it out of that list to read it with your AWS credentials" in row["error"]
    assert "storage.anonymous_buckets" in row["error"] and "\n" not in row["error"]
    # the fix works: out of the list, the same object is read with the credentials
    monkeypatch.setenv(storage.ANONYMOUS_ENV, "open-slides")
    assert not storage.filesystem(uri, s3_endpoint)[0].anon
    assert _tile(uri, tmp_path, s3_endpoint)["status"] == "ok"
