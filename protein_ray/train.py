"""Distributed training with Ray Train (DDP) fed by Ray Data.

Driver side (``run_training``): prepare the data (``protein_ray.train_data``) and
start a ``TorchTrainer``. Worker side (``train_loop_per_worker``): one screen of
training loop, validation on rank 0, and a checkpoint per epoch through
``ray.train.report``. Workers receive one typed ``TrainJob``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from protein_ray import storage, tracking
from protein_ray.checkpoint import (
    BEST_METRIC,
    HISTORY_FILE,
    ModelCard,
    best_checkpoint_in,
    epoch_checkpoints_in,
    epoch_dir_name,
    load_training_state,
    load_weights,
    read_model_card,
    save_checkpoint,
)
from protein_ray.config import TrainingConfig
from protein_ray.imaging import Preprocessing, normalize_batch
from protein_ray.metrics import evaluate
from protein_ray.model import autocast_context, create_model, unwrap
from protein_ray.optimization import build_optimizer, restore_optimizer, train_one_epoch
from protein_ray.runtime import is_verbose
from protein_ray.spec import load_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs, typed: the run's configuration, the
    preprocessing every checkpoint will carry, and facts the driver found."""

    config: TrainingConfig
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    train_count: int
    run_uri: str
    tracked: tracking.TrackedRun | None = None  # where rank 0 logs epoch metrics (MLflow), if anywhere


# ------------------------------------------------------------ worker side --


class BatchCollator(NumpyBatchCollateFn):
    """Worker side of the input pipeline, as batches are collated: fresh random
    augmentation (training split only) and the model's normalization of the decoded
    0..1 images. Both cost well under 1% of decoding, and doing them here lets the
    decoded images stay cached with no per-epoch Ray Data tasks."""

    def __init__(self, preprocessing: Preprocessing, augment: bool):
        self.preprocessing, self.augment = preprocessing, augment

    def __call__(self, batch: dict) -> dict:
        rng = np.random.default_rng() if self.augment else None
        return {
            "image": torch.from_numpy(normalize_batch(batch["image"], self.preprocessing, augment_rng=rng)),
            # Copies: Ray Data's batches are read-only views, which torch warns about.
            "target": torch.tensor(batch["target"], dtype=torch.float32),
            "ok": torch.tensor(batch["ok"], dtype=torch.float32),
        }


