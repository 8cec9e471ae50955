"""Which Ray a command runs on: the cluster it is pointed at, or a local Ray of its own.

``ray.init()`` with no address joins whatever cluster Ray's ``ray_current_cluster`` file names:
the last ``ray start`` on the machine, alive or dead. A dead one makes every command retry the
GCS for minutes; a live one silently runs the command on somebody else's cluster. So with no
``ray.address`` and no ``RAY_ADDRESS`` we always start a fresh local instance
(``address="local"``), which ignores that file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

from hipt_ray.console import verbose


def ray_address(configured: str | None = None) -> str | None:
    """The cluster to join: ``configured`` (``--address`` / ``ray.address``), else
    ``RAY_ADDRESS``, else ``None`` (a local Ray of our own)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def worker_env_vars() -> dict[str, str]:
    """The settings this process hands to Ray workers through their environment (storage retries,
    anonymous buckets, bucket endpoints: :mod:`hipt_ray.storage`). A local Ray's workers inherit
    this process's environment; a cluster's are started by their own nodes' raylets, so a driver
    joining one passes these in its runtime environment. Inside a ``ray job submit`` job, a
    variable the job's own runtime environment sets is left to it (Ray refuses conflicting
    values)."""
    from hipt_ray.storage import WORKER_ENV

    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if injected:
        job = (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job}
    return env


def start_ray(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    logging_level: int = logging.WARNING,
    dashboard: bool = False,
) -> None:
    """Join ``address`` or start a private local Ray (never the machine's "current" cluster).

    ``dashboard``: start the local Ray's dashboard too. Ray Train needs it: its placement-group
    cleaner asks the State API, which the dashboard serves, whether the controller is alive, and
    without one logs "Failed to query Ray Train Controller actor state" every few seconds.
    Workers' output reaches this console only with ``--verbose`` (it is always in the session's
    log folder). Does nothing when Ray is already initialised in this process (a test's session
    instance, or a driver that called ``ray.init`` itself).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        env = worker_env_vars()
        ray.init(
            address=address,
            logging_level=logging_level,
            log_to_driver=verbose(),
            runtime_env={"env_vars": env} if env else None,
        )
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        logging_level=logging_level,
        log_to_driver=verbose(),
    )


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or its autoscaler can add: the Ray resources one such node
    offers and how many of them there can be (``None``: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int | None


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster can grow to (``node_types``) and where that was read (``source``)."""

    node_types: tuple[NodeType, ...]
    source: str

    def most(self, demand: dict[str, float]) -> int | None:
        """How many bundles of ``demand`` (an actor's or a worker's resources) the cluster can
        hold at once when fully grown: 0 when no node type can hold one, ``None`` without limit.
        A resource a node type does not list is one it lacks, except ``memory``, which the
        autoscaler infers from the instance type where the config leaves it out."""
        total = 0
        for node in self.node_types:
            per_node = min(
                (
                    int(node.resources.get(k, 0) // v)
                    for k, v in demand.items()
                    if v > 0 and (k != "memory" or k in node.resources)
                ),
                default=0,
            )
            if per_node and node.max_count is None:
                return None
            total += per_node * (node.max_count or 0)
        return total


def other_nodes(address: str | None) -> str | None:
    """Whether work can run on nodes besides this driver's: ``None`` joined to no cluster (a local
    Ray, ``address`` ``None``) or to one node that cannot grow; else the cluster's size in words,
    e.g. "the nodes present (no autoscaler seen) can hold 2 nodes"."""
    if address is None:
        return None
    shape = cluster_shape()
    nodes = sum(math.inf if t.max_count is None else t.max_count for t in shape.node_types)
    if nodes <= 1:
        return None
    return f"{shape.source} can hold {'any number of' if math.isinf(nodes) else int(nodes)} nodes"


def check_local_output(cfg) -> None:
    """Refuse a local ``--out`` on a cluster that has or can add nodes besides this one, unless
    ``storage.shared_output`` says every node mounts it: the workers write fragments, QC images
    and checkpoints there, each to its own node's disk, and the driver would commit a table whose
    files it cannot see. Joined to no cluster (a local Ray), nothing is checked.

    Raises:
        InputError: with the two fixes."""
    from hipt_ray.config import InputError
    from hipt_ray.storage import is_remote

    if not cfg.out or is_remote(cfg.out) or cfg.storage.shared_output:
        return
    if (size := other_nodes(ray_address(cfg.ray.address))) is not None:
        raise InputError(
            f"output {cfg.out}: a local folder, on a cluster whose workers run on other nodes ({size}) and would "
            "write into it on their own disks; use an s3:// --out, or set storage.shared_output=true if every node "
            "mounts this folder (NFS, EFS)"
        )


def shape_from_autoscaling_config(config: dict, *, source: str) -> ClusterShape:
    """The node types of a cluster launcher / autoscaler config (``available_node_types``):
    each worker type up to its ``max_workers`` (and the cluster's ``max_workers``), the head
    type once."""
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        most = 1 if name == head else spec.get("max_workers", cap)
        if name != head and cap is not None and most is not None:
            most = min(most, cap)
        types.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, most))
    return ClusterShape(tuple(types), source)


def shape_from_cluster_config(config, *, source: str) -> ClusterShape:
    """The node groups an autoscaler reported to the GCS (``autoscaler_pb2.ClusterConfig``:
    ``node_group_configs`` with ``resources`` and ``max_count``, -1 for no limit)."""
    return ClusterShape(
        tuple(
            NodeType(g.name, dict(g.resources), None if g.max_count == -1 else int(g.max_count))
            for g in config.node_group_configs
        ),
        source,
    )


def shape_from_nodes(nodes: list[dict], *, source: str) -> ClusterShape:
    """The nodes present (``ray.nodes()``), each a type of its own that cannot grow."""
    return ClusterShape(tuple(NodeType(n["NodeID"], dict(n["Resources"]), 1) for n in nodes if n.get("Alive")), source)


def _autoscaling_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of this cluster's autoscaler (Ray's monitor process), when it
    runs on this machine: the head node, where ``ray job submit`` runs the driver. Found the way
    Ray finds local GCS addresses, from the processes' command lines."""
    from ray._private import services  # with the psutil Ray vendors

    for proc in services.psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if not any(a.endswith("monitor.py") for a in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                return os.path.expanduser(a.split("=", 1)[1])
    return None


def cluster_shape() -> ClusterShape:
    """What the connected cluster can grow to. In order: the node groups an autoscaler reported
    to the GCS (the key Ray Data and Ray Train read; Ray 2.60's own autoscaler does not write
    it, managed platforms do); the config this cluster's autoscaler was started with (``ray up``
    clusters and Ray's test ``AutoscalingCluster``; read on the head node); else the nodes
    present (a fixed cluster, or a local Ray)."""
    import ray
    import ray._private.state
    import yaml

    reported = ray._private.state.state.get_cluster_config()
    if reported is not None and reported.node_group_configs:
        return shape_from_cluster_config(reported, source="the autoscaler's node groups (GCS)")
    gcs = ray.get_runtime_context().gcs_address
    path = _autoscaling_config_path(gcs) if gcs else None
    if path and os.path.exists(path):
        with open(path) as fh:
            return shape_from_autoscaling_config(yaml.safe_load(fh), source=f"the autoscaling config {path}")
    return shape_from_nodes(ray.nodes(), source="the nodes present (no autoscaler seen)")
