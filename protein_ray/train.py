"""Distributed training with Ray Train (DDP) fed by Ray Data.

Driver side (``run_training``): resolve the data, split it, decode-check it, and
start a ``TorchTrainer``. Worker side (``train_loop_per_worker``): one screen of
training loop, validation on rank 0, and a checkpoint per epoch through
``ray.train.report``. Decoding and augmentation run as Ray Data tasks, so they
scale with CPU nodes rather than with the training workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from protein_ray import storage
from protein_ray.config import TrainingConfig
from protein_ray.imaging import (
    HPA_MEAN,
    HPA_STD,
    ImageDecodeError,
    decode_image,
    normalize_batch,
    resize_images,
)
from protein_ray.labels import multi_hot_matrix
from protein_ray.metrics import evaluate
from protein_ray.model import (
    ModelCard,
    autocast_context,
    create_model,
    load_training_state,
    save_checkpoint,
    unwrap,
)

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"


class TrainingDataError(ValueError):
    """The training data cannot be used; raised before any worker starts."""


# ------------------------------------------------------------ Ray Data stage --


def decode_for_training(batch: dict, image_size: int) -> dict:
    """Ray Data map function: encoded rows -> resized 0..1 images, targets and the
    decode outcome. Deterministic, so its output can be cached across epochs;
    augmentation and normalization come after, as workers collate (``collate_batch``).

    A corrupt image does not fail the batch: it becomes a zero image with
    ``ok = 0`` (the loss ignores it) and its reason in ``error``.
    """
    images, errors = [], []
    for data in batch["image"]:
        try:
            images.append(decode_image(data))
            errors.append("")
        except ImageDecodeError as error:
            images.append(np.zeros((image_size, image_size, 3), np.float32))
            errors.append(str(error))
    return {
        "image": resize_images(images, image_size),
        "target": multi_hot_matrix([list(labels) for labels in batch["labels"]]),
        "ok": np.asarray([not error for error in errors], dtype=np.float32),
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


def collate_batch(batch: dict, augment: bool) -> dict:
    """Worker side of the input pipeline, as batches are collated: fresh random
    augmentation (training split only) and the model's normalization of the decoded
    0..1 images. Both cost well under 1% of decoding, and doing them here lets the
    decoded images stay cached with no per-epoch Ray Data tasks."""
    rng = np.random.default_rng() if augment else None
    return {
        "image": torch.from_numpy(normalize_batch(batch["image"], HPA_MEAN, HPA_STD, augment_rng=rng)),
        "target": torch.from_numpy(np.asarray(batch["target"], dtype=np.float32)),
        "ok": torch.from_numpy(np.asarray(batch["ok"], dtype=np.float32)),
    }


def keep_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["image_id"], value_set=ids))


# ---------------------------------------------------------- the worker loop --


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-element focal loss: down-weights easy negatives, which dominate in
    multi-label data where most classes are absent from most images."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return (1 - p_true) ** gamma * bce


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, optim: dict) -> torch.Tensor:
    if optim["loss"] == "focal":
        return focal_loss(logits, targets, optim["focal_gamma"]).mean(dim=1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def build_optimizer(model: torch.nn.Module, optim: dict, steps_per_epoch: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], weight_decay=optim["weight_decay"])
    total = max(1, optim["epochs"] * steps_per_epoch)
    if optim["schedule"] == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optim["lr"], total_steps=total, pct_start=0.2)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return optimizer, scheduler


def train_one_epoch(model, batches, optimizer, scheduler, optim, device, autocast, scaler) -> dict:
    model.train()
    loss_sum, seen, bad, started = 0.0, 0, 0, time.perf_counter()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        if optim["channels_last"] and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets, ok = batch["target"].to(device), batch["ok"].to(device)
        with autocast:
            logits = model(images)
        # Weighted, not filtered: every worker runs the same steps, which DDP needs.
        loss = (per_sample_loss(logits.float(), targets, optim) * ok).sum() / ok.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        good = int(ok.sum().item())
        loss_sum += loss.item() * good
        seen, bad = seen + good, bad + len(ok) - good
    seconds = time.perf_counter() - started
    return {"loss_sum": loss_sum, "seen": seen, "bad": bad, "seconds": seconds}


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
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
        unwrap(model).load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    if state is None:
        return 0
    optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"]) + 1
    # The schedule is a function of the step. A rerun may ask for more epochs than
    # the saved schedule spans, so rebuild it for this run and advance it instead
    # of loading the old one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "step() before optimizer.step()": intended here
        for _ in range(start_epoch * steps_per_epoch):
            scheduler.step()
    return start_epoch


def report_epoch(epoch: int, model, optimizer, config: dict, metrics: dict | None) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if metrics is None:
        ray.train.report({"epoch": epoch})
        return
    card = ModelCard(
        backbone=config["model"]["name"],
        image_size=config["data"]["image_size"],
        thresholds=metrics["thresholds"],
        never_empty=config["optim"]["never_empty"],
        metrics={k: v for k, v in metrics.items() if k != "thresholds"},
        epoch=epoch,
        run_name=config["run"]["name"],
    )
    state = {"optimizer": optimizer.state_dict(), "epoch": epoch}
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, model, card, training_state=state)
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics | {"epoch": epoch}, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:03d}")


def append_history(run_uri: str, record: dict) -> None:
    uri = storage.join(run_uri, HISTORY_FILE)
    previous = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, previous + json.dumps(record) + "\n")


def epoch_line(epoch: int, epochs: int, record: dict) -> str:
    return (
        f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  "
        f"macro F1 {record['macro_f1']:.3f} (at 0.5: {record['macro_f1@0.5']:.3f})  "
        f"micro F1 {record['micro_f1']:.3f}  mAP {record['mAP'] or 0:.3f}  "
        f"batch F {record['batch_fscore@0.5']:.3f}  {record['train_images_per_s']:.1f} img/s  "
        f"bad images {int(record['bad_images'])}"
    )


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    optim, run = config["optim"], config["run"]
    torch.manual_seed(optim["seed"])
    torch.set_num_threads(max(1, run["cpus_per_worker"]))
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()

    model = create_model(config["model"]["name"], config["model"]["pretrained_path"], config["model"]["drop_rate"])
    if optim["channels_last"] and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    steps_per_epoch = math.ceil(config["train_count"] / world / optim["batch_size"])
    optimizer, scheduler = build_optimizer(model, optim, steps_per_epoch)
    start_epoch = restore_state(model, optimizer, scheduler, steps_per_epoch)
    if start_epoch and rank == 0:
        print(f"resuming from the checkpoint of epoch {start_epoch}: continuing at epoch {start_epoch + 1}")
    autocast, scaler = autocast_context(device, optim["amp"])

    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    batch_size = optim["batch_size"]
    train_collate, val_collate = partial(collate_batch, augment=True), partial(collate_batch, augment=False)
    for epoch in range(start_epoch, optim["epochs"]):
        stats = train_one_epoch(
            model, train_shard.iter_torch_batches(batch_size=batch_size, collate_fn=train_collate),
            optimizer, scheduler, optim, device, autocast, scaler,
        )
        loss_sum, seen, bad, seconds = gather_sum([stats["loss_sum"], stats["seen"], stats["bad"], stats["seconds"]])
        metrics = None
        if rank == 0:  # validation on rank 0 over the whole (unsplit) validation set
            probs, targets = predict_batches(unwrap(model), val_data.iter_torch_batches(batch_size=batch_size, collate_fn=val_collate), device, autocast)
            metrics = evaluate(probs, targets, never_empty=optim["never_empty"], batch_size=optim["batch_size"])
            metrics |= {
                "train_loss": loss_sum / max(seen, 1),
                "train_images_per_s": (seen + bad) / max(seconds / world, 1e-9),
                "bad_images": bad,
                "val_images": len(targets),
                "epoch": epoch,
            }
            print(epoch_line(epoch, optim["epochs"], metrics), flush=True)
            append_history(config["run_uri"], metrics)
        report_epoch(epoch, model, optimizer, config, metrics)


# ------------------------------------------------------------- driver side --


def ensure_embedded_dataset(config: TrainingConfig) -> str:
    """Generate (or reuse) the synthetic data set and its shards; return the shard root."""
    from protein_ray import synthetic
    from protein_ray.data import is_shard_root, write_shards

    kaggle_root = storage.join(config.data.synthetic_dir, f"kaggle_{config.data.synthetic_size}px")
    shard_root = storage.join(config.data.synthetic_dir, f"shards_{config.data.synthetic_size}px")
    synthetic.write_kaggle_dataset(
        kaggle_root, n_train=config.data.synthetic_train, n_test=max(50, config.data.synthetic_train // 10),
        size=config.data.synthetic_size, seed=config.data.split_seed,
    )
    if not is_shard_root(shard_root) or storage.exists(storage.join(shard_root, "_INCOMPLETE")):
        write_shards(kaggle_root, shard_root, overwrite=True)
    return shard_root


def labelled_rows(uri: str):
    """(Ray Dataset of shard rows, DataFrame of image_id + labels) for a shard root or Kaggle root."""
    import pyarrow.parquet as pq

    from protein_ray.data import (
        DataSourceError,
        index_to_dataset,
        is_kaggle_root,
        is_shard_root,
        kaggle_index,
        list_shard_files,
        read_shards,
    )

    if not storage.exists(uri):
        raise TrainingDataError(f"data.path {uri} does not exist")
    if is_shard_root(uri):
        dataset = read_shards(uri, "train")
        fs, _ = storage.resolve(uri)
        files = [storage.resolve(f)[1] for f in list_shard_files(storage.join(uri, "train"))]
        index = pq.read_table(files, columns=["image_id", "labels"], filesystem=fs).to_pandas()
    elif is_kaggle_root(uri):
        index = kaggle_index(uri, "train")
        dataset = index_to_dataset(index, check_headers=False)  # bad images are counted, not fatal
    else:
        raise DataSourceError(f"data.path {uri}: expected protein-ray shards (manifest.json) or a Kaggle root (train.csv)")
    if index["labels"].isna().any():
        raise TrainingDataError(f"{uri}: {int(index['labels'].isna().sum())} training images have no labels")
    return dataset, index


def check_decodable(decoded: list, total: int, max_bad_fraction: float) -> int:
    """Count the images that failed to decode (a read of the cache when the decoded
    splits are cached, else one decode pass) and fail before training starts, with
    the bad files named, if more than ``max_bad_fraction`` are unreadable."""
    bad = [f"{row['image_id']}: {row['error']}"
           for dataset in decoded for row in dataset.select_columns(["image_id", "error"]).iter_rows() if row["error"]]
    for line in bad[:20]:
        logger.warning("undecodable training image, skipped: %s", line)
    if total and len(bad) / total > max_bad_fraction:
        raise TrainingDataError(
            f"{len(bad)} of {total} training images cannot be decoded ({len(bad) / total:.1%} > "
            f"data.max_bad_fraction {max_bad_fraction:.1%}); first: {bad[:3]}"
        )
    return len(bad)


def decoded_gib(images: int, image_size: int) -> float:
    return images * 3 * image_size**2 * np.dtype(np.float32).itemsize / 2**30


def prepare_datasets(config: TrainingConfig) -> tuple[dict, int, int]:
    """Train/val Ray Datasets of decoded, resized images; train count; bad count.

    Decoding (Ray Data CPU tasks) is the expensive, deterministic part: when the
    decoded images fit in ``data.cache_decoded_gib`` they are decoded once into Ray's
    object store; otherwise every epoch decodes them again as it streams. Workers
    augment and normalize as they collate batches (``collate_batch``).
    """
    from protein_ray.data import stratified_split

    uri = config.data.path or ensure_embedded_dataset(config)
    rows, index = labelled_rows(uri)
    train_ids, val_ids = stratified_split(
        index["image_id"].tolist(), [list(x) for x in index["labels"]], config.data.val_fraction, config.data.split_seed
    )
    size = config.data.image_size
    cache = decoded_gib(len(index), size) <= config.data.cache_decoded_gib

    def decoded(ids):
        dataset = rows.map_batches(keep_ids, fn_kwargs={"ids": pa.array(ids)}, batch_format="pyarrow").map_batches(
            decode_for_training, fn_kwargs={"image_size": size}, batch_format="numpy"
        )
        return dataset.materialize() if cache else dataset

    train, val = decoded(train_ids), decoded(val_ids)
    bad = check_decodable([train, val], len(index), config.data.max_bad_fraction)
    logger.info("data: %s (%d train / %d validation images; decoded %s)", uri, len(train_ids), len(val_ids),
                f"once and cached ({decoded_gib(len(index), size):.2f} GiB)" if cache else "every epoch")
    return {"train": train, "val": val}, len(train_ids), bad


def run_storage(config: TrainingConfig) -> tuple[str, object]:
    """(storage_path, filesystem) for Ray Train: absolute locally, bucket/key on S3."""
    fs, path = storage.resolve(config.run.storage_path)
    return path, fs


def build_trainer(config: TrainingConfig, datasets: dict, train_count: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = run_storage(config)
    loop_config = config.to_dict() | {
        "train_count": train_count,
        "run_uri": storage.absolute(storage.join(config.run.storage_path, config.run.name)),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints,
                checkpoint_score_attribute="macro_f1",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        # Validation runs on rank 0 over the whole set, so only "train" is split.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def checkpoint_uri(checkpoint) -> str:
    import pyarrow.fs as pafs

    return storage.display(checkpoint.filesystem, checkpoint.path) if isinstance(
        checkpoint.filesystem, pafs.S3FileSystem) else checkpoint.path


def best_checkpoint_uri(result) -> str:
    candidates = [(metrics.get("macro_f1", -1), checkpoint) for checkpoint, metrics in result.best_checkpoints or []]
    if not candidates:
        raise RuntimeError(f"training finished without a checkpoint; see {result.path}")
    return checkpoint_uri(max(candidates, key=lambda pair: pair[0])[1])


def run_training(config: TrainingConfig) -> str:
    """Train as configured; return the URI of the best checkpoint (by macro F1)."""
    import ray.data

    from protein_ray.plots import write_training_plots

    # Epoch lines are our progress output; Ray Data's per-dataset bars would bury them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_uri = storage.absolute(storage.join(config.run.storage_path, config.run.name))
    datasets, train_count, _ = prepare_datasets(config)
    storage.write_text(storage.join(run_uri, "config.yaml"), config.to_yaml())
    started = time.perf_counter()
    result = build_trainer(config, datasets, train_count).fit()
    if result.error:
        raise result.error
    best = best_checkpoint_uri(result)
    write_training_plots(run_uri)
    card = ModelCard.from_json(storage.read_text(storage.join(best, "config.json")))
    print(
        f"training finished in {time.perf_counter() - started:.0f} s; best epoch {card.epoch + 1}: "
        f"macro F1 {card.metrics['macro_f1']:.3f} (at 0.5: {card.metrics['macro_f1@0.5']:.3f}, "
        f"label-prior baseline {card.metrics['label_prior_macro_f1']:.3f}); run folder {run_uri}"
    )
    return best
