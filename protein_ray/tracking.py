"""Optional MLflow tracking of a training run: ``run.tracking_uri`` (empty: off).

One MLflow run per protein-ray run folder. The driver opens it before any worker
starts (a missing mlflow or an unreachable store fails there, not after the data
pass), logs the configuration as ``section.key`` parameters and keeps the MLflow
run id in the run folder (``mlflow_run_id``), so a rerun that resumes the run
folder continues the same MLflow run. Rank 0 logs each epoch's metrics as it
appends them to history.jsonl (step = the epoch, 0-based as in history.jsonl and
the ``epoch_NNN`` folders). At the end the driver logs the plots, config.yaml,
history.jsonl and the best checkpoint (weights and model card) as artifacts.

mlflow is imported inside functions only: ``pip install 'protein-ray[mlflow]'``.
Prefer a database store (``sqlite:///path/mlflow.db``, or an MLflow server's
``http(s)://`` address): MLflow 3 refuses its plain-folder store unless
``MLFLOW_ALLOW_FILE_STORE=true`` is set, and we do not set it behind the user's back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from protein_ray import __version__, storage
from protein_ray.checkpoint import CARD_FILE, HISTORY_FILE, WEIGHTS_FILE
from protein_ray.config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # in the run folder: which MLflow run a resumed run continues
INSTALL_HINT = "pip install 'protein-ray[mlflow]'"
# MLflow accepts letters, digits and "_ - . / : space" in metric names.
_NOT_IN_METRIC_NAME = re.compile(r"[^\w\-./: ]")
_HAS_SCHEME = re.compile(r"^[a-zA-Z][\w+.-]*:")


class TrackingError(ConfigError):
    """Tracking was asked for but cannot work (mlflow missing, store unreachable)."""


@dataclass(frozen=True)
class TrackedRun:
    """Where rank 0 logs: the resolved store address and the MLflow run id."""

    tracking_uri: str
    run_id: str


# ------------------------------------------------------------- the store --


def resolve_uri(uri: str) -> str:
    """Relative local stores made absolute: Ray workers run in another directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = uri[len("file:"):]
    if uri != "databricks" and not _HAS_SCHEME.match(uri):  # a folder, which MLflow reads as a file store
        return Path(uri).absolute().as_uri()
    return uri


@functools.lru_cache(maxsize=4)
def client(tracking_uri: str):
    """One MlflowClient per store and process (a database store checks its schema once)."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError(f"run.tracking_uri is set ({tracking_uri}) but mlflow is not installed: "
                            f"{INSTALL_HINT}") from None
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as error:  # MLflow's own (an unknown scheme, say): say which setting to fix
        raise TrackingError(f"run.tracking_uri {tracking_uri} cannot be used: {error}") from error


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Beside a local database (``<its folder>/mlartifacts/<experiment>``). MLflow's default
    there is ./mlruns in the current directory, which differs between the driver and the
    workers; a server chooses its own, so None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri[len("sqlite:///"):]).parent
    return (folder / "mlartifacts" / re.sub(r"[^\w\-.]", "_", experiment)).as_uri()


def experiment_id(mlflow_client, tracking_uri: str, name: str) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(tracking_uri, name))


# ------------------------------------------------------------ what we log --


def flatten_config(config: TrainingConfig) -> dict[str, str]:
    """``section.key`` -> value as text; the store's address is where they go, not a parameter."""
    flat = {f"{section}.{key}": "" if value is None else str(value)
            for section, values in config.to_dict().items() for key, value in values.items()}
    flat.pop("run.tracking_uri", None)
    return flat


def metric_name(key: str) -> str:
    """``macro_f1@0.5`` -> ``macro_f1_at_0.5``: names MLflow accepts."""
    return _NOT_IN_METRIC_NAME.sub("_", key.replace("@", "_at_"))


