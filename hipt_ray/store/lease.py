"""One writer per output: a lease on ``OUT/_writer.lease`` held by ``tile`` and ``embed``.

Two runs writing one output at once would each tile and embed the same slides (duplicate rows),
and each run's start-up clean-up (orphan regions of a killed run) would delete the other run's
rows before their status rows land. So a run takes the output's writer lease first, and a second
run on the same output stops at once with exit code 2, naming the run that holds it.

- **Local disk:** an exclusive ``flock`` on the lease file, held for the whole run. The kernel
  drops it when the process dies, so a killed run never blocks the next one.
- **Object storage:** a lease object created with a conditional PUT (``If-None-Match: *``: of
  two runs starting together exactly one creates it), renewed every ``ttl/4`` seconds by a
  compare-and-swap PUT (``If-Match`` on the object's ETag) and deleted at the end. A lease whose
  renewal is older than ``ttl`` (its run died), or one held by a process of this host that no
  longer exists, is taken over by the same compare-and-swap, so exactly one successor wins.
  A run whose lease was taken over (it stalled past ``ttl``) stops before its next commit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from hipt_ray.config import ConfigError
from hipt_ray.storage import OutputStoreError, filesystem, is_remote, join, local_path

log = logging.getLogger(__name__)

LEASE = "_writer.lease"
_held: dict[str, _Lease] = {}  # output → this process's lease on it (re-entrant: embed runs tile)
_held_lock = threading.Lock()


class OutputInUse(ConfigError):
    """Another run holds the output's writer lease (exit code 2)."""


class LeaseLost(OutputStoreError):
    """This run's lease expired and another run took the output over; nothing more is committed
    (exit code 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, config=False)


def _key(out: str) -> str:
    return out.rstrip("/") if is_remote(out) else os.path.realpath(local_path(out))


def _describe(holder: dict) -> str:
    started = datetime.fromtimestamp(holder.get("started", 0), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"`hipt-ray {holder.get('command', '?')}` (host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, started {started})"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lease(ABC):
    def __init__(self, out: str, command: str, ttl: float, endpoint_url: str | None) -> None:
        self.out, self.command, self.ttl = out, command, ttl
        self.uri = join(out, LEASE)
        self.fs, self.path = filesystem(self.uri, endpoint_url)
        self.holder = {
            "token": uuid.uuid4().hex,
            "command": command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "renewed": time.time(),
            "ttl": ttl,
        }
        self.lost: str | None = None
        self.depth = 0

    @abstractmethod
    def acquire(self) -> None:
        """Take the lease, or raise :class:`OutputInUse` naming the live holder."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (the next run takes it at once, without waiting for expiry)."""

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def in_use(self, holder: dict, extra: str) -> OutputInUse:
        return OutputInUse(
            f"output {self.out} is being written by {_describe(holder)}; one run writes an "
            f"output at a time (duplicate rows otherwise): wait for it to finish{extra}, or write to "
            "another --out"
        )


class _LocalLease(_Lease):
    """``flock`` on the lease file; the file also says who holds it, for the message."""

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise self.in_use(holder, "") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor drops the flock


class _ObjectLease(_Lease):
    """A lease object with expiry, created and renewed by conditional PUTs."""

    def _put(self, **condition: str) -> str:
        self.holder["renewed"] = time.time()
        resp = self.fs.pipe_file(self.path, json.dumps(self.holder).encode(), **condition)
        etag = (resp or {}).get("ETag") if isinstance(resp, dict) else None
        return etag or self.fs.info(self.path, refresh=True)["ETag"]

    def _current(self) -> tuple[dict, str] | None:
        try:
            info = self.fs.info(self.path, refresh=True)
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(body or b"{}"), info["ETag"]
        except ValueError:
            return {}, info["ETag"]

    def acquire(self) -> None:
        for _ in range(3):  # the other run may release between our two requests
            try:
                self.etag = self._put(mode="create")
                break
            except FileExistsError:
                pass
            current = self._current()
            if current is None:
                continue
            holder, etag = current
            now = time.time()
            age = now - float(holder.get("renewed", 0))
            dead_here = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))
            if age <= float(holder.get("ttl", self.ttl)) and not dead_here:
                left = float(holder.get("ttl", self.ttl)) - age
                raise self.in_use(holder, f" (if that run is dead its lease expires in {left:.0f} s)")
            try:
                self.etag = self._put(IfMatch=etag)
            except OSError:  # another successor took it over first
                continue
            log.warning(
                "took over the writer lease of %s from %s (%s)",
                self.out,
                _describe(holder),
                "its process has exited" if dead_here else f"not renewed for {age:.0f} s",
            )
            break
        else:
            current = self._current()
            raise self.in_use(current[0] if current else {}, "")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="hipt-ray-lease", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(self.ttl / 4):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except FileNotFoundError:
                self.lost = f"the writer lease {self.uri} was deleted while this run held it"
            except OSError as exc:
                if getattr(exc, "errno", None) == errno.EINVAL or "precondition" in str(exc).lower():
                    self.lost = (
                        f"this run's writer lease on {self.out} expired and another run took the "
                        "output over; this run stopped before committing more (nothing committed "
                        "is lost: rerun to resume once the other run has finished)"
                    )
                else:
                    log.warning("could not renew the writer lease %s (retrying): %s", self.uri, exc)
            except Exception as exc:  # a transient network error: retried at the next tick
                log.warning("could not renew the writer lease %s (retrying): %s", self.uri, exc)
            if self.lost:
                return

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if self.lost:
            return
        try:
            current = self._current()
            if current and current[0].get("token") == self.holder["token"]:
                self.fs.rm_file(self.path)
        except Exception as exc:
            log.warning("could not remove the writer lease %s (it expires in %.0f s): %s", self.uri, self.ttl, exc)


@contextmanager
def writer_lease(out: str, command: str, *, endpoint_url: str | None = None, ttl: float = 120.0) -> Iterator[None]:
    """Hold ``out``'s writer lease for the block (re-entrant within a process).

    Raises:
        OutputInUse: another live run holds it.
    """
    key = _key(out)
    with _held_lock:
        lease = _held.get(key)
    if lease is None:
        lease = (_ObjectLease if is_remote(out) else _LocalLease)(out, command, ttl, endpoint_url)
        lease.acquire()
        with _held_lock:
            _held[key] = lease
    lease.depth += 1
    try:
        yield
    finally:
        lease.depth -= 1
        if lease.depth == 0:
            with _held_lock:
                _held.pop(key, None)
            lease.release()


def check_lease(out: str) -> None:
    """Before a commit: raise :class:`LeaseLost` if this process's lease on ``out`` was taken over
    (does nothing when no lease is held, e.g. a test writing tables directly)."""
    with _held_lock:
        lease = _held.get(_key(out))
    if lease is not None:
        lease.check()
