"""What the cluster can grow to, read from an autoscaler's config, the GCS's node groups or the
nodes present (no Ray: fake descriptions of each)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hipt_ray.config import EmbedConfig
from hipt_ray.embed.actors import plan_actors
from hipt_ray.runtime import (
    ClusterShape,
    NodeType,
    shape_from_autoscaling_config,
    shape_from_cluster_config,
    shape_from_nodes,
)

GiB = 2**30


def test_the_shipped_cluster_yaml_needs_no_settings_for_16_gpu_model_actors():
    cfg = yaml.safe_load((Path(__file__).parents[2] / "cluster.yaml").read_text())
    shape = shape_from_autoscaling_config(cfg, source="cluster.yaml")
    assert {t.name: t.max_count for t in shape.node_types} == {"head": 1, "cpu": 8, "gpu": 16}
    assert shape.most({"GPU": 1}) == 16 and shape.most({"CPU": 1}) == 8 * 16 + 16 * 16  # reads: any CPU
    # the defaults on it: GPU actors, a pool that grows to one a GPU node, no custom resources
    plan = plan_actors(EmbedConfig(), shape)
    assert plan.use_gpu and (plan.min_size, plan.max_size) == (1, 16)
    assert {k: v for k, v in plan.demand.items() if k != "memory"} == {"CPU": 1.0, "GPU": 1}


def test_worker_types_are_capped_by_the_clusters_max_workers():
    cfg = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 8, "GPU": 4}, "min_workers": 0, "max_workers": 10},
        },
    }
    shape = shape_from_autoscaling_config(cfg, source="test")
    assert shape.most({"GPU": 1}) == 12  # 3 nodes × 4 GPUs
    assert shape.most({"CPU": 3, "GPU": 1}) == 6  # CPUs bound it: 2 a node on the GPU type
    assert shape.most({"CPU": 2}) == 1 + 3 * 4  # the head holds one too


def test_memory_counts_only_where_a_node_type_declares_it():
    shape = ClusterShape(
        (NodeType("fake", {"CPU": 1, "model": 1}, 2), NodeType("real", {"CPU": 4, "memory": 2 * GiB}, 1)),
        source="test",
    )
    assert shape.most({"CPU": 1, "model": 1, "memory": 2.5 * GiB}) == 2  # fake: memory unknown
    assert shape.most({"CPU": 1, "memory": 2.5 * GiB}) == 2  # real: 2 GiB cannot hold 2.5 GiB
    assert shape.most({"CPU": 1, "memory": 1 * GiB}) == 4


def test_reported_node_groups_and_nodes_present():
    groups = SimpleNamespace(
        node_group_configs=[
            SimpleNamespace(name="gpu", resources={"CPU": 8.0, "GPU": 1.0}, max_count=-1),
            SimpleNamespace(name="cpu", resources={"CPU": 16.0}, max_count=4),
        ]
    )
    shape = shape_from_cluster_config(groups, source="gcs")
    assert shape.most({"GPU": 1}) is None  # no limit
    assert shape.most({"CPU": 16}) == 4
    nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 2.0}},
        {"NodeID": "b", "Alive": False, "Resources": {"CPU": 2.0, "GPU": 2.0}},
    ]
    assert shape_from_nodes(nodes, source="present").most({"GPU": 1}) == 2  # the dead node is not counted


def test_worker_settings_travel_in_the_runtime_env_unless_the_job_sets_them(monkeypatch):
    import json

    from hipt_ray import storage
    from hipt_ray.runtime import worker_env_vars

    for k in storage.WORKER_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert worker_env_vars() == {}  # nothing set: the workers' defaults are the code's
    storage.set_bucket_endpoints({"far": "aws"})
    storage.set_retry_budget(7, 3.0)
    assert worker_env_vars() == {
        storage.BUCKET_ENDPOINTS_ENV: '{"far": "aws"}',
        storage.RETRIES_ENV: "7",
        storage.RETRY_SECONDS_ENV: "3.0",
    }
    job = {"runtime_env": {"working_dir": ".", "env_vars": {storage.RETRIES_ENV: "2"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))  # a `ray job submit` driver
    assert storage.RETRIES_ENV not in worker_env_vars() and storage.BUCKET_ENDPOINTS_ENV in worker_env_vars()


def test_the_default_mlflow_store_is_refused_only_where_workers_cannot_reach_it(monkeypatch, tmp_path):
    import hipt_ray.runtime as runtime
    from hipt_ray.config import InputError, load_config
    from hipt_ray.runtime import ClusterShape, NodeType
    from hipt_ray.tracking import check_store_reaches_workers

    def shape(*counts):
        return ClusterShape(tuple(NodeType(f"t{i}", {"CPU": 4.0}, c) for i, c in enumerate(counts)), "a test")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = str(tmp_path / "o")
    local = load_config(values={"out": out})
    joined = load_config(values={"out": out, "ray": {"address": "10.0.0.1:6379"}})
    named = load_config(
        values={"out": out, "ray": {"address": "10.0.0.1:6379"}}, overrides=["tracking.mlflow_uri=http://m:5000"]
    )
    monkeypatch.setattr(runtime, "cluster_shape", lambda: shape(1, None))  # a head, GPU workers 0–∞
    check_store_reaches_workers(local, "sweep")  # a local Ray: its workers share this disk
    check_store_reaches_workers(named, "sweep")  # the user's store: trusted
    with pytest.raises(InputError, match=r"sweep on a cluster .* any number of nodes.*tracking.mlflow_uri=http://"):
        check_store_reaches_workers(joined, "sweep")
    monkeypatch.setattr(runtime, "cluster_shape", lambda: shape(1, 2))
    with pytest.raises(InputError, match="can hold 3 nodes"):
        check_store_reaches_workers(joined, "pretrain")
    monkeypatch.setattr(runtime, "cluster_shape", lambda: shape(1))  # one node, which cannot grow
    check_store_reaches_workers(joined, "sweep")


def test_a_tracking_server_named_localhost_is_named_by_this_nodes_ip_for_workers(monkeypatch):
    import ray

    from hipt_ray.tracking import for_workers

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.3.7")
    assert for_workers("http://localhost:5000") == "http://10.0.3.7:5000"
    assert for_workers("https://me:pw@127.0.0.1:5000/mlflow") == "https://me:pw@10.0.3.7:5000/mlflow"
    for kept in ("http://mlflow.internal:5000", "sqlite:////shared/mlflow.db", "databricks"):
        assert for_workers(kept) == kept


def test_a_local_output_is_refused_on_a_cluster_unless_every_node_mounts_it(monkeypatch, tmp_path):
    import hipt_ray.runtime as runtime
    from hipt_ray.config import InputError, load_config
    from hipt_ray.runtime import ClusterShape, NodeType, check_local_output
    from hipt_ray.tracking import check_store_reaches_workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = {"ray": {"address": "10.0.0.1:6379"}}

    def cfg(out: str, *overrides: str, **values):
        return load_config(values={"out": out, **values}, overrides=list(overrides))

    local = str(tmp_path / "o")
    monkeypatch.setattr(
        runtime, "cluster_shape", lambda: ClusterShape((NodeType("head", {}, 1), NodeType("gpu", {}, 16)), "a test")
    )
    with pytest.raises(InputError, match=r"output .*/o: a local folder.*can hold 17 nodes.*storage.shared_output=true"):
        check_local_output(cfg(local, **cluster))
    shared = cfg(local, "storage.shared_output=true", **cluster)
    check_local_output(shared)  # every node mounts it: the user's word
    check_store_reaches_workers(shared, "pretrain")  # and so does the default MLflow store under it
    check_local_output(cfg("s3://b/o", **cluster))  # an object store every node reaches
    check_local_output(cfg(local))  # a local Ray
    monkeypatch.setattr(runtime, "cluster_shape", lambda: ClusterShape((NodeType("head", {}, 1),), "a test"))
    check_local_output(cfg(local, **cluster))  # one node that cannot grow