def epoch_metrics(record: dict, class_names: Sequence[str]) -> dict[str, float]:
    """The numbers of one history.jsonl record (null mAP left out), per-class F1 as ``f1/<class>``."""
    metrics = {metric_name(key): float(value) for key, value in record.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch"}
    for name, value in zip(class_names, record.get("f1_per_class", [])):
        metrics[metric_name(f"f1/{name}")] = float(value)
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


# --------------------------------------------------------------- driver --


def open_run(config: TrainingConfig, run_uri: str) -> TrackedRun | None:
    """Start the MLflow run, or reopen the one the run folder names; None when tracking is off.
    Raises TrackingError before any worker starts when tracking cannot work."""
    if not config.run.tracking_uri:
        return None
    uri = resolve_uri(config.run.tracking_uri)
    mlflow_client = client(uri)
    try:
        run_id = _reopen(mlflow_client, run_uri) or _create(mlflow_client, uri, config, run_uri)
        _log_params(mlflow_client, run_id, flatten_config(config))
    except TrackingError:
        raise
    except Exception as error:  # MLflow's own errors (bad URI, file store refused, server down)
        raise TrackingError(f"MLflow tracking at {uri} cannot be used: {error}. A local store that works "
                            "offline: run.tracking_uri=sqlite:///path/mlflow.db") from error
    logger.info("tracking run %s in MLflow at %s (experiment %s)", run_id, uri, config.run.experiment)
    return TrackedRun(uri, run_id)


def _reopen(mlflow_client, run_uri: str) -> str | None:
    """The MLflow run of an earlier attempt of this run folder, set running again."""
    id_uri = storage.join(run_uri, RUN_ID_FILE)
    if not storage.exists(id_uri):
        return None
    run_id = storage.read_text(id_uri).strip()
    try:
        mlflow_client.get_run(run_id)
    except Exception:  # not in this store (another tracking_uri): start a new MLflow run
        logger.warning("MLflow run %s (from %s) is not in this store; starting a new one", run_id, id_uri)
        return None
    mlflow_client.update_run(run_id, status="RUNNING")
    return run_id


def _create(mlflow_client, uri: str, config: TrainingConfig, run_uri: str) -> str:
    tags = {"protein_ray.run_folder": run_uri, "protein_ray.version": __version__}
    run = mlflow_client.create_run(experiment_id(mlflow_client, uri, config.run.experiment),
                                   run_name=config.run.name, tags=tags)
    storage.write_text(storage.join(run_uri, RUN_ID_FILE), run.info.run_id)
    return run.info.run_id


def _log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    """New parameters are logged; MLflow forbids changing one, so a resumed run's changed
    settings (more epochs, say) become ``resumed.<key>`` tags with the new value."""
    from mlflow.entities import Param, RunTag

    logged = mlflow_client.get_run(run_id).data.params
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    changed = [RunTag(f"resumed.{key}", value) for key, value in params.items()
               if key in logged and logged[key] != value]
    for start in range(0, len(new), 100):  # log_batch takes at most 100 parameters
        mlflow_client.log_batch(run_id, params=new[start:start + 100])
    if changed:
        mlflow_client.log_batch(run_id, tags=changed)


def log_results(tracked: TrackedRun | None, run_uri: str, best: str, plots: Sequence[str]) -> None:
    """Plots, config.yaml, history.jsonl and the best checkpoint (``best_checkpoint/``: weights
    and model card; the optimizer state stays in the run folder, it only serves resuming).
    A store that fails now costs a warning: the training itself succeeded and its run folder holds all of it."""
    if tracked is None:
        return
    try:
        _log_artifacts(client(tracked.tracking_uri), tracked.run_id, run_uri, best, plots)
    except Exception as error:  # see the docstring
        logger.warning("could not log the results to MLflow at %s: %s", tracked.tracking_uri, error)


def _log_artifacts(mlflow_client, run_id: str, run_uri: str, best: str, plots: Sequence[str]) -> None:
    files = [*plots, storage.join(run_uri, "config.yaml"), storage.join(run_uri, HISTORY_FILE)]
    with tempfile.TemporaryDirectory() as scratch:  # artifacts are logged from local files; runs may be on s3://
        for uri in files:
            mlflow_client.log_artifact(run_id, _local_copy(uri, Path(scratch, "run")))
        checkpoint = Path(scratch, "best_checkpoint")
        for name in (WEIGHTS_FILE, CARD_FILE):
            _local_copy(storage.join(best, name), checkpoint)
        mlflow_client.log_artifacts(run_id, str(checkpoint), artifact_path="best_checkpoint")
    mlflow_client.set_tag(run_id, "best_checkpoint", best)


def _local_copy(uri: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / os.path.basename(uri)
    local.write_bytes(storage.read_bytes(uri))
    return str(local)


@contextlib.contextmanager
def tracked_run(config: TrainingConfig, run_uri: str) -> Iterator[TrackedRun | None]:
    """The MLflow run around a training run: FINISHED when the block ends, FAILED when it raises."""
    tracked = open_run(config, run_uri)
    status = "FAILED"
    try:
        yield tracked
        status = "FINISHED"
    finally:
        if tracked is not None:
            _terminate(tracked, status)


def _terminate(tracked: TrackedRun, status: str) -> None:
    try:
        client(tracked.tracking_uri).set_terminated(tracked.run_id, status=status)
    except Exception as error:  # must not hide the training's own error, if any
        logger.warning("could not mark MLflow run %s %s: %s", tracked.run_id, status, error)


# --------------------------------------------------------------- rank 0 --


def log_epoch(tracked: TrackedRun | None, record: dict, class_names: Sequence[str]) -> None:
    """One epoch's metrics at step = epoch. A store that is briefly down costs a warning,
    not the training run: the same numbers are in history.jsonl."""
    if tracked is None:
        return
    try:
        from mlflow.entities import Metric  # in the try: a worker node without mlflow only warns

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, int(record["epoch"]))
                   for key, value in epoch_metrics(record, class_names).items()]
        for start in range(0, len(metrics), 1000):  # log_batch's limit per call
            client(tracked.tracking_uri).log_batch(tracked.run_id, metrics=metrics[start:start + 1000])
    except Exception as error:  # see the docstring: never stop training for the tracker
        logger.warning("could not log epoch %d to MLflow at %s: %s", record["epoch"], tracked.tracking_uri, error)
