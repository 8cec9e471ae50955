"""A node provider for the autoscaling tests: Ray's fake provider, except that a node whose
raylet has died stops being listed, as a cloud API stops listing a spot instance it took back,
and that a node type whose ``node_config`` says ``unavailable: true`` is never launched, as a
cloud without capacity or quota for an instance type refuses every launch.

Ray's own fake provider keeps listing such a node until the autoscaler terminates it, and its
autoscaler never does (the node shows as "pending, uninitialized" for good): a lost node would
never be replaced and a job waiting for one would wait forever. The autoscaler imports this class
(``provider: {type: external, module: tests.integration.spot_provider.SpotProvider}``), so the
repository root must be on the head's ``PYTHONPATH``.
"""

from __future__ import annotations

from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE


class SpotProvider(FakeMultiNodeProvider):
    """Lists only the nodes whose raylet still runs; what is left of the others (log monitor,
    agents) is ended when the node drops out of the list."""

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")  # the head has none: it is not this provider's to start
                if node is not None and not _raylet_runs(node):
                    self._nodes.pop(node_id)
                    node.kill_all_processes(check_alive=False, allow_graceful=False)
            return super().non_terminated_nodes(tag_filters)

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        if node_config.get("unavailable"):  # as the AWS provider raises it; the autoscaler retries
            node_type = tags.get(TAG_RAY_USER_NODE_TYPE)
            raise NodeLaunchException("InsufficientInstanceCapacity", f"no capacity for {node_type}", None)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


def _raylet_runs(node) -> bool:
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
    return any(info.process.poll() is None for info in raylets)
