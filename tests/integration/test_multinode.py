"""`hipt-ray embed` on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and
worker raylets on this machine), placed by custom resources, surviving the loss of a node and the
death of the model actor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from hipt_ray.slides import synthetic
from hipt_ray.store import REGIONS, Store

from ..conftest import TINY, model_actors

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_SLIDES = 12


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("cluster_slides")
    for i in range(N_SLIDES):
        synthetic.make_slide(src / f"s{i}.tiff", width_um=2500, height_um=2100, seed=60 + i)
    return src


@pytest.fixture()
def cluster():
    """Head (no CPUs for tasks, as in cluster.yaml), a `decode` node for reads and a `model`
    node for the model actor."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {
        "decode": c.add_node(num_cpus=2, resources={"decode": 2}),
        "model": c.add_node(num_cpus=1, resources={"model": 1}),
        "any": c.add_node(num_cpus=1),
    }  # tiling tasks and fragment writes
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        c.shutdown()


def _embed(out: Path, src: Path, address: str, tmp_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "hipt_ray.cli",
        "embed",
        "--slides",
        str(src),
        "--out",
        str(out),
        "--address",
        address,
        "--config",
        TINY,
        "embed.read_resources={decode: 1}",
        "embed.actor_resources={model: 1}",
        "ray.write_batch_slides=1",
        "embed.write_regions=2",
        "embed.regions_per_task=1",
        # pixels from the decode node, as this test's three faults were timed for: with compressed
        # tiles (decode=auto, tested end to end in test_embed and test_jobs) 12 slides finish
        # before the third fault lands
        "embed.decode=reader",
        f"storage.cache_dir={tmp_path / 'cache'}",
        "storage.shared_output=true",  # every node of this test cluster mounts this disk
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _embedded(store: Store) -> int:
    try:
        latest = store.latest_slides(model_id=None)
        return latest.filter(pc.starts_with(latest["model_id"], "random-")).num_rows
    except Exception:
        return 0


def _check_exactly_once(out: Path) -> str:
    store = Store(str(out))
    tiled = {r["slide_id"]: r["n_regions"] for r in store.latest_slides(model_id="").to_pylist()}
    latest = store.latest_slides(model_id=None)
    mid = [m for m in latest["model_id"].to_pylist() if m.startswith("random-")][0]
    assert {r["slide_id"]: r["status"] for r in store.latest_slides(model_id=mid).to_pylist()} == {
        f"s{i}": "ok" for i in range(N_SLIDES)
    }
    rows = store.read(REGIONS, columns=["slide_id", "region_index"], filter=f"model_id = '{mid}'")
    keys = list(zip(rows["slide_id"].to_pylist(), rows["region_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == sum(tiled.values())  # 0 lost, 0 duplicated
    return mid


def _kill_model_actor(cluster) -> int:
    """SIGKILL the worker process of this cluster's live model actor, found in the cluster's own
    actor table (Ray Data names the actor class ``MapWorker(MapBatches(RegionEmbedder…))``):
    alive, on one of this cluster's nodes, its PID as the cluster recorded it. Never a process
    found by name across the machine, where another job's embedding actor may run too."""
    import signal

    ours = {node.node_id for node in cluster.list_all_nodes()}
    pids = [a["Pid"] for a in model_actors(cluster, alive=True) if a["Address"]["NodeID"] in ours]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def _wait_for(store: Store, n: int, proc: subprocess.Popen, what: str) -> int:
    deadline = time.time() + 300
    while _embedded(store) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    done = _embedded(store)
    assert proc.poll() is None and n <= done < N_SLIDES, f"{what} should happen mid-run ({done} slides done)"
    return done


def test_embed_survives_losing_the_decode_node_the_model_node_and_the_actor(cluster, slides, tmp_path):
    """One run, three faults, each after more slides were committed: the decode node goes away
    (not gracefully, with whatever its workers held: tasks, stored blocks), then the model node
    (with the actor), each replaced as the autoscaler would; then the model actor is SIGKILLed
    and Ray restarts it."""
    c, nodes = cluster
    out = tmp_path / "out"
    proc = _embed(out, slides, c.address, tmp_path)
    store = Store(str(out))
    replaced = {}
    try:
        done = [_wait_for(store, 1, proc, "losing the decode node")]
        c.remove_node(nodes["decode"], allow_graceful=False)
        replaced["decode"] = c.add_node(num_cpus=2, resources={"decode": 2})
        done.append(_wait_for(store, done[-1] + 1, proc, "losing the model node"))
        c.remove_node(nodes["model"], allow_graceful=False)
        replaced["model"] = c.add_node(num_cpus=1, resources={"model": 1})
        done.append(_wait_for(store, done[-1] + 1, proc, "killing the model actor"))
        assert _kill_model_actor(c) == 1
        printed, _ = proc.communicate(timeout=400)
    except (subprocess.TimeoutExpired, AssertionError) as exc:
        proc.kill()
        printed, _ = proc.communicate()
        pytest.fail(f"{exc}\n{printed[-3000:]}")
    assert proc.returncode == 0, printed[-3000:]
    assert f"{N_SLIDES} embedded, 0 failed" in printed
    _check_exactly_once(out)
    # reads ran on the decode nodes only, the model on the model nodes only
    line = next(ln for ln in printed.splitlines() if ln.startswith("pipeline:"))
    print(f"decode node lost after {done[0]} slides, model node after {done[1]}, actor killed after {done[2]}; {line}")
    placed = {
        kind: set(re.findall(r"([0-9a-f]{8})×", part)) for kind, part in re.findall(r"(read|model) on ([^;]+)", line)
    }
    meant = {
        "read": {nodes["decode"].node_id[:8], replaced["decode"].node_id[:8]},
        "model": {nodes["model"].node_id[:8], replaced["model"].node_id[:8]},
    }
    assert placed["read"] and placed["read"] <= meant["read"], line
    assert placed["model"] and placed["model"] <= meant["model"], line
    assert replaced["model"].node_id[:8] in placed["model"], line  # the replacement took over
