"""One input resolver: whatever a user points a command at becomes one typed index.

Training (``data.path``), ``protein-ray shard`` and ``protein-ray predict`` all call
``resolve_input``. It recognises (DESIGN.md section 2):

- a shard root (``manifest.json``): splits are its folders;
- a Kaggle root (``train.csv`` and/or ``submission.csv``): splits ``train``, ``test``;
- a folder of images, recursively: plate scans in one of ``folders.LAYOUTS`` (merged,
  or one file per stain or channel) or plain images: split ``images``;
- a single image file: split ``images``;
- an OME-Zarr (OME-NGFF) HCS plate (its group's metadata has ``plate``): one row per
  field, split ``images`` (``protein_ray.omezarr``; pixels read in the decode stage).

and returns an ``InputIndex``: one row per image, in a stable order, with its
metadata and where its bytes are. Indexing happens on the driver from listings
and CSVs, so bad input is reported with the file or CSV row before any
distributed work starts; bytes are read later, by Ray tasks.

Identity is by path, never by stem: an image's id is unique within its input (a
Kaggle id from the CSV, else its path relative to the input root), two files that
would fill the same plate/well/field/stain are an error naming both, and every
file under a folder is accounted for: a row, or a skip with its reason.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from protein_ray import omezarr, shards, storage
from protein_ray.folders import IMAGE_SUFFIXES, attach_labels, image_folder_index
from protein_ray.labels import NUM_CLASSES, parse_label_string
from protein_ray.sources import DataSourceError, InputOptions, read_csv

logger = logging.getLogger(__name__)

KAGGLE_CSV = {"train": "train.csv", "test": "submission.csv"}
# Columns of every index, whatever the input: bytes come from ``sources`` (files,
# several for per-stain images) or from ``shard_file`` at ``shard_row``.
COLUMNS = ("image_id", "labels", "plate", "well", "field", "source", "sources", "shard_file", "shard_row")


@dataclass
class InputIndex:
    """Every image of one or more inputs, one row each (``COLUMNS``)."""

    rows: pd.DataFrame
    skipped: list[str] = field(default_factory=list)  # files that are not images by name
    submission_ids: list[str] = field(default_factory=list)  # Kaggle test ids, in submission.csv order

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for image_id, source in zip(self.rows["image_id"], self.rows["source"]):
            digest.update(f"{image_id}\t{source}\n".encode())
        return digest.hexdigest()

    @property
    def unlabelled(self) -> int:
        return int(self.rows["labels"].isna().sum())


# ------------------------------------------------------------------ the resolver --


def available_splits(uri: str) -> list[str]:
    """The splits ``uri`` offers: a shard root's folders, a Kaggle root's train/test,
    else ``["images"]``."""
    if is_shard_root(uri):
        return list(shards.read_manifest(uri)["counts"])
    if is_kaggle_root(uri):
        return [split for split, csv in KAGGLE_CSV.items() if storage.exists(storage.join(uri, csv))]
    return ["images"]


def choose_split(available: list[str], requested: str | None, uri: str) -> str:
    """``requested`` if offered; by default the test split, else the only one."""
    if requested:
        if requested not in available:
            raise DataSourceError(f"{uri} has splits {available}, not {requested!r}")
        return requested
    for preferred in ("test", "images"):
        if preferred in available:
            return preferred
    return available[0]


def resolve_input(uri: str, options: InputOptions = InputOptions()) -> InputIndex:
    """One input (shards, Kaggle root, image/plate folder or image file) -> its index."""
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise DataSourceError(f"{uri}: does not exist")
    if options.layout == "kaggle" and not is_kaggle_root(uri):
        raise DataSourceError(f"--layout kaggle: {uri} has no train.csv or submission.csv")
    chosen = choose_split(available_splits(uri), options.split, uri)
    if is_shard_root(uri):
        rows = shard_index(uri, chosen)
    elif is_kaggle_root(uri):
        rows = kaggle_index(uri, chosen, options.num_classes)
    elif not storage.is_dir(uri):
        rows = pd.DataFrame({"image_id": [posixpath.basename(uri)], "sources": [[uri]]})
    else:
        plate = omezarr.is_plate(uri)
        rows, skipped = (omezarr.plate_index(uri, options), []) if plate else image_folder_index(uri, options)
        if options.labels_csv:
            rows = attach_labels(rows, options.labels_csv, options.num_classes)
        return InputIndex(complete_columns(rows), skipped=skipped)
    rows = complete_columns(rows)
    return InputIndex(rows, submission_ids=rows["image_id"].tolist() if chosen == "test" else [])


def resolve_inputs(uris: list[str], options: InputOptions = InputOptions()) -> InputIndex:
    """Several inputs, concatenated in the order given. Ids are unique within an
    input; across inputs the same id is kept (a Kaggle id must stay itself) and told."""
    parts = [resolve_input(uri, options) for uri in uris]
    rows = pd.concat([p.rows for p in parts], ignore_index=True)
    rows["field"] = rows["field"].astype("Int32")
    duplicated = rows["image_id"].duplicated()
    if duplicated.any():
        logger.warning("%d image ids occur in more than one input (e.g. %s); each is scored, "
                       "the source column tells them apart", duplicated.sum(), rows.loc[duplicated, "image_id"].iloc[0])
    return InputIndex(rows, [s for p in parts for s in p.skipped], [i for p in parts for i in p.submission_ids])


def complete_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """Any index frame -> exactly ``COLUMNS``; ``source`` is the original's URI (the
    stain files, space-separated, for merged stains)."""
    frame = rows.copy()
    for column, default in (("labels", None), ("plate", None), ("well", None), ("field", None),
                            ("sources", None), ("shard_file", None), ("shard_row", -1)):
        if column not in frame:
            frame[column] = default
    if "source" not in frame:
        frame["source"] = frame["sources"].map(" ".join)
    frame["field"] = frame["field"].astype("Int32")
    return frame[list(COLUMNS)]


# --------------------------------------------------------------------- shards --


def is_shard_root(uri: str) -> bool:
    return shards.is_shard_root(uri)


def shard_index(root: str, split: str) -> pd.DataFrame:
    """Only the small columns are read here; image bytes are read by Ray tasks."""
    shards.read_manifest(root)  # refuses a shard folder whose writing did not finish
    fs, _ = storage.resolve(root)
    frames = []
    for uri in shards.list_shard_files(storage.join(root, split)):
        table = pq.read_table(storage.resolve(uri)[1], columns=list(shards.INDEX_COLUMNS), filesystem=fs)
        frame = table.to_pandas()
        frame["shard_file"], frame["shard_row"] = uri, np.arange(len(frame))
        frames.append(frame)
    if not frames:
        raise DataSourceError(f"{root}: no Parquet files in split {split!r}")
    frame = pd.concat(frames, ignore_index=True)
    frame["labels"] = [None if labels is None else [int(i) for i in labels] for labels in frame["labels"]]
    return frame


# --------------------------------------------------------------------- Kaggle --


def is_kaggle_root(root: str) -> bool:
    return any(storage.exists(storage.join(root, csv)) for csv in KAGGLE_CSV.values())


def _image_files_by_stem(folder: str) -> dict[str, str]:
    return {
        PurePosixPath(uri).stem: uri
        for uri in storage.list_files(folder, recursive=False)
        if uri.lower().endswith(IMAGE_SUFFIXES)
    }


def kaggle_index(root: str, split: str = "train", num_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """Rows (image_id, labels, sources) of a Kaggle root's ``train`` or ``test`` split.

    ``train`` takes labels from ``train.csv``; ``test`` takes ids from
    ``submission.csv`` and has unknown labels. A CSV row whose image is missing,
    a bad label or a missing column is an error naming the row.
    """
    csv_name = KAGGLE_CSV[split]
    required = ("Image", "Label") if split == "train" else ("Image",)
    table = read_csv(storage.join(root, csv_name), required)
    files = _image_files_by_stem(storage.join(root, split))
    if table["Image"].duplicated().any():
        twice = table.loc[table["Image"].duplicated(), "Image"].iloc[0]
        raise DataSourceError(f"{csv_name} in {root} lists image {twice!r} more than once")
    rows = []
    for number, record in enumerate(table.itertuples(index=False), start=2):  # row 1 is the header
        image_id = str(record.Image)
        where = f"{csv_name} line {number} (image {image_id})"
        if image_id not in files:
            raise DataSourceError(f"{where}: no image file {split}/{image_id}.png (or .tif/.jpg) in {root}")
        labels = parse_label_string(record.Label, row=where, num_classes=num_classes) if split == "train" else None
        rows.append({"image_id": image_id, "labels": labels, "sources": [files[image_id]]})
    if not rows:
        raise DataSourceError(f"{csv_name} in {root} lists no images")
    return pd.DataFrame(rows)


