"""Ray Data datasets of image rows, the Parquet shard writer, and splits.

Every source (a shard root, a Kaggle root, a plate or image folder) is first
resolved into an ``InputIndex`` by ``protein_ray.inputs``; this module turns an
index into a Ray Dataset of shard rows (``dataset_of``), writes shards
(``write_shards``) and splits labelled rows for training (``stratified_split``).
Reading bytes happens in Ray Data tasks, so it scales with the cluster.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from unittest import mock

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from protein_ray import omezarr, shards, storage
from protein_ray.imaging import ImageDecodeError, stack_stains
from protein_ray.inputs import InputIndex, available_splits, resolve_input
from protein_ray.labels import CLASS_NAMES, multi_hot_matrix
from protein_ray.sources import DataSourceError, InputOptions, missing_stains

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- loading -----


def encode_merged(planes: np.ndarray) -> bytes:
    """Losslessly encode merged stains (H, W, C): 3 stains as an RGB PNG (8-bit) or
    TIFF (16-bit); any other count as a planar (C, H, W) TIFF, deflate-compressed."""
    buffer = io.BytesIO()
    if planes.shape[-1] == 3 and planes.dtype == np.uint8:
        Image.fromarray(planes, mode="RGB").save(buffer, format="PNG")
    elif planes.shape[-1] == 3:
        tifffile.imwrite(buffer, planes.astype(np.uint16), photometric="rgb")
    else:
        tifffile.imwrite(buffer, np.moveaxis(planes, -1, 0), photometric="minisblack", planarconfig="separate",
                         compression="zlib")
    return buffer.getvalue()


def load_encoded_image(sources: list[str]) -> bytes:
    """The bytes of one image: a merged file untouched, or stains merged losslessly (an
    OME-Zarr field's stains too, read at the level its reference's size asks for)."""
    if omezarr.is_reference(sources[0]):
        return encode_merged(omezarr.read_field(sources[0]))
    if len(sources) == 1:
        return storage.read_bytes(sources[0])
    missing = missing_stains(sources)
    if missing:
        raise ImageDecodeError("missing_stain", f"no {' or '.join(missing)} stain file next to {sources}")
    return encode_merged(stack_stains([storage.read_bytes(uri) for uri in sources]))


def check_image_header(data: bytes, source: str) -> None:
    """Refuse bytes that are not a readable image, naming the file. Only the header
    is parsed: full decoding is the consumer's work."""
    if not data:
        raise DataSourceError(f"{source}: file is empty (0 bytes)")
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            tifffile.TiffFile(io.BytesIO(data)).close()
        else:
            Image.open(io.BytesIO(data)).verify()
    except Exception as error:
        raise DataSourceError(f"{source}: not a readable image ({error})") from None


def load_shard_rows(batch: pd.DataFrame, check_headers: bool = True) -> pd.DataFrame:
    """Ray Data map function: index rows -> shard rows with the image bytes.

    With ``check_headers`` (writing shards) a non-image fails the job, naming the
    file; without (training, scoring) bad bytes pass through for the consumer to
    count or report per row."""
    images, sources = [], []
    for row_sources in batch["sources"]:
        try:
            data = load_encoded_image(list(row_sources))
        except (ImageDecodeError, storage.StorageError) as error:
            raise DataSourceError(f"{' + '.join(row_sources)}: {error}") from None
        if check_headers:
            check_image_header(data, row_sources[0])
        images.append(data)
        sources.append(omezarr.original(row_sources[0]) if len(row_sources) == 1 else " ".join(row_sources))
    return pd.DataFrame(
        {
            "image_id": batch["image_id"].astype(str),
            "image": images,
            "labels": batch["labels"],
            "plate": batch["plate"],
            "well": batch["well"],
            "field": batch["field"],
            "source": sources,
        }
    )


def index_to_dataset(index: pd.DataFrame, batch_size: int = 64, check_headers: bool = True):
    """A lazy Ray Dataset of shard rows from an index of files (bytes read in Ray tasks)."""
    import ray.data

    frame = index[["image_id", "labels", "plate", "well", "field", "sources"]]
    return ray.data.from_pandas(frame).map_batches(
        load_shard_rows, batch_size=batch_size, batch_format="pandas", fn_kwargs={"check_headers": check_headers}
    )


# Ray Data (2.60) reads Parquet footers on a pool of actors that ``read_parquet`` sizes
# from this variable when it plans the read, whatever the number of files.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
RAY_FOOTER_ACTORS = 32  # its default
FILES_PER_FOOTER_BATCH = 10  # Ray's batch of footers per actor call


def footer_actors(files: int) -> str:
    """One footer-reading actor per batch of files, unless the user set the pool size.

    Each actor is a new worker process, so the default 32 cost ~4 s of a 2-core node on
    every read of a single shard file (measured: 5.3-5.8 s against 1.6-1.8 s with one);
    actors beyond the number of batches get no footer to read."""
    return os.environ.get(FOOTER_ACTORS_ENV) or str(min(RAY_FOOTER_ACTORS, math.ceil(files / FILES_PER_FOOTER_BATCH)))


