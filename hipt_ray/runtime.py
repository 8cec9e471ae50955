"""Which Ray a command runs on: the cluster it is pointed at, or a local Ray of its own.

``ray.init()`` with no address joins whatever cluster Ray's ``ray_current_cluster`` file names:
the last ``ray start`` on the machine, alive or dead. A dead one makes every command retry the
GCS for minutes; a live one silently runs the command on somebody else's cluster. So with no
``ray.address`` and no ``RAY_ADDRESS`` we always start a fresh local instance
(``address="local"``), which ignores that file.
"""

from __future__ import annotations

import logging
import os

from hipt_ray.console import verbose


def ray_address(configured: str | None = None) -> str | None:
    """The cluster to join: ``configured`` (``--address`` / ``ray.address``), else
    ``RAY_ADDRESS``, else ``None`` (a local Ray of our own)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


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
        ray.init(address=address, logging_level=logging_level, log_to_driver=verbose())
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        logging_level=logging_level,
        log_to_driver=verbose(),
    )