@torch.no_grad()
def predict_batches(model, batches, device, autocast) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, targets = [], []
    for batch in batches:
        keep = batch["ok"].bool()
        with autocast:
            logits = model(batch["image"][keep].to(device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(batch["target"][keep].numpy())
    return np.concatenate(probs), np.concatenate(targets)


def training_batches(shard, job: TrainJob, epoch: int, rank: int):
    """One epoch of augmented training batches from this worker's shard, drawn at random
    from a buffer of ``data.shuffle_buffer`` images with a seed of its own per run seed,
    epoch and rank. Without it every epoch repeats the input's order: for a plate folder,
    well after well, so a batch holds the fields of a few wells and so does the next."""
    optim, buffer = job.config.optim, job.config.data.shuffle_buffer
    seed = int(np.random.SeedSequence([optim.seed, epoch, rank]).generate_state(1)[0])
    return shard.iter_torch_batches(batch_size=optim.batch_size, collate_fn=BatchCollator(job.preprocessing, augment=True),
                                    local_shuffle_buffer_size=max(buffer, optim.batch_size) if buffer else None,
                                    local_shuffle_seed=seed if buffer else None)


def gather_sum(values: list[float]) -> list[float]:
    """Sum small per-worker counters across the process group (gloo or NCCL)."""
    if not torch.distributed.is_initialized():
        return values
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return [float(sum(column)) for column in zip(*gathered)]


def restore_state(model, optimizer, scheduler, steps_per_epoch: int) -> int:
    """Resume from Ray Train's latest checkpoint (worker restart or a rerun of the
    same run name); returns the first epoch still to train."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
        load_weights(unwrap(model), directory)
    if state is None:
        return 0
    start_epoch = int(state["epoch"]) + 1
    restore_optimizer(optimizer, scheduler, state["optimizer"], start_epoch * steps_per_epoch)
    return start_epoch


def report_epoch(epoch: int, model, optimizer, job: TrainJob, metrics: dict | None) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if metrics is None:
        ray.train.report({"epoch": epoch})
        return
    config = job.config
    card = ModelCard(
        backbone=config.model.name,
        preprocessing=job.preprocessing,
        class_names=list(job.class_names),
        thresholds=metrics["thresholds"],
        never_empty=config.optim.never_empty,
        metrics={k: v for k, v in metrics.items() if k != "thresholds"},
        epoch=epoch,
        run_name=config.run.name,
    )
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch}
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, model, card, training_state=state)
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics | {"epoch": epoch}, checkpoint=checkpoint, checkpoint_dir_name=epoch_dir_name(epoch))


def append_history(run_uri: str, record: dict) -> None:
    """Add an epoch's record. An epoch run again after a failure (its checkpoint was not
    committed) replaces what the lost attempt logged, so each epoch appears once."""
    uri = storage.join(run_uri, HISTORY_FILE)
    lines = storage.read_text(uri).splitlines() if storage.exists(uri) else []
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < record["epoch"]]
    storage.write_text(uri, "".join(f"{line}\n" for line in [*kept, json.dumps(record)]))


def epoch_line(epoch: int, epochs: int, record: dict, eta_s: float) -> str:
    """The one console line per epoch; every figure is in history.jsonl."""
    bad, skipped = int(record["bad_images"]), int(record.get("skipped_steps", 0))
    return (
        f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  macro F1 {record['macro_f1']:.3f}  "
        f"mAP {record['mAP'] or 0:.3f}  {record['train_images_per_s']:.1f} img/s  "
        f"ETA {format_duration(eta_s)}" + (f"  ({bad} undecodable images skipped)" if bad else "")
        + (f"  ({skipped} steps with NaN/inf gradients skipped)" if skipped else "")
    )


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def train_loop_per_worker(job: TrainJob) -> None:
    import ray.train
    import ray.train.torch

    config, optim = job.config, job.config.optim
    torch.manual_seed(optim.seed)
    torch.set_num_threads(max(1, config.run.cpus_per_worker))
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()

    model = create_model(config.model.name, config.model.pretrained_path, config.model.drop_rate,
                         num_classes=len(job.class_names), in_chans=job.preprocessing.channels)
    if optim.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    steps_per_epoch = math.ceil(job.train_count / world / optim.batch_size)
    optimizer, scheduler = build_optimizer(model, optim, steps_per_epoch)
    start_epoch = restore_state(model, optimizer, scheduler, steps_per_epoch)
    if start_epoch and rank == 0:
        print(f"resuming from the checkpoint of epoch {start_epoch}: continuing at epoch {start_epoch + 1}")
    autocast, scaler = autocast_context(device, optim.amp)

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    started = time.perf_counter()
    for epoch in range(start_epoch, optim.epochs):
        batches = training_batches(train_shard, job, epoch, rank)
        stats = train_one_epoch(model, batches, optimizer, scheduler, optim, device, autocast, scaler)
        loss_sum, seen, bad, seconds, skipped = gather_sum(
            [stats["loss_sum"], stats["seen"], stats["bad"], stats["seconds"], stats["skipped_steps"]])
        metrics = None
        if rank == 0:  # validation on rank 0 over the whole (unsplit) validation set
            val_batches = val_data.iter_torch_batches(batch_size=optim.batch_size,
                                                      collate_fn=BatchCollator(job.preprocessing, augment=False))
            probs, targets = predict_batches(unwrap(model), val_batches, device, autocast)
            metrics = evaluate(probs, targets, never_empty=optim.never_empty, batch_size=optim.batch_size)
            metrics |= {
                "train_loss": loss_sum / max(seen, 1),
                "train_images_per_s": (seen + bad) / max(seconds / world, 1e-9),
                "bad_images": bad,
                "skipped_steps": skipped / world,  # every worker skips the same steps
                "val_images": len(targets),
                "epoch": epoch,
            }
            epochs_done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - started) / epochs_done * (optim.epochs - epoch - 1)
            print(epoch_line(epoch, optim.epochs, metrics, eta), flush=True)
            append_history(job.run_uri, metrics)
            tracking.log_epoch(job.tracked, metrics, job.class_names)
        report_epoch(epoch, model, optimizer, job, metrics)


# ------------------------------------------------------------- driver side --


def build_trainer(job: TrainJob, datasets: dict):
    from functools import partial

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    config = job.config
    filesystem, storage_path = storage.resolve(config.run.storage_path)
    return TorchTrainer(
        partial(train_loop_per_worker, job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker} | ({"GPU": 1} if config.run.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            # Train's own INFO lines (resources requested, worker group started) only when verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints,
                checkpoint_score_attribute=BEST_METRIC,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        # Validation runs on rank 0 over the whole set, so only "train" is split.
        # Execution options given explicitly: Train's default copies a deprecated field.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ray.data.DataContext.get_current().execution_options),
    )


class ResumeMismatch(ValueError):
    """A rerun of a run name whose checkpoints cannot continue under this configuration."""


def check_resumable(run_uri: str, config: TrainingConfig) -> None:
    """Rerunning a run name resumes its latest checkpoint, which must be the same model:
    another backbone fails a strict weight load in every worker restart, and another
    image size, class set or stain set would continue silently on a different task."""
    checkpoints = epoch_checkpoints_in(run_uri)
    if not checkpoints:
        return
    latest = max(checkpoints.values(), key=lambda card: card.epoch)
    spec = load_spec(config.data.spec)
    wanted = {"backbone": config.model.name, "image size": config.data.image_size,
              "classes": list(spec.classes), "stains": list(spec.stain_names)}
    found = {"backbone": latest.backbone, "image size": latest.image_size, "classes": latest.class_names,
             "stains": list(latest.preprocessing.stain_names)}
    changed = [f"{key} {found[key]} -> {wanted[key]}" for key in wanted if wanted[key] != found[key]]
    if changed:
        raise ResumeMismatch(f"run {run_uri} holds checkpoints of another model ({'; '.join(changed)}); "
                             "choose another run.name, or the settings it was trained with")


def run_training(config: TrainingConfig) -> str:
    """Train as configured; return the URI of the best checkpoint (by macro F1)."""
    from protein_ray.plots import write_training_plots
    from protein_ray.train_data import prepare_datasets

    # Workers' epoch lines once, not twice (Train's print patch writes to stdout and stderr).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run_uri = storage.absolute(storage.join(config.run.storage_path, config.run.name))
    check_resumable(run_uri, config)
    # Written first: an unwritable run.storage_path fails now, not after the whole decode pass.
    storage.write_text(storage.join(run_uri, "config.yaml"), config.to_yaml())
    # Opened before any worker starts: a missing mlflow or an unreachable store fails now.
    with tracking.tracked_run(config, run_uri) as tracked:
        datasets, train_count, _, preprocessing = prepare_datasets(config)
        job = TrainJob(config, preprocessing, load_spec(config.data.spec).classes, train_count, run_uri, tracked)
        started = time.perf_counter()
        result = build_trainer(job, datasets).fit()
        if result.error:
            raise result.error
        best = best_checkpoint_in(run_uri)
        if best is None:
            raise RuntimeError(f"training finished without a checkpoint; see {run_uri}")
        card = read_model_card(best)
        tracking.log_results(tracked, run_uri, best, write_training_plots(run_uri, card.class_names))
    print(
        f"training finished in {time.perf_counter() - started:.0f} s; best epoch {card.epoch + 1}: "
        f"macro F1 {card.metrics['macro_f1']:.3f} (at 0.5: {card.metrics['macro_f1@0.5']:.3f}, "
        f"label-prior baseline {card.metrics['label_prior_macro_f1']:.3f}); run folder {run_uri}"
    )
    return best
