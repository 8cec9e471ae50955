"""URIs (plain paths, ``file://``, ``s3://``) and the bounded local staging cache for slides.

OpenSlide only opens local files, so a slide in object storage is first copied into a cache on
the node: bounded in bytes, least-recently-used eviction, written atomically (temp file +
rename), and keyed by URI, size and ETag/mtime so that a changed object is fetched again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """An object could not be read; the message says which one and what to do about it."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local URI as a plain filesystem path (``file://`` stripped, ``~`` expanded)."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.expanduser(uri)


# Public buckets read without credentials: storage.anonymous_buckets. Like the retry budget, the
# CLI sets it for its process through this variable, which the Ray workers it starts inherit.
ANONYMOUS_ENV = "HIPT_RAY_ANONYMOUS_BUCKETS"
DEFAULT_ANONYMOUS_BUCKETS = ("idc-open-data",)


def set_anonymous_buckets(buckets: Sequence[str]) -> None:
    """Read ``buckets`` without credentials, here and in the Ray workers started after this call."""
    os.environ[ANONYMOUS_ENV] = ",".join(buckets)


def anonymous_buckets() -> frozenset[str]:
    """The buckets this process reads anonymously (unset: :data:`DEFAULT_ANONYMOUS_BUCKETS`)."""
    text = os.environ.get(ANONYMOUS_ENV)
    names = DEFAULT_ANONYMOUS_BUCKETS if text is None else text.split(",")
    return frozenset(n.strip() for n in names if n.strip())


def bucket_of(uri: str) -> str:
    """The bucket of an ``s3://`` URI ('' for any other)."""
    return uri[len("s3://") :].split("/", 1)[0] if uri.startswith("s3://") else ""


# Endpoints per bucket: storage.bucket_endpoints, passed to Ray workers the same way (JSON).
BUCKET_ENDPOINTS_ENV = "HIPT_RAY_BUCKET_ENDPOINTS"
# "aws" in storage.bucket_endpoints: AWS's own S3 endpoint, whatever s3_endpoint_url or
# AWS_ENDPOINT_URL say (botocore reads that variable too, so it is named, not left unset).
AWS_S3_ENDPOINT = "https://s3.amazonaws.com"


def set_bucket_endpoints(endpoints: dict[str, str]) -> None:
    """Send the requests for each bucket of ``endpoints`` to its endpoint, here and in the Ray
    workers started after this call."""
    os.environ[BUCKET_ENDPOINTS_ENV] = json.dumps(endpoints, sort_keys=True)


def bucket_endpoint(uri: str) -> str | None:
    """The endpoint storage.bucket_endpoints names for ``uri``'s bucket (``aws``: AWS's own), or
    ``None`` when it names none."""
    text = os.environ.get(BUCKET_ENDPOINTS_ENV)
    mapped = json.loads(text).get(bucket_of(uri)) if text else None
    return AWS_S3_ENDPOINT if mapped == "aws" else mapped


def is_anonymous(uri: str) -> bool:
    """Whether ``uri`` is in a bucket read without credentials (storage.anonymous_buckets)."""
    return bucket_of(uri) in anonymous_buckets()


