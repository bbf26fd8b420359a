"""Joining or starting Ray, and the console, the same way from every entry point."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

VERBOSE_ENV = "PROTEIN_RAY_VERBOSE"
# Ray's own loggers that print routine internals at INFO or WARNING on a healthy run.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "filelock")


def configure_logging(verbose: bool = False) -> bool:
    """Our INFO lines on the console, Ray's internals only when ``verbose`` (or
    ``$PROTEIN_RAY_VERBOSE``) asks for them. Returns whether verbose is on."""
    verbose = verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    return verbose


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool | None = None) -> None:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
    it for the job's driver); otherwise start a private local instance. Joining a
    cluster only when asked keeps a laptop run from attaching to some other
    process's Ray. Idempotent: a driver already connected is reused."""
    import ray

    if ray.is_initialized():
        return
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
        return
    # No dashboard: on a small machine its processes, polled every second by Ray Train's
    # placement-group cleaner, cost more CPU than training can spare. (For the
    # dashboard, start a cluster with `ray start --head` and pass its address.)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, **quiet)
    logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
