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
from protein_ray.imaging import ImageDecodeError, Preprocessing, decode_image, from_pixels, prepare_batch
from protein_ray.inputs import InputIndex, available_splits, resolve_input
from protein_ray.labels import multi_hot_matrix
from protein_ray.sources import InputOptions, parse_channel_map
from protein_ray.spec import DatasetSpec, load_spec

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The training data cannot be used; raised before any worker starts."""


def decode_for_training(batch: dict, preprocessing: Preprocessing, num_classes: int) -> dict:
    """Ray Data map function: encoded rows -> model pixels (resized, uint8 for 8-bit stains), targets and the
    decode outcome. Deterministic, so its output can be cached across epochs.

    A corrupt image does not fail the batch: it becomes a zero image with
    ``ok = 0`` (the loss ignores it) and its reason in ``error``.
    """
    size, images, errors = preprocessing.image_size, [], []
    for data in batch["image"]:
        try:
            images.append(decode_image(data, preprocessing.stains))
            errors.append("")
        except ImageDecodeError as error:
            images.append(np.zeros((size, size, preprocessing.channels), np.float32))
            errors.append(str(error))
    return {
        "image": prepare_batch(images, preprocessing),
        "target": multi_hot_matrix([list(labels) for labels in batch["labels"]], num_classes),
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


def input_options(config: TrainingConfig, spec: DatasetSpec) -> InputOptions:
    """How to read ``data.path``: the train split of shards or a Kaggle root, or a
    plate folder or OME-Zarr plate with ``data.labels``, read for the spec's stains."""
    return InputOptions(
        split="images" if config.data.labels else "train", layout=config.data.layout,
        pattern=config.data.pattern or None, stains=spec.stain_names,
        channel_map=parse_channel_map(config.data.channel_map, spec.stain_names),
        num_classes=len(spec.classes), labels_csv=config.data.labels or None,
        image_size=config.data.image_size)  # an OME-Zarr plate is read at the level that fits it


def labelled_index(uri: str, options: InputOptions) -> InputIndex:
    """Every training image, labelled; unlabelled plate images are left out (and told)."""
    if not storage.exists(uri):
        raise TrainingDataError(f"data.path {uri} does not exist")
    if options.split not in available_splits(uri):
        raise TrainingDataError(
            f"data.path {uri}: expected protein-ray shards with a train split (manifest.json), a Kaggle root "
            "(train.csv), or a plate folder with data.labels (a CSV of labels per well or field)")
    index = resolve_input(uri, options)
    if index.unlabelled and options.labels_csv:
        logger.warning("%d plate images have no row in %s and are left out of training", index.unlabelled,
                       options.labels_csv)
        index.rows = index.rows[index.rows["labels"].notna()].reset_index(drop=True)
    elif index.unlabelled:
        raise TrainingDataError(f"{uri}: {index.unlabelled} training images have no labels")
    if index.rows.empty:
        raise TrainingDataError(f"{uri}: no labelled training images")
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


def decoded_gib(images: int, spec: Preprocessing) -> float:
    """The object-store size of the decoded images: model pixels, one byte per
    value for 8-bit stains (a quarter of float32)."""
    return images * spec.channels * spec.image_size**2 * np.dtype(spec.pixel_dtype).itemsize / 2**30


def channel_sums(batch: dict) -> dict:
    """Per-stain pixel sums of the decodable images of a batch (0..1 scale)."""
    images = from_pixels(batch["image"][np.asarray(batch["ok"]) > 0]).astype(np.float64)
    return {"pixels": np.array([images[:, 0].size]), "sum": images.sum(axis=(0, 2, 3))[None],
            "squares": (images**2).sum(axis=(0, 2, 3))[None]}


def measure_channel_stats(dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of each stain over the training images, for normalization."""
    parts = dataset.map_batches(channel_sums, batch_format="numpy").take_all()
    pixels = sum(float(part["pixels"]) for part in parts)
    total = np.sum([part["sum"] for part in parts], axis=0)
    squares = np.sum([part["squares"] for part in parts], axis=0)
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(squares / max(pixels, 1) - mean**2, 1e-12))
    return tuple(round(float(m), 5) for m in mean), tuple(round(float(s), 5) for s in np.maximum(std, 1e-3))


def prepare_datasets(config: TrainingConfig) -> tuple[dict, int, int, Preprocessing]:
    """Train/val Ray Datasets of decoded, resized images; train count; bad count; and
    the preprocessing the checkpoints will carry (the spec's channel statistics, or
    the training images' own when the spec has none).

    Decoding is the expensive, deterministic part: when the decoded images fit in
    ``data.cache_decoded_gib`` they are decoded once into Ray's object store;
    otherwise every epoch decodes them again as it streams.
    """
    from protein_ray.data import dataset_of, stratified_split

    spec = load_spec(config.data.spec)
    uri = storage.absolute(config.data.path) if config.data.path else ensure_embedded_dataset(config)
    index = labelled_index(uri, input_options(config, spec))
    rows = dataset_of(index, shuffle=True)
    train_ids, val_ids = stratified_split(
        index.rows["image_id"].tolist(), list(index.rows["labels"]), config.data.val_fraction, config.data.split_seed
    )
    size, total, channels = config.data.image_size, len(index.rows), len(spec.stains)
    decode_spec = Preprocessing(size, mean=(0.0,) * channels, std=(1.0,) * channels,
                                stains=spec.stains).with_bits(config.data.bit_depth or None)
    gib = decoded_gib(total, decode_spec)
    cache = gib <= config.data.cache_decoded_gib

    def decoded(ids):
        dataset = rows.map_batches(keep_ids, fn_kwargs={"ids": pa.array(ids)}, batch_format="pyarrow").map_batches(
            decode_for_training, fn_kwargs={"preprocessing": decode_spec, "num_classes": len(spec.classes)},
            batch_format="numpy")
        return dataset.materialize() if cache else dataset

    logger.info("decoding %d images (%s) from %s%s", total, ", ".join(spec.stain_names), uri,
                " into the object store" if cache else "")
    train, val = decoded(train_ids), decoded(val_ids)
    bad = check_decodable([train, val], total, config.data.max_bad_fraction)
    mean, std = (spec.mean, spec.std) if spec.mean and spec.std else measure_channel_stats(train)
    logger.info("data: %d train / %d validation images; decoded %s; channel mean %s, std %s", len(train_ids),
                len(val_ids), f"once and cached ({gib:.2f} GiB)" if cache else "every epoch", mean, std)
    if cache:
        # A new order of the cached blocks each epoch (it only reorders references: no tasks,
        # no copies); the workers shuffle rows within their buffers. On a stream it would
        # hold the whole decoded set at once: there the shard files are read in a new order.
        train = train.randomize_block_order()
    return {"train": train, "val": val}, len(train_ids), bad, Preprocessing(size, mean, std, decode_spec.stains)
