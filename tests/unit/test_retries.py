"""Object-store retries: one clear warning line each, within a documented budget
(storage.retries, storage.retry_seconds) that Lance's own client retries share."""

import logging

import pytest

from hipt_ray import storage
from hipt_ray.config import load_config

REFUSED = (
    "LanceError(IO): Generic S3 error: Error after 0 retries in 1.2ms, max_retries:10, retry_timeout:180s, "
    "source:error sending request for url (http://127.0.0.1:9/bucket/out/slides.lance/_versions/1.manifest): "
    "client error (Connect): tcp connect error: Connection refused (os error 111), "
    "/home/runner/.cargo/registry/src/index.crates.io/lance-io-0.37.0/src/object_store.rs:312:27"
)


class Clock:
    """time.monotonic and time.sleep of a test: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(storage.time, "monotonic", lambda: c.now)
    monkeypatch.setattr(storage.time, "sleep", c.sleep)
    return c


def _failing(exc: Exception):
    calls = []

    def fn():
        calls.append(1)
        raise exc

    return fn, calls


def test_each_retry_is_one_clear_line(clock, caplog):
    fn, calls = _failing(OSError(REFUSED))
    with caplog.at_level(logging.WARNING, logger="hipt_ray.storage"), pytest.raises(OSError):
        storage.with_retries(fn, what="s3://bucket/out/slides.lance", retries=2, seconds=60)
    assert len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "s3://bucket/out/slides.lance: cannot reach the object store at http://127.0.0.1:9; retry 1 of 2 in 0.5 s",
        "s3://bucket/out/slides.lance: cannot reach the object store at http://127.0.0.1:9; retry 2 of 2 in 1.0 s",
    ]
    # anything else from Lance: its words without the wrapper and the Rust source location
    line = storage.retry_warning(
        "s3://b/t",
        OSError("LanceError(IO): Generic S3 error: 503 SlowDown, /src/lance-io/src/object_store.rs:1:2"),
        0,
        3,
        0.5,
    )
    assert line == "s3://b/t: Generic S3 error: 503 SlowDown; retry 1 of 3 in 0.5 s"


def test_retrying_stops_at_the_time_budget(clock):
    fn, calls = _failing(TimeoutError("read timed out"))
    t0 = clock.now
    with pytest.raises(TimeoutError):
        storage.with_retries(fn, what="s3://b/x", retries=20, seconds=10)
    assert clock.now - t0 <= 10 and clock.slept == [0.5, 1.0, 2.0, 4.0]  # the next, 8 s, would pass 10 s
    assert len(calls) == 5


def test_the_budget_is_a_setting_that_reaches_lance_and_the_defaults(clock, monkeypatch):
    from hipt_ray.store.tables import lance_storage_options

    cfg = load_config()
    assert (cfg.storage.retries, cfg.storage.retry_seconds) == (storage.DEFAULT_RETRIES, storage.DEFAULT_RETRY_SECONDS)
    monkeypatch.setenv(storage.RETRIES_ENV, "0")  # recorded, so the test leaves them as it found them
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "0")
    monkeypatch.delenv(storage.RETRIES_ENV)
    monkeypatch.delenv(storage.RETRY_SECONDS_ENV)
    assert storage.retry_budget() == (3, 60.0)
    # Lance's client gets one try's share of the budget (its defaults: 180 s of retries, 30 s a request)
    assert lance_storage_options("s3://b/o", "http://127.0.0.1:9") == {
        "client_max_retries": "3",
        "client_retry_timeout": "15",
        "timeout": "15s",
        "connect_timeout": "5s",
        "aws_endpoint": "http://127.0.0.1:9",
        "allow_http": "true",
    }
    assert lance_storage_options("/local/out") is None
    monkeypatch.setenv(storage.RETRIES_ENV, "1")  # what the CLI sets from storage.* before Ray starts
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "4.0")
    fn, calls = _failing(ConnectionResetError("connection reset by peer"))
    with pytest.raises(ConnectionResetError):
        storage.with_retries(fn, what="s3://b/x")
    assert len(calls) == 2 and lance_storage_options("s3://b/o")["client_retry_timeout"] == "2"


def test_the_cli_sets_the_budget_from_the_config(tmp_path, monkeypatch):
    import hipt_ray.heads.run as heads_run
    from hipt_ray.cli import main

    seen = {}

    def stage(cfg, run_name=None):
        seen["budget"] = storage.retry_budget()
        raise KeyboardInterrupt  # stop here: the budget is what this test is about

    monkeypatch.setattr(heads_run, "train_head", stage)
    monkeypatch.setenv(storage.RETRIES_ENV, "3")  # restored after the test (main sets them)
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "60.0")
    assert (
        main(
            ["train-head", "--out", str(tmp_path), "--labels", "l.csv", "storage.retries=5", "storage.retry_seconds=30"]
        )
        == 130
    )
    assert seen["budget"] == (5, 30.0)
