"""What a person sees: one progress line per stage, Ray's own chatter kept in Ray's log folder.

On a terminal a stage's line is redrawn in place (count, rate, ETA, and whatever the stage adds:
a loss, the best trial); when stderr is a pipe or a file (CI, ``ray job submit`` logs) it is
written as a plain line at most every ``HIPT_RAY_PROGRESS_SECONDS`` (30 s by default), plus the
last one. ``quiet_ray`` turns Ray's console output down to warnings: the Ray Data progress
records, the execution plans and per-operator bars stay in the session's ``ray-data.log``;
``--verbose`` keeps all of it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


_live: Progress | None = None  # the line being redrawn on the terminal, if any
_verbose = False


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's own console output (Ray Data records, Tune tables, worker logs) kept."""
    global _verbose
    _verbose = bool(on)


def verbose() -> bool:
    return _verbose


class Progress:
    """``Progress("embed", total=400, unit="regions")``; ``update(done, loss=…)``; ``close()``."""

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        unit: str = "",
        *,
        stream: IO[str] | None = None,
        every: float | None = None,
        live: bool | None = None,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every = float(os.environ.get("HIPT_RAY_PROGRESS_SECONDS", 30)) if every is None else every
        self.t0 = time.perf_counter()
        self.done = 0
        self.fields: dict[str, object] = {}
        self._width = 0
        self._closed = False
        self._first: tuple[float, int] | None = None  # (when, count) of the first update with work done
        self._written: tuple[float, int] | None = None  # (when, count) of the last plain line

    def rate(self) -> float:
        """Items a second since the first one came (start-up, a model's warm-up, is not work)."""
        if self._first is None or self.done <= self._first[1]:
            elapsed = time.perf_counter() - self.t0
            return self.done / elapsed if elapsed > 0 else 0.0
        t, n = self._first
        return (self.done - n) / max(time.perf_counter() - t, 1e-9)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.rate()
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.stage}: {count} {self.unit}".rstrip()]
        if self.done and elapsed > 0:
            parts.append(f"{rate:.2f}" if rate < 100 else f"{rate:.0f}")
            parts[-1] += f" {self.unit or 'items'}/s"
        parts += [f"{k} {v}" for k, v in self.fields.items() if v is not None and v != ""]
        if self.total is not None and 0 < self.done < self.total and rate > 0:
            parts.append(f"ETA {_seconds((self.total - self.done) / rate)}")
        parts.append(f"{_seconds(elapsed)} elapsed")
        return ", ".join(parts)

    def update(self, done: int | None = None, *, advance: int = 0, **fields: object) -> None:
        """Set the count (or ``advance`` it) and any extra fields; redraws when due."""
        self.done = self.done + advance if done is None else done
        if self._first is None and self.done > 0:
            self._first = (time.perf_counter(), self.done)
        self.fields.update(fields)
        self._draw(final=False)

    def close(self, **fields: object) -> None:
        if self._closed:
            return
        self.fields.update(fields)
        self._closed = True
        self._draw(final=True)

    def _draw(self, final: bool) -> None:
        global _live
        if self.total == 0:  # a stage with nothing to do (all done before) has no line
            return
        now = time.perf_counter()
        if self.live:
            text = self.line()
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            _live = None if final else self
        elif final or self._written is None or now - self._written[0] >= self.every:
            if final and self._written is not None and self._written[1] == self.done and now - self._written[0] < 1.0:
                return  # the same count was written a moment ago
            self._written = (now, self.done)
            self.stream.write(self.line() + "\n")
        else:
            return
        self.stream.flush()

    def __getstate__(self) -> dict:  # Tune pickles its callbacks: the stream is this process's
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stream = sys.stderr

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConsoleHandler(logging.StreamHandler):
    """A log handler that lifts a live progress line out of the way of a message, then redraws it."""

    def emit(self, record: logging.LogRecord) -> None:
        live = _live
        if live is not None and live.stream is self.stream:
            self.stream.write("\r" + " " * live._width + "\r")
        super().emit(record)
        if live is not None and live.stream is self.stream:
            live._width = 0
            live._draw(final=False)


def quiet_ray() -> None:
    """Ray's console chatter off unless ``--verbose``: Ray Data's records and progress bars (they
    still go to the session's ``logs/ray-data.log``), Tune's experiment box, and the
    once-per-start note that token authentication is on. Call before ``ray.init`` in the driver."""
    if _verbose:
        return
    from ray.data import DataContext

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Tune's newer console output prints its experiment box and paths even at verbose=0; the
    # classic one is silent there (the sweep's own line says trials done and the best so far)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:  # its session-file handler (not a stream
        if isinstance(handler, logging.StreamHandler):  # handler) keeps everything at DEBUG
            handler.setLevel(logging.ERROR)
