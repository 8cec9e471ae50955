"""The time limit on a pipeline's first output (model actors that never start)."""

import logging
import threading
import time

import pytest

from hipt_ray.embed.watchdog import ModelActorsNeverStarted, first_within


def _slow(first_after: float, items: list[int]):
    time.sleep(first_after)
    yield from items


def _watch(items, timeout_s: float, log_every_s: float = 60.0):
    return first_within(
        items,
        timeout_s=timeout_s,
        waiting=lambda s: f"still waiting after {s:.1f} s",
        timed_out=lambda s: ModelActorsNeverStarted(f"nothing in {s:.1f} s"),
        log_every_s=log_every_s,
    )


def test_items_that_arrive_in_time_pass_through_unchanged():
    assert list(_watch(_slow(0.05, [1, 2, 3]), timeout_s=5)) == [1, 2, 3]
    assert list(_watch(iter([]), timeout_s=5)) == []
    assert list(_watch(_slow(0.05, [4]), timeout_s=0)) == [4]  # 0: no limit


def test_a_first_item_that_never_comes_ends_the_wait_at_the_limit_saying_so_meanwhile(caplog):
    never = threading.Event()

    def blocked():
        never.wait()  # an actor pool that never starts: the iterator blocks, nothing raised
        yield 1

    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="hipt_ray.embed.watchdog"):
        with pytest.raises(ModelActorsNeverStarted, match=r"^nothing in \d+\.\d s$"):
            list(_watch(blocked(), timeout_s=0.6, log_every_s=0.25))
    assert 0.6 <= time.monotonic() - t0 < 3
    waits = [r.getMessage() for r in caplog.records]
    assert 1 <= len(waits) <= 2 and all(w.startswith("still waiting after 0.") for w in waits), waits
    never.set()


def test_an_error_before_the_first_item_reaches_the_caller():
    def broken():
        raise ValueError("the read failed")
        yield

    with pytest.raises(ValueError, match="the read failed"):
        list(_watch(broken(), timeout_s=5))