def storage_options(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``uri``; S3 endpoints also come from the standard AWS variables. A
    bucket of storage.anonymous_buckets is read with unsigned requests (``anon``): public data
    needs no credentials, and credentials meant for the output are not sent to it."""
    if not uri.startswith("s3://"):
        return {}
    endpoint = (
        bucket_endpoint(uri)
        or endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    if is_anonymous(uri):
        options["anon"] = True
    return options


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for ``uri``."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), local_path(uri)
    protocol = uri.split("://", 1)[0]
    fs = fsspec.filesystem(protocol, **storage_options(uri, endpoint_url))
    return fs, fs._strip_protocol(uri)


def local_output_dir(out: str | None, *parts: str) -> str:
    """The one rule for where a command writes plain local files (head runs, search results, the
    MLflow store): under ``out`` when it is a local folder, else under the current directory (an
    ``s3://`` output holds the tables only). Created if missing.

    Raises:
        OutputStoreError: the folder cannot be made (read-only, full): one line naming it.
    """
    base = local_path(out) if out and not is_remote(out) else os.getcwd()
    path = os.path.join(base, *parts)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc) from None
    return path


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *parts]) if is_remote(base) else str(Path(local_path(base), *parts))


def describe_error(uri: str, exc: BaseException, endpoint_url: str | None = None) -> str:
    """A message a person can act on for a failed object access (``endpoint_url``: the one the
    access was made with, storage.s3_endpoint_url)."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return _missing_bucket(uri, endpoint_url)
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "not found" in low:
        return f"{uri}: no such file or object; check the path or S3 key"
    if isinstance(exc, PermissionError) or any(
        s in low for s in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")
    ):
        if is_anonymous(uri):
            return (
                f"{uri}: the bucket {bucket_of(uri)} refuses anonymous reads ({text}); it is listed in "
                "storage.anonymous_buckets: take it out of that list to read it with your AWS credentials"
            )
        return f"{uri}: access denied ({text}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the bucket policy"
    if is_transient(exc):
        return (
            f"{uri}: {_gist(str(exc))} ({type(exc).__name__}), still failing after retries: the object store "
            "is throttling or unavailable; rerun later to retry this slide (finished slides are kept)"
        )
    return f"{uri}: {text}"


def _missing_bucket(uri: str, endpoint_url: str | None) -> str:
    """A bucket the endpoint asked does not have: where it was asked, and what to check — the name,
    or, when an endpoint other than AWS's answered (a MinIO holding the output), the bucket's own."""
    endpoint = storage_options(uri, endpoint_url).get("client_kwargs", {}).get("endpoint_url")
    bucket = bucket_of(uri)
    if endpoint and bucket_endpoint(uri) is None:
        fix = (
            f"check the URI; if {bucket} lives elsewhere (on AWS, as public data such as idc-open-data does), "
            f"name its endpoint: storage.bucket_endpoints={{{bucket}: aws}}"
        )
    else:
        fix = "check the URI and storage.bucket_endpoints / AWS_ENDPOINT_URL"
    return f"{uri}: the bucket does not exist at {f'the endpoint {endpoint}' if endpoint else 'AWS'}; {fix}"


class OutputStoreError(StorageError):
    """The output store refused or failed a request; ``config`` when only the user can fix it
    (credentials, bucket, endpoint: exit code 2), else a failure that outlasted the retries."""

    def __init__(self, message: str, *, config: bool) -> None:
        super().__init__(message)
        self.config = config


_UNREACHABLE = (
    "could not connect",
    "error sending request",
    "connection refused",
    "endpointconnectionerror",
    "connecttimeout",
    "timed out",
    "name or service not known",
    "failed to resolve",
    "dns error",
)


def _gist(text: str) -> str:
    """A server's XML error reduced to ``Code: Message``; anything else to its first line."""
    code, msg = re.search(r"<Code>(.*?)</Code>", text), re.search(r"<Message>(.*?)</Message>", text)
    if code:
        return f"{code.group(1)}: {msg.group(1)}" if msg else code.group(1)
    # Lance's wording: "LanceError(IO): <what>, /path/to/src/file.rs:12:34" → "<what>"
    text = re.sub(r"LanceError\(\w+\):\s*", "", text)
    text = re.sub(r",?\s*/\S+\.rs:\d+:\d+", "", text)
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 200 else line[:200] + " …"


# A local disk's refusals, by errno and as Lance words them ("… (os error 28)").
_READ_ONLY = (errno.EROFS, ("read-only file system", "(os error 30)"))
_FULL = (errno.ENOSPC, ("no space left on device", "(os error 28)"))
_QUOTA = (errno.EDQUOT, ("disk quota exceeded", "(os error 122)"))


def _is(exc: BaseException, kind: tuple[int, tuple[str, ...]]) -> bool:
    code, words = kind
    low = str(exc).lower()
    return getattr(exc, "errno", None) == code or any(w in low for w in words)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (its cause, else its context), outermost first."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def disk_write_error(out: str, exc: BaseException) -> OutputStoreError | None:
    """One line for an output a local disk refuses to write (read-only, full, over quota),
    found anywhere in ``exc``'s chain (a Ray task's error, Lance's ``LanceError(IO)``); else None."""
    for seen in _chain(exc):
        if any(_is(seen, kind) for kind in (_READ_ONLY, _FULL, _QUOTA)):
            return output_error(out, seen)
    return None


def spill_disk_error(exc: BaseException) -> str | None:
    """One line for Ray's ``OutOfDiskError`` found anywhere in ``exc``'s chain (a node's object
    store was full and the disk it spills to was over Ray's limit, 95 % full by default); else None.
    The node is named where the task's error carries it."""
    for seen in _chain(exc):
        if any(c.__name__ == "OutOfDiskError" for c in type(seen).__mro__):
            # the task's own error keeps `ip`; the copy Ray raises (an instance of both classes)
            # keeps it only in its text: "ray::Map(read_region)() (pid=…, ip=192.0.2.2)"
            found = re.search(r"\bip=([0-9A-Fa-f.:]+)\)", str(seen))
            ip = getattr(seen, "ip", None) or (found.group(1) if found else None)
            node = f"node {ip}" if ip else "a node"
            return (
                f"Ray ran out of room on {node}: its object store was full and the disk it spills to "
                "(under Ray's temp dir, /tmp/ray by default) is over Ray's limit (95 % full by default); "
                "free disk there, or start that node with `ray start --object-spilling-directory=<a larger "
                "disk>`, or raise the limit with RAY_local_fs_capacity_threshold=0.99 in the nodes' "
                "environment; nothing committed is lost: rerun to resume"
            )
    return None


def _cause(uri: str, exc: BaseException, *, at_start: bool = False) -> tuple[str, str, bool]:
    """(cause in words, the fix, whether only the person can fix it) of a failed request."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    where = f" (writing {exc.filename})" if getattr(exc, "filename", None) else ""
    if _is(exc, _READ_ONLY):
        cause, fix, config = f"the file system is read-only{where}", "choose a writable --out", False
    elif _is(exc, _FULL) or _is(exc, _QUOTA):
        full = "no space left on the device" if _is(exc, _FULL) else "the disk quota is exceeded"
        cause, fix, config = f"{full}{where}", "free some space (or choose another --out)", False
    elif "nocredentialserror" in low or "unable to locate credentials" in low:
        cause, fix, config = (
            "no AWS credentials were found",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            True,
        )
    elif isinstance(exc, PermissionError) and not is_remote(uri):
        cause, fix, config = f"permission denied{where}", "choose a folder you can write as --out", True
    elif isinstance(exc, PermissionError) or any(
        s in low for s in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", " 403")
    ):
        cause, fix, config = (
            f"access denied ({_gist(str(exc))})",
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
            True,
        )
    elif "nosuchbucket" in low:
        cause, fix, config = (
            "the bucket does not exist",
            "check the bucket name in --out (hipt-ray never creates buckets)",
            True,
        )
    elif any(s in low for s in _UNREACHABLE):
        where = re.search(r"https?://[^/\s\"']+", str(exc))
        cause, fix, config = (
            "cannot reach the object store" + (f" at {where.group(0)}" if where else ""),
            "check AWS_ENDPOINT_URL / storage.s3_endpoint_url and the network",
            at_start,
        )
    else:
        cause, fix, config = _gist(str(exc)) or type(exc).__name__, "", False
    return cause, fix, config


def output_error(uri: str, exc: BaseException, *, at_start: bool = False) -> OutputStoreError:
    """One line naming ``uri``, the cause and the fix for a failed output-store request.
    ``at_start``: the first contact with the store, where an unreachable endpoint is a setting."""
    cause, fix, config = _cause(uri, exc, at_start=at_start)
    if not config:
        fix = (fix + "; " if fix else "") + "nothing committed is lost: rerun to resume"
    return OutputStoreError(f"output {uri}: {cause}; {fix}", config=config)


def _check_local_output(path: str) -> None:
    """Make the output folder and write a probe file in it, so that a read-only or full disk is
    one line before anything starts (not a traceback from the first table write)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".hipt-ray-probe-")
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise output_error(path, exc, at_start=True) from None


def check_output(out: str, endpoint_url: str | None = None) -> None:
    """Refuse a local output that cannot be written (read-only, full, not ours); an output in a
    bucket that does not exist (never create one: a misspelt bucket name must not silently become
    a new bucket), one the credentials cannot reach, or an endpoint that does not answer.

    Raises:
        OutputStoreError: one line naming the folder or bucket, the cause and what to do.
    """
    if not is_remote(out):
        _check_local_output(local_path(out))
        return
    fs, path = filesystem(out, endpoint_url)
    bucket = path.split("/", 1)[0]
    scheme = out.split("://", 1)[0]
    try:
        if hasattr(fs, "call_s3"):  # HeadBucket tells 404 (no bucket) from 403 and no answer
            fs.call_s3("head_bucket", Bucket=bucket)
        elif not fs.exists(bucket):
            raise FileNotFoundError(bucket)
    except FileNotFoundError:
        raise OutputStoreError(
            f"output {out}: the bucket {scheme}://{bucket} does not exist (hipt-ray never creates "
            "buckets); check the spelling in --out, or create the bucket first",
            config=True,
        ) from None
    except Exception as exc:
        raise output_error(out, exc, at_start=True) from None


def is_transient(exc: BaseException) -> bool:
    """Whether an object-store error may go away on retry (a timeout, a reset connection, a 5xx),
    as opposed to a missing object, a refused credential or a bad request. Lance reports its I/O
    failures as ``ValueError``/``OSError`` with ``LanceError(IO)``."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    low = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, ValueError) and "lanceerror(io)" not in low:
        return False
    permanent = (
        "accessdenied",
        "access denied",
        "invalidaccesskeyid",
        "signaturedoesnotmatch",
        "forbidden",
        "nosuchbucket",
        "nosuchkey",
        "invalidbucketname",
        "nocredentials",
        "unable to locate credentials",
        "403",
        "404",
        "was not found",
        "precondition",
        "pre-condition",
        # a local file system's answer does not change on retry (Lance: "(os error N)")
        "not a directory",
        "is a directory",
        "permission denied",
        "read-only file system",
        "no space left on device",
        "file name too long",
    )
    return not any(s in low for s in permanent)


# The retry budget of one object-store request: storage.retries and storage.retry_seconds. The
# CLI sets it for its process through these variables, which the Ray workers it starts inherit
# (on a cluster started elsewhere, set them in its environment, or the defaults apply).
RETRIES_ENV, RETRY_SECONDS_ENV = "HIPT_RAY_STORAGE_RETRIES", "HIPT_RAY_STORAGE_RETRY_SECONDS"
# Every setting handed to Ray workers through their environment (hipt_ray.runtime passes them to
# a cluster's workers, which do not inherit the driver's environment).
WORKER_ENV = (RETRIES_ENV, RETRY_SECONDS_ENV, ANONYMOUS_ENV, BUCKET_ENDPOINTS_ENV)
DEFAULT_RETRIES, DEFAULT_RETRY_SECONDS = 3, 60.0


def set_retry_budget(retries: int, seconds: float) -> None:
    """Use ``retries`` and at most about ``seconds`` per object-store request, here and in the
    Ray workers started after this call."""
    os.environ[RETRIES_ENV], os.environ[RETRY_SECONDS_ENV] = str(int(retries)), repr(float(seconds))


def retry_budget() -> tuple[int, float]:
    """(retries, seconds) of one object-store request in this process."""
    return (
        int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES)),
        float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)),
    )


def lance_retry_options() -> dict[str, str]:
    """Lance's own client retries and request timeout within one try's share of the budget.
    pylance 14's defaults (3 retries for up to 180 s, a 30 s request timeout) under each of ours
    let a store that accepts connections and never answers hold a run for over 5 minutes; with
    these, one table open against it gives up after about 90 s (measured; an open makes several
    requests in turn), and a refused connection after about 20 s."""
    retries, seconds = retry_budget()
    share = max(1, int(seconds / (retries + 1)))
    return {
        "client_max_retries": "3",
        "client_retry_timeout": str(share),
        "timeout": f"{share}s",
        "connect_timeout": f"{min(5, share)}s",
    }


def retry_warning(what: str, exc: BaseException, attempt: int, retries: int, delay: float) -> str:
    """One line for a retried request: what, the cause in words, which retry and when."""
    cause = _cause(what, exc)[0]
    return f"{what}: {cause}; retry {attempt + 1} of {retries} in {delay:.1f} s"


def with_retries(fn, *, what: str, retries: int | None = None, seconds: float | None = None, base_delay: float = 0.5):
    """``fn()``, retried on transient errors with exponential backoff (0.5, 1, 2 … s, at most
    8 s), at most ``retries`` times and not past ``seconds`` after the first try (both default to
    :func:`retry_budget`); each retry is one warning line."""
    budget_retries, budget_seconds = retry_budget()
    retries = budget_retries if retries is None else retries
    deadline = time.monotonic() + (budget_seconds if seconds is None else seconds)
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            delay = min(base_delay * 2.0**attempt, 8.0)
            if attempt == retries or not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s", retry_warning(what, exc, attempt, retries, delay))
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str  # ETag for object storage; mtime and a content fingerprint for local files


FINGERPRINT_BYTES = 64 * 1024  # read at each end of a local file (see :func:`stat`)


def _fingerprint(fs, path: str, size: int) -> str:
    """A hash of the first and last 64 KiB of a file: where slide formats keep their header and
    tile directories, so a different slide differs here even with its size and mtime kept."""
    h = hashlib.blake2b(digest_size=8)
    with fs.open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def stat(uri: str, endpoint_url: str | None = None) -> ObjectInfo:
    """``uri``'s size and version: its ETag on object storage (a content hash already); for a
    local file its mtime and a fingerprint of its content (``mtime#hash``), because ``cp -p``,
    ``rsync -a`` and restore tools keep the mtime of a file they replace."""
    fs, path = filesystem(uri, endpoint_url)
    info = fs.info(path, refresh=True)  # never a listing cached earlier in this process: the file may have changed
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{uri} is a directory, not a slide file")
    size = int(info.get("size") or 0)
    version = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if not version:
        version = str(info.get("mtime") or info.get("LastModified") or "")
        if not is_remote(uri):
            version += "#" + _fingerprint(fs, path, size)
    return ObjectInfo(uri=uri, size=size, version=version)


class StagingCache:
    """Local copies of remote slides, at most ``max_bytes`` in all, evicting least recently used.

    Safe for several processes on one node: each download goes to its own temp file and is
    renamed into place, and a file evicted while another process has it open stays readable
    (POSIX unlink semantics).
    """

    def __init__(self, cache_dir: str, max_bytes: int, *, endpoint_url: str | None = None, retries: int = 3) -> None:
        self.root = Path(os.path.expanduser(cache_dir))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.endpoint_url = endpoint_url
        self.retries = retries

    def _key(self, info: ObjectInfo) -> str:
        digest = hashlib.sha256(f"{info.uri}\0{info.size}\0{info.version}".encode()).hexdigest()[:24]
        suffix = "".join(Path(info.uri.rsplit("/", 1)[-1]).suffixes)[-16:]
        return digest + suffix

    def _entries(self) -> list[Path]:
        return [p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".tmp")]

    def _evict_for(self, incoming: int) -> None:
        entries = sorted(self._entries(), key=lambda p: p.stat().st_atime)
        used = sum(p.stat().st_size for p in entries)
        while entries and used + incoming > self.max_bytes:
            victim = entries.pop(0)
            used -= victim.stat().st_size
            victim.unlink(missing_ok=True)
            log.info("staging cache: evicted %s", victim.name)

    def fetch(self, uri: str) -> tuple[str, ObjectInfo]:
        """A local path holding ``uri``'s current content, and the object's identity.

        Local URIs are returned as they are (no copy).
        """
        if not is_remote(uri):
            return local_path(uri), stat(uri)
        info = with_retries(lambda: stat(uri, self.endpoint_url), what=uri, retries=self.retries)
        if info.size > self.max_bytes:
            raise StorageError(
                f"{uri} is {info.size / 2**30:.2f} GiB, more than the whole staging cache "
                f"(storage.cache_max_bytes={self.max_bytes}); raise storage.cache_max_bytes"
            )
        target = self.root / self._key(info)
        if target.is_file() and target.stat().st_size == info.size:
            os.utime(target)  # LRU: a hit counts as a use
            return str(target), info
        self._evict_for(info.size)
        fs, path = filesystem(uri, self.endpoint_url)
        for attempt in range(self.retries + 1):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            os.close(fd)
            try:
                fs.get_file(path, tmp)
                if os.path.getsize(tmp) != info.size:
                    raise StorageError(f"{uri}: short read ({os.path.getsize(tmp)} of {info.size} bytes)")
                os.replace(tmp, target)
                return str(target), info
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:  # transient network errors are retried
                if attempt == self.retries:
                    raise
                delay = min(2.0**attempt * 0.5, 8.0)
                log.warning("%s", retry_warning(uri, exc, attempt, self.retries, delay))
                time.sleep(delay)
            finally:
                Path(tmp).unlink(missing_ok=True)
        raise AssertionError("unreachable")
