"""Joining or starting Ray, and the console, the same way from every entry point.

Quiet by default: our progress lines (epochs, parts written, summaries) and
warnings that matter. ``--verbose`` or ``PROTEIN_RAY_VERBOSE=1`` brings back Ray's
own logs and progress bars. Most of Ray's chatter comes from worker processes and
reaches the driver as forwarded text, so it is quieted inside the workers (a
``worker_process_setup_hook`` and environment variables), not by driver log levels.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os

logger = logging.getLogger(__name__)

VERBOSE_ENV = "PROTEIN_RAY_VERBOSE"
# Ray Train's placement-group cleaner asks the State API every second whether the
# controller lives; without a dashboard that API is absent and each check warns.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_NOISE = "Failed to query Ray Train Controller actor state"


@contextlib.contextmanager
def long_lived_setup():
    """For set-up whose objects live as long as the process (imports of torch and timm,
    a model): the cyclic garbage collector is paused while they are made, then they are
    frozen out of its sight, so that it neither walks them again and again during the
    import nor once more as the process exits. Measured on 2 cores on 2026-12-05:
    importing timm and ray.data took 4.6-5.3 s of CPU, 3.6-4.7 s with the collector
    paused; a process with timm imported spent 1.0 s of CPU exiting, 0.2 s with it frozen
    (a scoring job's actors exit while its driver writes the outputs). Cycles left by
    the set-up are kept (11,000 objects after importing timm and ray.data): finding
    them would take a full collection, 0.35 s."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


# glibc's malloc hands a large block (above a threshold that adapts up to 32 MiB) back to
# the OS when it is freed, and maps a new one, zeroed page by page, when it is next asked
# for. A CNN's activations are such blocks (resnet18's first layer: 67 MiB at batch 16,
# 256 px), so every forward pass on CPU faulted them all in again.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
KEEP_FREED_BYTES = 256 * 2**20
# What keeping freed memory costs: the heap holds blocks that used to be unmapped. A CPU
# scoring actor's resident memory, sampled during a 3,072-image job on 2026-12-05: 1.2 GB
# with glibc's defaults, 1.8 -> 2.0 GB with them kept, flat from the second minute.
HEAP_GROWTH_BYTES = 2**30


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc's malloc serve blocks of up to 256 MiB from its heap and keep up to
    256 MiB that is freed, for the next batch. Measured on 2 cores on 2026-12-05 (decode
    and resnet18 at 256 px, batch 16, one thread): 89-98 -> 75-77 ms of CPU per image,
    page faults 1.3-1.6 M -> 0.3 M; the process grows by up to ``HEAP_GROWTH_BYTES``.
    Called once by each CPU scoring actor; returns False (and does nothing) where the C
    library is not glibc. Measured on 2026-12-06 and left out elsewhere: a Serve replica
    runs its batches in a worker thread, whose malloc arena grows in heaps of at most
    64 MiB, so a larger block is mapped afresh however the thresholds are set (batches
    of 16 at 256 px: 0.86 -> 0.67 M page faults, 94-111 against 92-105 ms per image;
    batches of 1 fit below glibc's own threshold: 8.6 k faults either way); CPU training
    at the defaults (resnet18, 128 px, batch 32, 2 threads) faulted 1.0 M -> 0 pages but
    ran no faster (28.5 img/s mean either way, three interleaved pairs)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (AttributeError, OSError, TypeError):  # not glibc (musl's does nothing, and says so); Windows has no CDLL(None)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def is_verbose(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure_logging(verbose: bool = False) -> bool:
    """Our INFO lines on the console; Ray's internals only when verbose. Returns
    whether verbose is on (and exports it, so Ray workers see the same)."""
    verbose = is_verbose(verbose)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per HTTP request otherwise
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return verbose


class _DropCleanerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CLEANER_NOISE not in record.getMessage()


def setup_worker_logging() -> None:
    """Runs in every worker process of a local instance (Ray's worker_process_setup_hook)."""
    import ray

    logging.getLogger(CLEANER_LOGGER).addFilter(_DropCleanerNoise())
    # State API clients in workers must query this instance, not guess among several.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if not is_verbose():
        # Ray Train logs every report with all its metrics at INFO; they are in history.jsonl.
        import ray.train.v2._internal.execution.context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def quiet_data_context(verbose: bool) -> None:
    """Ray Data's progress bars and "Starting execution" lines only when verbose."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:  # Ray Data sets its logger's level when imported: set it after
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool | None = None) -> None:
    """Join the cluster at ``address`` or ``RAY_ADDRESS`` (``ray job submit`` sets
    it for the job's driver); otherwise start a private local instance. Joining a
    cluster only when asked keeps a laptop run from attaching to some other
    process's Ray. Idempotent: a driver already connected is reused."""
    import ray

    verbose = is_verbose(bool(verbose))
    quiet_data_context(verbose)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    env_vars = {VERBOSE_ENV: "1"} if verbose else {"RAY_DATA_LOG_LEVEL": "ERROR"}
    # A private instance is never preempted; Train's watcher would only log an error line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # No dashboard: on a small machine its processes cost more CPU than training can
    # spare. (For the dashboard, start a cluster with `ray start --head` and pass its address.)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             logging_level=logging.INFO if verbose else logging.WARNING,
             runtime_env={"worker_process_setup_hook": setup_worker_logging, "env_vars": env_vars})
    logger.info("started a local Ray instance with %s CPUs", ray.cluster_resources().get("CPU"))
