"""Training data on the driver: resolve ``data.path``, split it, decode it once.

Decoding and resizing run as Ray Data CPU tasks (``decode_for_training``),
separate from the training workers; the workers augment and normalize as they
collate batches (``protein_ray.train.BatchCollator``).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protein_ray import storage
from protein_ray.config import TrainingConfig
from protein_ray.imaging import ImageDecodeError, decode_image, resize_images
from protein_ray.inputs import InputIndex, available_splits, resolve_input
from protein_ray.labels import multi_hot_matrix

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The training data cannot be used; raised before any worker starts."""


def decode_for_training(batch: dict, image_size: int) -> dict:
    """Ray Data map function: encoded rows -> resized 0..1 images, targets and the
    decode outcome. Deterministic, so its output can be cached across epochs.

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


def keep_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["image_id"], value_set=ids))


def ensure_embedded_dataset(config: TrainingConfig) -> str:
    """Generate (or reuse) the synthetic data set and its shards; return the shard root."""
    from protein_ray import shards, synthetic
    from protein_ray.data import write_shards

    kaggle_root = storage.join(config.data.synthetic_dir, f"kaggle_{config.data.synthetic_size}px")
    shard_root = storage.join(config.data.synthetic_dir, f"shards_{config.data.synthetic_size}px")
    synthetic.write_kaggle_dataset(
        kaggle_root, n_train=config.data.synthetic_train, n_test=max(50, config.data.synthetic_train // 10),
        size=config.data.synthetic_size, seed=config.data.split_seed,
    )
    if not shards.is_shard_root(shard_root) or storage.exists(storage.join(shard_root, storage.INCOMPLETE_MARKER)):
        write_shards(kaggle_root, shard_root, overwrite=True)
    return shard_root


def labelled_index(uri: str) -> InputIndex:
    """The ``train`` split of a shard root or Kaggle root, every row labelled."""
    if not storage.exists(uri):
        raise TrainingDataError(f"data.path {uri} does not exist")
    if "train" not in available_splits(uri):
        raise TrainingDataError(
            f"data.path {uri}: expected protein-ray shards with a train split (manifest.json) "
            "or a Kaggle root (train.csv)")
    index = resolve_input(uri, "train")
    if index.unlabelled:
        raise TrainingDataError(f"{uri}: {index.unlabelled} training images have no labels")
    return index


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

    Decoding is the expensive, deterministic part: when the decoded images fit in
    ``data.cache_decoded_gib`` they are decoded once into Ray's object store;
    otherwise every epoch decodes them again as it streams.
    """
    from protein_ray.data import dataset_of, stratified_split

    uri = storage.absolute(config.data.path) if config.data.path else ensure_embedded_dataset(config)
    index = labelled_index(uri)
    rows = dataset_of(index)
    train_ids, val_ids = stratified_split(
        index.rows["image_id"].tolist(), list(index.rows["labels"]), config.data.val_fraction, config.data.split_seed
    )
    size = config.data.image_size
    total = len(index.rows)
    cache = decoded_gib(total, size) <= config.data.cache_decoded_gib

    def decoded(ids):
        dataset = rows.map_batches(keep_ids, fn_kwargs={"ids": pa.array(ids)}, batch_format="pyarrow").map_batches(
            decode_for_training, fn_kwargs={"image_size": size}, batch_format="numpy"
        )
        return dataset.materialize() if cache else dataset

    logger.info("decoding %d images from %s%s", total, uri, " into the object store" if cache else "")
    train, val = decoded(train_ids), decoded(val_ids)
    bad = check_decodable([train, val], total, config.data.max_bad_fraction)
    logger.info("data: %d train / %d validation images; decoded %s", len(train_ids), len(val_ids),
                f"once and cached ({decoded_gib(total, size):.2f} GiB)" if cache else "every epoch")
    return {"train": train, "val": val}, len(train_ids), bad
