"""A time limit on the first output of a pipeline whose model actors may never start.

An actor pool waiting for a node the autoscaler never delivers (no cloud capacity, a quota, a
launch that keeps failing) makes Ray Data's iterator block with nothing said: no row arrives and
no error is raised. The watchdog waits for the pipeline's first batch in a helper thread and
raises once ``timeout_s`` has passed without one, saying while it waits what it waits for. The
first batch is the signal because it needs nothing from Ray but the pipeline itself (no
dashboard or state API, which a cluster may run without) and proves a model actor started and
embedded; the limit is meant to be long enough for a node to boot and the model to load.
Once the first batch is in, the rest is iterated in the caller's thread as before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class ModelActorsNeverStarted(RuntimeError):
    """No model actor started within ``embed.actor_start_timeout_s``: a runtime failure (exit
    code 1) whose message is one line with the cause and the fix, printed without a traceback."""


def first_within(
    items: Iterable[T],
    *,
    timeout_s: float,
    waiting: Callable[[float], str],
    timed_out: Callable[[float], Exception],
    log_every_s: float = 60.0,
) -> Iterator[T]:
    """``items``, unchanged, except that the first must arrive within ``timeout_s`` seconds
    (0: no limit): until it does, ``waiting(seconds)`` is logged every ``log_every_s``; past the
    limit ``timed_out(seconds)`` is raised. The thread left blocked in the iterator is a daemon:
    it does not keep the process from exiting."""
    it = iter(items)
    box: queue.Queue = queue.Queue(maxsize=1)

    def pull() -> None:
        try:
            box.put((True, next(it, _END)))
        except BaseException as exc:  # handed to the caller's thread
            box.put((False, exc))

    threading.Thread(target=pull, name="hipt-first-batch", daemon=True).start()
    t0 = time.monotonic()
    while True:
        waited = time.monotonic() - t0
        step = log_every_s if not timeout_s else min(log_every_s, max(timeout_s - waited, 0.0))
        try:
            ok, first = box.get(timeout=step)
            break
        except queue.Empty:
            waited = time.monotonic() - t0
            if timeout_s and waited >= timeout_s:
                raise timed_out(waited) from None
            log.info(waiting(waited))
    if not ok:
        raise first
    if first is _END:
        return
    yield first
    yield from it
