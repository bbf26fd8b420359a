"""Joining or starting Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
    it for the job's driver); otherwise start a private local instance. Joining a
    cluster only when asked keeps a laptop run from attaching to some other
    process's Ray. Idempotent: a driver already connected is reused."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # No dashboard: on a small machine its processes, polled every second by Ray Train's
    # placement-group cleaner, cost more CPU than training can spare. (Without it the
    # cleaner logs that the State API is unavailable; for the dashboard, start a
    # cluster with `ray start --head` and pass its address.)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