def dataset_of(index: InputIndex, check_headers: bool = False, shuffle: bool = False):
    """A lazy Ray Dataset of shard rows for any resolved input: shards are read as
    they are, files are read (and per-stain files merged) in Ray tasks.

    ``shuffle`` (training): shard files are read in a new order each time the dataset
    runs (each epoch of a stream); image files, listed once, in one random order, since
    their index comes in plate, well and field order."""
    import ray.data

    in_shards = index.rows["shard_file"].notna()
    if not in_shards.any():
        rows = index.rows.sample(frac=1, random_state=0, ignore_index=True) if shuffle else index.rows
        return index_to_dataset(rows, check_headers=check_headers)
    if not in_shards.all():
        raise DataSourceError("an input mixing shards and image files cannot be read as one dataset")
    shard_files = index.rows["shard_file"].unique().tolist()
    fs, _ = storage.resolve(shard_files[0])
    # Set only while the read is planned; patch.dict puts the environment back as it was.
    with mock.patch.dict(os.environ, {FOOTER_ACTORS_ENV: footer_actors(len(shard_files))}):
        return ray.data.read_parquet([storage.resolve(f)[1] for f in shard_files], filesystem=fs, schema=shards.SCHEMA,
                                     shuffle="files" if shuffle else None)


# ---------------------------------------------------------------- shards ------


@dataclass
class ShardSummary:
    destination: str
    splits: dict[str, int]
    files: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return sum(self.splits.values()) / max(self.seconds, 1e-9)


def write_shards(src: str, dst: str, rows_per_file: int = 1000, overwrite: bool = False,
                 options: InputOptions = InputOptions(), classes: Sequence[str] = CLASS_NAMES) -> ShardSummary:
    """Convert a Kaggle root or an image/plate folder into Parquet shards at ``dst``.

    ``dst`` gets one folder per split plus ``manifest.json``. An ``_INCOMPLETE``
    marker exists while writing and is removed only after the manifest is written,
    so a failed run never looks like a finished one. ``options`` say how to read
    the source (layout, stains, channel map); ``classes`` name the label ids.
    """
    started = time.perf_counter()
    if storage.exists(storage.join(dst, shards.MANIFEST)) and not overwrite:
        raise DataSourceError(f"{dst} already holds shards ({shards.MANIFEST}); pass --overwrite to replace them")
    src = storage.absolute(src)
    if not storage.exists(src):
        raise DataSourceError(f"{src}: does not exist")
    indexes = {split: resolve_input(src, replace(options, split=split)) for split in available_splits(src)}
    skipped = [uri for index in indexes.values() for uri in index.skipped]
    for name in skipped:
        logger.warning("skipped: %s", name)
    if overwrite:
        storage.delete_dir(dst)
    storage.write_text(storage.join(dst, storage.INCOMPLETE_MARKER), f"shard writing from {src} started\n")
    fs, root = storage.resolve(dst)
    for split, index in indexes.items():
        logger.info("writing %d %s images from %s", len(index.rows), split, src)
        index_to_dataset(index.rows).write_parquet(
            posixpath.join(root, split) if storage.is_s3(dst) else str(PurePosixPath(root, split)),
            filesystem=fs,
            max_rows_per_file=rows_per_file,
            min_rows_per_file=min(rows_per_file, len(index.rows)),
        )
    files = sum(len(shards.list_shard_files(storage.join(dst, split))) for split in indexes)
    manifest = build_manifest(src, {split: index.rows for split, index in indexes.items()}, skipped, files, classes)
    storage.write_text(storage.join(dst, shards.MANIFEST), json.dumps(manifest, indent=2))
    storage.delete_file(storage.join(dst, storage.INCOMPLETE_MARKER))
    return ShardSummary(dst, manifest["counts"], files, time.perf_counter() - started)


def build_manifest(src: str, indexes: dict[str, pd.DataFrame], skipped: list[str], files: int,
                   classes: Sequence[str]) -> dict:
    def class_frequency(index: pd.DataFrame) -> dict[str, float] | None:
        known = [labels for labels in index["labels"] if labels is not None]
        if not known:
            return None
        counts = np.zeros(len(classes))
        for labels in known:
            counts[list(labels)] += 1
        return {name: round(float(c) / len(known), 4) for name, c in zip(classes, counts)}

    return {
        "format": shards.FORMAT,
        "source": src,
        "counts": {split: len(index) for split, index in indexes.items()},
        "class_frequency": {split: class_frequency(index) for split, index in indexes.items()},
        "files": files,
        "skipped_non_images": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------- splits ------


def stratified_split(
    image_ids: list[str], label_lists: list[list[int]], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic multi-label stratified split -> (train_ids, val_ids).

    Iterative stratification keeps every class's frequency (rare ones included)
    close in both parts, which a random split does not. Ids are sorted first so the
    split does not depend on the order rows arrived in.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    order = np.argsort(np.asarray(image_ids, dtype=object))
    ids = np.asarray(image_ids, dtype=object)[order]
    num_classes = 1 + max((max(labels) for labels in label_lists if len(labels)), default=0)
    targets = multi_hot_matrix([label_lists[i] for i in order], num_classes)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_rows, val_rows = next(splitter.split(np.zeros(len(ids)), targets))
    return sorted(ids[train_rows].tolist()), sorted(ids[val_rows].tolist())
