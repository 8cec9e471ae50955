"""`hipt-ray embed` on an autoscaling cluster: Ray's fake node provider launches real raylets on
this machine when the job's model actors ask for the `model` resource, as an autoscaler launches
GPU nodes kept at zero. The head has no `model` resource, so every model actor runs on a node the
autoscaler added after the job started.

The head is started the way ``ray.cluster_utils.Cluster`` starts one (its own processes, on a
free port), not with ``AutoscalingCluster.start()``, which runs ``ray stop --force`` and kills
every Ray on the machine, the test session's own included. The fake provider's node types cannot
declare ``memory``, so the runs pass ``embed.actor_memory_gb=0`` (no memory request).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hipt_ray.slides import synthetic
from hipt_ray.store import REGIONS, Store

from ..conftest import TINY, cluster_gcs, free_port, model_actors

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_SLIDES = 4
HEAD_CPUS = 2
MODEL_NODE = {"CPU": 1, "GPU": 1, "model": 1}  # a fake GPU: Ray places on it, torch cannot use it


def _autoscaling_config(gcs_address: str) -> dict:
    """The fake provider's base config (the pip wheel lacks its example.yaml) with a head that
    has no model resource and a model node type kept at zero."""
    return {
        "cluster_name": "hipt-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            "model": {"resources": MODEL_NODE, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _kill_leftovers(gcs_address: str) -> None:
    """The fake provider starts its nodes' raylets from the autoscaler's process, outside the
    head's process list: end the ones of this cluster (their command line names its GCS)."""
    from ray._private import services

    for proc in services.psutil.process_iter(["cmdline"]):
        if any(
            a == f"--gcs-address={gcs_address}" or a == f"--gcs_address={gcs_address}"
            for a in proc.info["cmdline"] or []
        ):
            try:
                proc.kill()
            except services.psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import Cluster

    port = free_port()
    gcs_address = f"{get_node_ip_address()}:{port}"
    config = tmp_path_factory.mktemp("autoscaling") / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(gcs_address)))
    with pytest.MonkeyPatch.context() as env:  # read by the autoscaler the head starts
        env.setenv("RAY_FAKE_CLUSTER", "1")
        env.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        c = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": HEAD_CPUS,
                "gcs_server_port": port,
                "include_dashboard": False,
                "autoscaling_config": str(config),
                "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
            },
        )
    assert c.address == gcs_address
    try:
        yield c
    finally:
        c.shutdown()
        _kill_leftovers(gcs_address)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("autoscaling_slides")
    for i in range(N_SLIDES):
        synthetic.make_slide(src / f"s{i}.tiff", width_um=2500, height_um=2100, seed=80 + i)
    return src


def _embed(cluster, src: Path, out: Path, *overrides: str, timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hipt_ray.cli", "embed", "--slides", str(src), "--out", str(out)]
    cmd += ["--address", cluster.address, "--config", TINY, "embed.actor_resources={model: 1}"]
    cmd += ["embed.actor_memory_gb=0", "embed.regions_per_task=1", "embed.actor_batch_regions=1", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_an_actor_no_node_type_can_hold_ends_the_job_before_any_work(cluster, slides, tmp_path):
    t0 = time.time()
    never = _embed(cluster, slides, tmp_path / "a", "embed.actor_resources={nowhere: 1}", "embed.use_gpu=false")
    assert never.returncode == 2, never.stdout + never.stderr
    assert (
        "no node of this cluster can ever hold a model actor asking for {CPU: 1, model: 1, nowhere: 1}" in never.stderr
    )
    assert "the autoscaling config" in never.stderr and "model: {CPU: 1, GPU: 1, model: 1}" in never.stderr
    assert time.time() - t0 < 60


def _model_actor_nodes(cluster) -> list[str]:
    """The node of every model actor this cluster ran, alive or dead."""
    return [a["Address"]["NodeID"] for a in model_actors(cluster)]


def _alive_nodes(cluster) -> list[str]:
    with cluster_gcs(cluster) as state:
        return [n["NodeID"] for n in state.node_table() if n["Alive"]]


def test_embed_started_before_any_model_node_runs_on_the_nodes_the_autoscaler_adds(cluster, slides, tmp_path):
    head = cluster.head_node.node_id
    assert _alive_nodes(cluster) == [head]  # no model node yet
    out = tmp_path / "out"
    t0 = time.time()
    run = _embed(cluster, slides, out, "embed.use_gpu=false")  # CPU actors placed by `model`
    seconds = time.time() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"slides: {N_SLIDES} ({N_SLIDES} embedded, 0 failed" in run.stdout, run.stdout
    nodes = _model_actor_nodes(cluster)
    assert nodes and head not in nodes, nodes  # every model actor on a node the autoscaler added
    store = Store(str(out))
    tiled = {r["slide_id"]: r["n_regions"] for r in store.latest_slides(model_id="").to_pylist()}
    mid = [m for m in store.latest_slides(model_id=None)["model_id"].to_pylist() if m.startswith("random-")][0]
    rows = store.read(REGIONS, columns=["slide_id", "region_index"], filter=f"model_id = '{mid}'")
    keys = list(zip(rows["slide_id"].to_pylist(), rows["region_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == sum(tiled.values()) > 0  # every region once
    print(f"autoscaling embed: {seconds:.0f} s, {len(keys)} regions, model actors on {sorted(set(nodes))}")


def test_a_gpu_actor_on_a_node_whose_torch_cannot_use_it_fails_naming_the_node(cluster, slides, tmp_path):
    run = _embed(cluster, slides, tmp_path / "gpu")  # use_gpu=auto: the model type declares a GPU
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    found = re.search(r"a GPU was assigned on Ray node (f{40,}\d{5}) but torch cannot use it: (.+)", run.stderr)
    assert found, run.stderr[-3000:]
    assert found[1] != cluster.head_node.node_id  # a node the autoscaler added
    assert found[1] in _model_actor_nodes(cluster)
