"""Joining or starting Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, or a running local one);
    otherwise start a local instance. Idempotent: a running driver is reused."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        logger.info("joined the running local Ray cluster")
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
