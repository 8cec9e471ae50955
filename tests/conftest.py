"""Shared fixtures: synthetic slides (good and bad), moto's S3 server, a local Ray instance; the
tiny test config; and the markers that split the suite into tiers.

Tiers: ``make test`` runs everything (what CI runs); ``make test-fast`` runs ``-m "not ray and not
s3"``, the tests that start neither Ray nor moto. A test is marked ``ray`` or ``s3`` by hand or,
here, by the fixtures it uses (``ray_local``; ``s3_endpoint`` and everything built on it), and a
test that starts Ray in this process without the ``ray`` marker fails, so the fast tier stays fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray refuses to spill its object store once the disk under /tmp is 95 % full (OutOfDiskError), a
# share of the disk, not a size: on a big shared disk that is many GB still free. The tests' Ray
# instances, clusters and CLI subprocesses inherit this; a disk that is really full still fails.
os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.99")

from hipt_ray.slides import synthetic  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs the tier hooks below on a small suite

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _tiny_config() -> Path:
    """The test-size config, wherever the checkout keeps its configs (shipped inside the package,
    or the older top-level ``configs/``): the one place tests and their subprocesses find it."""
    for path in (ROOT / "hipt_ray" / "configs" / "tiny.yaml", ROOT / "configs" / "tiny.yaml"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"tiny.yaml is in neither hipt_ray/configs/ nor configs/ under {ROOT}")


TINY_CONFIG = _tiny_config()
TINY = str(TINY_CONFIG)  # for `--config TINY` in CLI arguments

# fixture → marker: a test using the fixture (directly or through another fixture) gets the marker
TIER_FIXTURES = {"ray_local": "ray", "s3_endpoint": "s3", "s3_auth_endpoint": "s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in sorted(TIER_FIXTURES.keys() & set(getattr(item, "fixturenames", ()))):
            item.add_marker(TIER_FIXTURES[fixture])


@pytest.fixture(autouse=True)
def _ray_only_when_marked(request):
    """Fail a test that started Ray in this process without the ``ray`` marker (it would slow the
    fast tier down by the Ray start-up and leave a Ray running for the tests after it)."""
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized() and request.node.get_closest_marker("ray") is None:
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray: mark it `@pytest.mark.ray` or use the ray_local fixture")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tile_one(uri: str, tmp_path: Path, endpoint: str, *overrides: str) -> dict:
    """The ``slides`` row of the slide at ``uri`` (id ``small``) tiled in this process by the tile
    backend (``tile_slide``, no Ray, no QC image), reading from ``endpoint``, with ``overrides``."""
    from hipt_ray.config import load_config
    from hipt_ray.slides.manifest import SlideSpec
    from hipt_ray.slides.tiler import make_cache, tile_slide

    cfg = load_config(
        "tile",
        values={"slides": "x", "out": str(tmp_path / "o")},
        overrides=[
            f"storage.s3_endpoint_url={endpoint}",
            f"storage.cache_dir={tmp_path / 'c'}",
            "reader.backend=tiles",
            "qc.enabled=false",
            *overrides,
        ],
    )
    return tile_slide(SlideSpec("small", uri), cfg, cache=make_cache(cfg), spec_hash="h").slide


# ---------------------------------------------------------------- synthetic slides

# name → expected status of `tile` with the default config. Sizes are kept small (a few
# regions) so that the whole set is written in a few seconds.
EXPECTED = {
    "good": "ok",
    "forty": "ok",
    "small": "ok",
    "objective": "ok",
    "blank": "no_tissue",
    "notaslide": "failed",
    "empty": "failed",
    "truncated": "failed",
    "corrupt": "failed",
    "nompp": "failed",
    "absurd": "failed",
}


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory) -> dict[str, Path]:
    """One slide of every kind the tile stage must handle, good and bad."""
    d = tmp_path_factory.mktemp("slides")
    paths: dict[str, Path] = {}

    def make(name: str, ext: str = ".tiff", **kw) -> Path:
        paths[name] = d / f"{name}{ext}"
        synthetic.make_slide(paths[name], **kw)
        return paths[name]

    make("good", width_um=5000, height_um=3000, mpp=0.5, seed=1, n_blobs=2)
    make("forty", ".svs", width_um=2600, height_um=2100, mpp=0.25, seed=2, aperio=True, objective=40)
    make("small", width_um=1500, height_um=1100, mpp=0.5, seed=3, n_blobs=1)
    make(
        "objective", ".svs", width_um=2500, height_um=2000, mpp=0.5, seed=4, aperio=True, write_mpp=False, objective=20
    )
    make("blank", width_um=3000, height_um=2000, mpp=0.5, seed=5, tissue=False)
    make("nompp", width_um=2500, height_um=2000, mpp=0.5, seed=6, write_mpp=False)
    rgb, _ = synthetic.render(2000, 2000, mpp=0.5, seed=7)
    paths["absurd"] = d / "absurd.tiff"
    synthetic.write_slide(paths["absurd"], rgb, mpp=50.0)
    paths["notaslide"] = d / "notaslide.svs"
    paths["notaslide"].write_text("patient notes, not an image\n" * 100)
    paths["empty"] = d / "empty.svs"
    paths["empty"].write_bytes(b"")
    make("truncated", width_um=3000, height_um=2000, mpp=0.5, seed=8)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 3])
    make("corrupt", width_um=3000, height_um=2000, mpp=0.5, seed=9)
    synthetic.corrupt_tiles(paths["corrupt"])
    return paths


@pytest.fixture(scope="session")
def twin_slides(tmp_path_factory) -> tuple[Path, Path]:
    """The same tissue scanned at 40× (0.25 µm/px) and 20× (0.5 µm/px, a 2× box reduction)."""
    d = tmp_path_factory.mktemp("twins")
    rgb40, _ = synthetic.render(8704, 8448, mpp=0.25, seed=11, n_blobs=2)
    rgb20 = rgb40.reshape(4224, 2, 4352, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    synthetic.write_slide(d / "twin40.tiff", rgb40, mpp=0.25, quality=95)
    synthetic.write_slide(d / "twin20.tiff", rgb20, mpp=0.5, quality=95)
    return d / "twin40.tiff", d / "twin20.tiff"


# ---------------------------------------------------------------- moto S3 (a real S3 API)


def _start_moto(port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1; the AWS variables are set for this process and for the
    Ray workers it starts (they inherit the environment of ray.init)."""
    port = free_port()
    proc = _start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def s3_auth_endpoint() -> str:
    """A second moto server that checks credentials: our test keys are unknown to it."""
    port = free_port()
    proc = _start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the whole run, started after the S3 variables are set."""
    import ray

    from hipt_ray.runtime import start_ray

    start_ray(num_cpus=2)  # a private local Ray, whatever `ray start` left on the machine
    yield ray
    ray.shutdown()


def stop_process_group(proc: subprocess.Popen, timeout: float = 5) -> None:
    """End a process started with ``start_new_session=True`` and everything it spawned (SIGTERM,
    then SIGKILL after ``timeout`` s: a `ray start --block` head can take half a minute to go
    gracefully, and nothing here needs it to)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def ray_head(*, num_cpus: int = 1, temp_dir: Path | None = None, env: dict | None = None, extra: tuple[str, ...] = ()):
    """A real ``ray start --head``, yielding ``(process, gcs address, ray_current_cluster path)``; stopped on
    exit, and Ray's ``ray_current_cluster`` file put back as it was, so that no later
    ``ray.init()`` on this machine finds the address of a head that is gone."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(str(temp_dir) if temp_dir else None))
    before = address_file.read_text() if address_file.is_file() else None
    port = free_port()
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        *extra,
    ]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        # Ray records the node's own IP there (not necessarily 127.0.0.1), with our port.
        while not (address_file.is_file() and address_file.read_text().strip().endswith(f":{port}")):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head on port {port} did not come up")
            time.sleep(0.5)
        yield proc, address_file.read_text().strip(), address_file
    finally:
        stop_process_group(proc)
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


@contextlib.contextmanager
def cluster_gcs(cluster):
    """A ``ray.cluster_utils`` cluster's own GCS tables, read directly (its head runs without the
    dashboard that the State API goes through; the test process stays connected to the session's
    Ray). Never processes found by name across the machine, where another job may run."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(
        GcsClientOptions.create(
            cluster.address,
            cluster.head_node.cluster_id.hex(),
            allow_cluster_id_nil=False,
            fetch_cluster_id_if_nil=False,
        )
    )
    try:
        yield state
    finally:
        state.disconnect()


def model_actors(cluster, *, alive: bool = False) -> list[dict]:
    """The embedding job's model actors in ``cluster``'s actor table (Ray Data names their class
    ``MapWorker(MapBatches(RegionEmbedder…))``): every one it ran, or only the live ones."""
    with cluster_gcs(cluster) as state:
        table = state.actor_table(None, actor_state_name="ALIVE" if alive else None)
    return [
        a
        for a in table.values()
        if a["ActorClassName"].startswith("MapWorker(") and "RegionEmbedder" in a["ActorClassName"]
    ]


@pytest.fixture()
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


def copy_slides(paths: dict[str, Path], names, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(paths[n], dest / paths[n].name)
    return dest
