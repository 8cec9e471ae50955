"""The model actors' pool on a cluster that may grow, and an actor whose GPU torch cannot use."""

import pytest
import torch

from hipt_ray.config import ConfigError, EmbedConfig
from hipt_ray.embed.actors import never_started, plan_actors, summarize_autoscaler, waiting_line
from hipt_ray.models.inference import cluster_wants_gpu, inference_device
from hipt_ray.runtime import ClusterShape, NodeType

HEAD = NodeType("head", {"CPU": 2.0, "memory": 8 * 2**30}, 1)
GPU_NODES = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0, "model": 1.0}, 2)  # min_workers 0: none yet
MODEL_NODES = NodeType("model", {"CPU": 1.0, "model": 1.0}, 2)  # fake nodes: no memory declared


def test_auto_uses_gpus_the_autoscaler_can_add():
    plan = plan_actors(EmbedConfig(), ClusterShape((HEAD, GPU_NODES), "test"))
    assert plan.use_gpu and (plan.min_size, plan.max_size) == (1, 2)
    assert plan.demand == {"CPU": 1.0, "GPU": 1, "memory": 2.5 * 2**30}


def test_a_cpu_cluster_keeps_one_actor_unless_actors_have_nodes_of_their_own():
    cpu = ClusterShape((HEAD,), "test")
    plan = plan_actors(EmbedConfig(actor_memory_gb=1), cpu)
    assert not plan.use_gpu and (plan.min_size, plan.max_size) == (1, 1)
    placed = plan_actors(
        EmbedConfig(actor_resources={"model": 1}, actor_memory_gb=0), ClusterShape((HEAD, MODEL_NODES), "t")
    )
    assert not placed.use_gpu and placed.max_size == 2 and placed.memory_bytes is None
    assert plan_actors(EmbedConfig(max_model_actors=5, actor_memory_gb=1), cpu).max_size == 5
    fixed = plan_actors(EmbedConfig(model_actors=3, actor_memory_gb=1), cpu)
    assert (fixed.min_size, fixed.max_size) == (3, 3)


def test_use_gpu_true_without_a_gpu_anywhere_is_a_config_error():
    with pytest.raises(ConfigError, match=r"embed.use_gpu=true .* no GPU and cannot add one \(read from here\)"):
        plan_actors(EmbedConfig(use_gpu=True), ClusterShape((HEAD, MODEL_NODES), "here"))
    assert cluster_wants_gpu(True, gpus=None, key="k", source="s")  # no limit: there can be GPUs
    assert not cluster_wants_gpu("auto", gpus=0, key="k", source="s")
    assert not cluster_wants_gpu(False, gpus=8, key="k", source="s")


def test_an_actor_no_node_can_hold_is_a_config_error_naming_the_node_types():
    with pytest.raises(ConfigError, match=r"model: 1.*head: \{CPU: 2, memory: 8 GiB\}"):
        plan_actors(EmbedConfig(actor_resources={"model": 1}), ClusterShape((HEAD,), "test"))
    with pytest.raises(ConfigError, match=r"memory: 16 GiB"):  # more memory than the node has
        plan_actors(EmbedConfig(actor_memory_gb=16), ClusterShape((HEAD,), "test"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch cannot use a GPU")
def test_a_gpu_actor_whose_torch_cannot_use_the_gpu_fails_naming_the_cause():
    from hipt_ray.embed.embedder import RegionEmbedder, output_schema
    from hipt_ray.models import create_model

    model = create_model("hipt4k_tiny")
    kwargs = dict(
        model_name="hipt4k_tiny",
        state_dict=model.state_dict(),
        micro_batch=8,
        precision="fp32",
        compile=False,
        store_tokens=False,
        schema=output_schema(model.vit4k.embed_dim, model.vit256.embed_dim),
    )
    # "this process" alone; "Ray node <id>" when an earlier test of the run left Ray initialised
    where = r"(this process|Ray node [0-9a-f]+)"
    with pytest.raises(RuntimeError, match=rf"a GPU was assigned on {where} but torch cannot use it: \S"):
        RegionEmbedder(use_gpu=True, **kwargs)
    assert RegionEmbedder(use_gpu="auto", **kwargs).device.type == "cpu"  # auto falls back
    with pytest.raises(RuntimeError, match=r"on Ray node 0a1b but torch cannot use it: (this torch|CUDA)"):
        inference_device(True, where="Ray node 0a1b")


def test_the_message_when_no_model_actor_starts_names_the_demand_the_node_types_and_the_fixes():
    shape = ClusterShape((HEAD, GPU_NODES, MODEL_NODES), "the autoscaling config")
    plan = plan_actors(EmbedConfig(actor_memory_gb=0), shape)  # a GPU actor: only `gpu` nodes hold it
    line = never_started(plan, shape, 901.4, timeout_s=900)
    assert "\n" not in line
    assert line.startswith("no model actor started in 901 s (embed.actor_start_timeout_s=900): a model actor asks ")
    assert "asks for {CPU: 1, GPU: 1} and the node types that could hold one (gpu: {CPU: 8, GPU: 1, model: 1}, " in line
    assert "model: {CPU: 1" not in line and "head:" not in line  # neither can hold a GPU actor
    assert "embed.use_gpu=false" in line and "quota" in line and "resumes" in line
    assert waiting_line(plan, 60.2).startswith("waiting 60 s for 1 model actor ({CPU: 1, GPU: 1} each) to start")


def test_what_the_autoscaler_reports_is_summarized_on_one_line_and_joins_the_messages():
    status = {  # the shape of the JSON the autoscaler writes for `ray status`
        "autoscaler_report": {
            "pending_launches": {"gpu": 2, "cpu": 0},
            "node_availability_summary": {
                "node_availabilities": {
                    "gpu": {
                        "node_type": "gpu",
                        "is_available": False,
                        "last_checked_timestamp": 1.0,
                        "unavailable_node_information": {
                            "category": "InsufficientInstanceCapacity",
                            "description": "We currently do not have\nsufficient p4d capacity",
                        },
                    },
                    "cpu": {"node_type": "cpu", "is_available": True, "last_checked_timestamp": 1.0},
                }
            },
        }
    }
    said = summarize_autoscaler(status)
    assert said == (
        "launching gpu×2; gpu failed to launch: InsufficientInstanceCapacity: We currently do not have sufficient "
        "p4d capacity"
    )
    assert summarize_autoscaler({}) == "" and summarize_autoscaler({"autoscaler_report": {}}) == ""
    shape = ClusterShape((HEAD, GPU_NODES), "the autoscaling config")
    plan = plan_actors(EmbedConfig(actor_memory_gb=0), shape)
    assert f"had room (autoscaler: {said}); check" in never_started(plan, shape, 900, timeout_s=900, autoscaler=said)
    assert waiting_line(plan, 60, said).endswith(f"; autoscaler: {said}")
