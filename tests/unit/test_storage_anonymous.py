"""storage.anonymous_buckets: which buckets are read with unsigned requests, set by the CLI for
its process and the Ray workers it starts (the reads themselves: tests/integration/test_anonymous_s3.py)."""

import pytest

from hipt_ray import storage
from hipt_ray.config import ConfigError, load_config


def test_idc_open_data_is_anonymous_by_default_and_the_setting_replaces_the_list(monkeypatch):
    monkeypatch.setenv(storage.ANONYMOUS_ENV, "x")  # recorded, so the test leaves it as it found it
    monkeypatch.delenv(storage.ANONYMOUS_ENV)
    assert load_config().storage.anonymous_buckets == ["idc-open-data"]
    assert storage.anonymous_buckets() == {"idc-open-data"}
    idc = "s3://idc-open-data/934f6b61-34d4-450a-a9a0-bd085f35fb6c/"
    assert storage.storage_options(idc, "http://127.0.0.1:9") == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "anon": True,
    }
    assert "anon" not in storage.storage_options("s3://my-output/run", "http://127.0.0.1:9")
    assert storage.storage_options("/local/slide.svs") == {}
    storage.set_anonymous_buckets([])  # none: every bucket with credentials
    assert storage.anonymous_buckets() == frozenset() and "anon" not in storage.storage_options(idc)
    storage.set_anonymous_buckets(["open-a", "open-b"])
    assert storage.is_anonymous("s3://open-b/x.svs") and not storage.is_anonymous("s3://idc-open-data/x/")


def test_a_refused_anonymous_read_names_the_bucket_and_the_fix(monkeypatch):
    monkeypatch.setenv(storage.ANONYMOUS_ENV, "open-a")
    denied = PermissionError("Forbidden")
    text = storage.describe_error("s3://open-a/s/x.dcm", denied)
    assert text.startswith("s3://open-a/s/x.dcm: the bucket open-a refuses anonymous reads")
    assert "take it out of that list to read it with your AWS credentials" in text
    assert "check AWS_ACCESS_KEY_ID" in storage.describe_error("s3://mine/x.svs", denied)  # a signed read: as before


@pytest.mark.parametrize("bad", ["s3://idc-open-data", "IDC", "ab", "a_b"])
def test_a_bucket_name_that_is_not_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="is not a bucket name"):
        load_config(overrides=[f"storage.anonymous_buckets=[{bad}]"])


def test_the_cli_sets_the_anonymous_buckets_from_the_config(tmp_path, monkeypatch):
    import hipt_ray.heads.run as heads_run
    from hipt_ray.cli import main

    seen = {}

    def stage(cfg, run_name=None):
        seen["buckets"] = storage.anonymous_buckets()
        raise KeyboardInterrupt  # stop here: the setting is what this test is about

    monkeypatch.setattr(heads_run, "train_head", stage)
    monkeypatch.setenv(storage.ANONYMOUS_ENV, "")  # restored after the test (main sets it)
    args = ["train-head", "--out", str(tmp_path), "--labels", "l.csv", "storage.anonymous_buckets=[pub-a,pub-b]"]
    assert main(args) == 130
    assert seen["buckets"] == {"pub-a", "pub-b"}
