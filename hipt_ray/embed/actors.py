"""How many model actors the embedding job runs, with which resources, on a cluster that may
grow: decided from what the cluster can grow to (:func:`hipt_ray.runtime.cluster_shape`), not
from the nodes present when the job starts, so that GPU nodes an autoscaler keeps at zero are
asked for and the actor pool grows as model nodes join (Ray Data's autoscaling actor pool)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from hipt_ray.config import ConfigError, EmbedConfig
from hipt_ray.models.inference import cluster_wants_gpu
from hipt_ray.runtime import ClusterShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPlan:
    """The model actors' pool: GPU or not, its size bounds (``max_size`` ``None``: no limit)
    and one actor's resource request (what Ray and the autoscaler see)."""

    use_gpu: bool
    min_size: int
    max_size: int | None
    demand: dict[str, float]

    @property
    def memory_bytes(self) -> int | None:
        return int(self.demand["memory"]) if "memory" in self.demand else None


def plan_actors(embed: EmbedConfig, shape: ClusterShape) -> ActorPlan:
    """The pool for ``embed`` on a cluster of ``shape``.

    GPU (``embed.use_gpu``, see :func:`cluster_wants_gpu`) when the cluster has or can add GPU
    nodes. ``embed.model_actors`` fixes the pool's size; otherwise it starts at one actor and
    grows up to ``embed.max_model_actors``, by default as many actors as the cluster can hold
    when fully grown where actors have nodes of their own (a GPU each, or ``actor_resources``),
    else one (CPU actors on shared nodes would take the CPUs the region reads need).

    Raises:
        ConfigError: ``use_gpu=true`` with no GPU anywhere, or no node type can ever hold one
            actor (the job would wait for it forever).
    """
    use_gpu = cluster_wants_gpu(embed.use_gpu, gpus=shape.most({"GPU": 1}), key="embed.use_gpu", source=shape.source)
    demand = {"CPU": embed.actor_cpus, **embed.actor_resources}
    if use_gpu:
        demand["GPU"] = 1
    if embed.actor_memory_gb:
        demand["memory"] = embed.actor_memory_gb * 2**30
    most = shape.most(demand)
    if most == 0:
        raise ConfigError(
            f"no node of this cluster can ever hold a model actor asking for {_show(demand)} "
            f"(node types read from {shape.source}: "
            + "; ".join(f"{t.name}: {_show(t.resources)}" for t in shape.node_types)
            + "); lower embed.actor_cpus / embed.actor_memory_gb (0: no memory request), "
            "fix embed.actor_resources, or add such a node type"
        )
    if embed.model_actors:
        return ActorPlan(use_gpu, embed.model_actors, embed.model_actors, demand)
    own_nodes = use_gpu or bool(embed.actor_resources)
    max_size = embed.max_model_actors or (most if own_nodes else 1)
    return ActorPlan(use_gpu, 1, max_size, demand)


def waiting_line(plan: ActorPlan, seconds: float, autoscaler: str = "") -> str:
    """What the job waits for while no model actor has started (logged once a minute), with
    what the autoscaler reports (:func:`autoscaler_report`) where it says anything."""
    n = plan.min_size
    return (
        f"waiting {seconds:.0f} s for {n} model actor{'s' if n > 1 else ''} ({_show(plan.demand)} each) to start, on a "
        "node the autoscaler adds or one with room freed"
        + (f"; autoscaler: {autoscaler}" if autoscaler else " (`ray status` shows the autoscaler's pending nodes)")
    )


def autoscaler_report() -> str:
    """What the cluster's autoscaler last reported about nodes it is launching or could not
    launch ("" where it reports nothing: no autoscaler, or one that keeps its state elsewhere).
    One read of the status the autoscaler writes to the GCS for `ray status`: cheap enough to
    ask once a minute. Ray is imported here: the pool's plan is computed and tested without it."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return summarize_autoscaler(json.loads(raw)) if raw else ""
    except Exception as exc:  # a report that helps, never a reason to fail the job
        log.debug("no autoscaler report: %s", exc)
        return ""


def summarize_autoscaler(status: dict) -> str:
    """The pending launches and the node types that failed to launch (with the cloud's words)
    from the autoscaler's status (the JSON behind `ray status`)."""
    report = status.get("autoscaler_report") or {}
    parts = [f"launching {t}×{n}" for t, n in sorted((report.get("pending_launches") or {}).items()) if n]
    records = ((report.get("node_availability_summary") or {}).get("node_availabilities") or {}).values()
    for r in sorted(records, key=lambda r: r.get("node_type", "")):
        info = r.get("unavailable_node_information") or {}
        if not r.get("is_available", True):
            said = " ".join(str(info.get("description", "")).split())[:200]  # one line, however the cloud put it
            parts.append(f"{r.get('node_type')} failed to launch: {info.get('category')}: {said}")
    return "; ".join(parts)


def never_started(
    plan: ActorPlan, shape: ClusterShape, seconds: float, *, timeout_s: float, autoscaler: str = ""
) -> str:
    """The one-line reason a job ends when no model actor started within ``timeout_s``: the
    actor's demand, the node types that could hold it, what the autoscaler said and the fixes."""
    fits = [t for t in shape.node_types if ClusterShape((t,), shape.source).most(plan.demand) != 0]
    types = "; ".join(f"{t.name}: {_show(t.resources)}" for t in fits)
    return (
        f"no model actor started in {seconds:.0f} s (embed.actor_start_timeout_s={timeout_s:g}): a model actor "
        f"asks for {_show(plan.demand)} and the node types that could hold one ({types}, read from "
        f"{shape.source}) gave it none: no such node was added or had room"
        + (f" (autoscaler: {autoscaler})" if autoscaler else "")
        + "; "
        "check the cloud's capacity and quota for them (`ray status` "
        "shows the autoscaler's pending and failed nodes), ask for less (embed.actor_cpus, "
        "embed.actor_memory_gb, embed.actor_resources) or run the model on CPUs (embed.use_gpu=false); "
        "the tiling is committed and a rerun with the same --out resumes"
    )


def _show(resources: dict[str, float]) -> str:
    return (
        "{"
        + ", ".join(
            f"{k}: {v / 2**30:.3g} GiB" if k == "memory" else f"{k}: {v:g}" for k, v in sorted(resources.items())
        )
        + "}"
    )
