"""Image sources as Ray Datasets, and the Parquet shard writer.

Three source layouts (DESIGN.md section 2) become one row format::

    image_id: str, image: bytes (encoded, untouched), labels: list[int] | None,
    plate, well: str | None, field: int | None, source: str (URI of the original)

Indexing (which images exist, their labels, plate/well/field) happens on the
driver from listings and CSVs, so that bad input is reported with the row or
file name before any distributed work starts. Reading bytes happens in Ray Data
tasks, so it scales with the cluster.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import tifffile
from PIL import Image

from protein_ray import storage
from protein_ray.imaging import ImageDecodeError, decode_raw
from protein_ray.labels import CLASS_NAMES, LabelError, parse_label_string

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
STAINS = ("red", "green", "blue")
# <plate>_<well>_<field>[_<stain>].<ext>, e.g. P001_B07_f3.png or P001_B07_f3_green.tif
DEFAULT_PLATE_PATTERN = (
    r"(?P<plate>[A-Za-z0-9-]+)_(?P<well>[A-Pa-p]\d{1,2})_f?(?P<field>\d+)"
    r"(?:_(?P<stain>red|green|blue|yellow))?\.(?:png|tiff?|jpe?g)$"
)
MANIFEST = "manifest.json"
INCOMPLETE_MARKER = "_INCOMPLETE"

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("labels", pa.list_(pa.int32())),
        ("plate", pa.string()),
        ("well", pa.string()),
        ("field", pa.int32()),
        ("source", pa.string()),
    ]
)


class DataSourceError(ValueError):
    """Input data that cannot be used; the message names the file or CSV row."""


# ---------------------------------------------------------------- indexing ----


def _read_csv(uri: str, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    except storage.StorageError:
        raise
    except Exception as error:
        raise DataSourceError(f"{uri}: not a readable CSV ({error})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataSourceError(
            f"{uri}: missing column(s) {missing}; found {list(table.columns)}, expected {list(required)}"
        )
    return table


def _image_files_by_stem(folder: str) -> dict[str, str]:
    return {
        PurePosixPath(uri).stem: uri
        for uri in storage.list_files(folder, recursive=False)
        if uri.lower().endswith(IMAGE_SUFFIXES)
    }


def is_kaggle_root(root: str) -> bool:
    return storage.exists(storage.join(root, "train.csv")) or storage.exists(
        storage.join(root, "submission.csv")
    )


def kaggle_index(root: str, split: str = "train") -> pd.DataFrame:
    """Rows (image_id, labels, source) of a Kaggle root's ``train`` or ``test`` split.

    ``train`` takes labels from ``train.csv``; ``test`` takes ids from
    ``submission.csv`` and has unknown labels. A CSV row whose image is missing,
    a bad label or a missing column is an error naming the row.
    """
    csv_name = {"train": "train.csv", "test": "submission.csv"}[split]
    required = ("Image", "Label") if split == "train" else ("Image",)
    table = _read_csv(storage.join(root, csv_name), required)
    files = _image_files_by_stem(storage.join(root, split))
    rows = []
    for number, record in enumerate(table.itertuples(index=False), start=2):  # row 1 is the header
        image_id = str(record.Image)
        where = f"{csv_name} line {number} (image {image_id})"
        if image_id not in files:
            raise DataSourceError(f"{where}: no image file {split}/{image_id}.png (or .tif/.jpg) in {root}")
        labels = parse_label_string(record.Label, row=where) if split == "train" else None
        rows.append({"image_id": image_id, "labels": labels, "source": files[image_id]})
    if not rows:
        raise DataSourceError(f"{csv_name} in {root} lists no images")
    return pd.DataFrame(rows)


def image_folder_index(folder: str, pattern: str = DEFAULT_PLATE_PATTERN) -> tuple[pd.DataFrame, list[str]]:
    """Index a plate-scan folder (or any folder of images), recursively.

    Returns ``(index, skipped)``: one index row per field image, with ``sources``
    listing one merged file or the red/green/blue stain files in that order;
    ``skipped`` lists files that are not images by name. Files that do not match
    ``pattern`` become their own image (no plate/well). A field missing a stain
    keeps the stains it has; decoding it later reports what is missing.
    """
    matcher = re.compile(pattern)
    groups: dict[str, dict] = {}
    skipped = []
    for uri in storage.list_files(folder, recursive=True):
        name = posixpath.basename(uri)
        if name.startswith(".") or name in (MANIFEST, INCOMPLETE_MARKER) or name.endswith(".csv"):
            continue
        if not name.lower().endswith(IMAGE_SUFFIXES):
            skipped.append(uri)
            continue
        match = matcher.search(name)
        if match is None:
            groups[PurePosixPath(name).stem] = {"image_id": PurePosixPath(name).stem, "stains": {"rgb": uri}}
            continue
        plate, well, field = match["plate"], match["well"].upper(), int(match["field"])
        well = f"{well[0]}{int(well[1:]):02d}"
        image_id = f"{plate}_{well}_f{field}"
        group = groups.setdefault(
            image_id, {"image_id": image_id, "plate": plate, "well": well, "field": field, "stains": {}}
        )
        group["stains"][match["stain"] or "rgb"] = uri
    if not groups:
        raise DataSourceError(f"{folder}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    index = pd.DataFrame([_index_row(g) for g in groups.values()]).sort_values("image_id", ignore_index=True)
    return index, skipped


def _index_row(group: dict) -> dict:
    stains = group.pop("stains")
    if "rgb" in stains:
        sources = [stains["rgb"]]
    else:  # per-stain files; a yellow (ER) stain is not used by this model
        sources = [stains.get(s, f"<missing {s} stain>") for s in STAINS]
    return {"plate": None, "well": None, "field": None, **group, "labels": None, "sources": sources}


# ---------------------------------------------------------------- loading -----


def encode_merged_rgb(rgb: np.ndarray) -> bytes:
    """Losslessly encode a merged (H, W, 3) integer image: PNG for 8-bit, TIFF for 16-bit."""
    buffer = io.BytesIO()
    if rgb.dtype == np.uint8:
        Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    else:
        tifffile.imwrite(buffer, rgb.astype(np.uint16), photometric="rgb")
    return buffer.getvalue()


def load_encoded_image(sources: list[str]) -> bytes:
    """The bytes of one image: a merged file untouched, or stains merged losslessly."""
    if len(sources) == 1:
        return storage.read_bytes(sources[0])
    missing = [s for s in sources if s.startswith("<missing")]
    if missing:
        raise ImageDecodeError("missing_stain", f"stain file(s) not found: {', '.join(missing)}")
    planes = [decode_raw(storage.read_bytes(uri)) for uri in sources]
    planes = [p[..., 0] if p.ndim == 3 else p for p in planes]
    if len({p.shape for p in planes}) != 1:
        raise ImageDecodeError("shape_mismatch", f"stain files differ in size: {[p.shape for p in planes]}")
    dtype = np.uint8 if all(p.dtype == np.uint8 for p in planes) else np.uint16
    return encode_merged_rgb(np.stack([p.astype(dtype) for p in planes], axis=-1))


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
        sources.append(row_sources[0] if len(row_sources) == 1 else " ".join(row_sources))
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
    """A lazy Ray Dataset of shard rows (bytes read in Ray tasks)."""
    import ray.data

    frame = index.copy()
    if "sources" not in frame:
        frame["sources"] = frame["source"].map(lambda s: [s])
    for column in ("plate", "well", "field"):
        if column not in frame:
            frame[column] = None
    frame["field"] = frame["field"].astype("Int32")
    frame = frame[["image_id", "labels", "plate", "well", "field", "sources"]]
    return ray.data.from_pandas(frame).map_batches(
        load_shard_rows, batch_size=batch_size, batch_format="pandas", fn_kwargs={"check_headers": check_headers}
    )


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


def source_indexes(src: str) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Split name -> index for a Kaggle root (train, test) or an image folder (images)."""
    if not storage.exists(src):
        raise DataSourceError(f"{src}: does not exist")
    if is_kaggle_root(src):
        splits = {}
        if storage.exists(storage.join(src, "train.csv")):
            splits["train"] = kaggle_index(src, "train")
        if storage.exists(storage.join(src, "submission.csv")):
            splits["test"] = kaggle_index(src, "test")
        return splits, []
    index, skipped = image_folder_index(src)
    return {"images": index}, skipped


def write_shards(src: str, dst: str, rows_per_file: int = 1000, overwrite: bool = False) -> ShardSummary:
    """Convert a Kaggle root or an image/plate folder into Parquet shards at ``dst``.

    ``dst`` gets one folder per split plus ``manifest.json``. An ``_INCOMPLETE``
    marker exists while writing and is removed only after the manifest is written,
    so a failed run never looks like a finished one.
    """
    started = time.perf_counter()
    if storage.exists(storage.join(dst, MANIFEST)) and not overwrite:
        raise DataSourceError(f"{dst} already holds shards (manifest.json); pass --overwrite to replace them")
    indexes, skipped = source_indexes(src)
    for name in skipped:
        logger.warning("skipped (not an image by name): %s", name)
    if overwrite:
        storage.delete_dir(dst)
    storage.write_text(storage.join(dst, INCOMPLETE_MARKER), f"shard writing from {src} started\n")
    fs, root = storage.resolve(dst)
    for split, index in indexes.items():
        logger.info("writing %d %s images from %s", len(index), split, src)
        index_to_dataset(index).write_parquet(
            posixpath.join(root, split) if storage.is_s3(dst) else str(PurePosixPath(root, split)),
            filesystem=fs,
            max_rows_per_file=rows_per_file,
            min_rows_per_file=min(rows_per_file, len(index)),
        )
    files = sum(len(list_shard_files(storage.join(dst, split))) for split in indexes)
    manifest = build_manifest(src, indexes, skipped, files)
    storage.write_text(storage.join(dst, MANIFEST), json.dumps(manifest, indent=2))
    storage.delete_file(storage.join(dst, INCOMPLETE_MARKER))
    return ShardSummary(dst, manifest["counts"], files, time.perf_counter() - started)


def build_manifest(src: str, indexes: dict[str, pd.DataFrame], skipped: list[str], files: int) -> dict:
    def class_frequency(index: pd.DataFrame) -> dict[str, float] | None:
        known = [labels for labels in index["labels"] if labels is not None]
        if not known:
            return None
        counts = np.zeros(len(CLASS_NAMES))
        for labels in known:
            counts[list(labels)] += 1
        return {name: round(float(c) / len(known), 4) for name, c in zip(CLASS_NAMES, counts)}

    return {
        "format": "protein-ray shards v1",
        "source": src,
        "counts": {split: len(index) for split, index in indexes.items()},
        "class_frequency": {split: class_frequency(index) for split, index in indexes.items()},
        "files": files,
        "skipped_non_images": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def list_shard_files(uri: str) -> list[str]:
    return [u for u in storage.list_files(uri) if u.endswith(".parquet")]


def read_manifest(shard_root: str) -> dict:
    if storage.exists(storage.join(shard_root, INCOMPLETE_MARKER)):
        raise DataSourceError(f"{shard_root}: shard writing did not finish ({INCOMPLETE_MARKER} present); rewrite it")
    if not storage.exists(storage.join(shard_root, MANIFEST)):
        raise DataSourceError(f"{shard_root}: no {MANIFEST}; not a protein-ray shard folder")
    return json.loads(storage.read_text(storage.join(shard_root, MANIFEST)))


def read_shards(shard_root: str, split: str | None = None):
    """A Ray Dataset over the shards of one split (default: the only or ``train`` split)."""
    import ray.data

    manifest = read_manifest(shard_root)
    splits = list(manifest["counts"])
    split = split or ("train" if "train" in splits else splits[0])
    if split not in splits:
        raise DataSourceError(f"{shard_root} has splits {splits}, not {split!r}")
    files = list_shard_files(storage.join(shard_root, split))
    if not files:
        raise DataSourceError(f"{shard_root}/{split}: no Parquet files")
    fs, _ = storage.resolve(shard_root)
    paths = [storage.resolve(f)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, schema=SHARD_SCHEMA)


def is_shard_root(uri: str) -> bool:
    return storage.exists(storage.join(uri, MANIFEST)) or storage.exists(storage.join(uri, INCOMPLETE_MARKER))


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

    from protein_ray.labels import multi_hot_matrix

    order = np.argsort(np.asarray(image_ids, dtype=object))
    ids = np.asarray(image_ids, dtype=object)[order]
    targets = multi_hot_matrix([label_lists[i] for i in order])
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_rows, val_rows = next(splitter.split(np.zeros(len(ids)), targets))
    return sorted(ids[train_rows].tolist()), sorted(ids[val_rows].tolist())


__all__ = [
    "DataSourceError",
    "LabelError",
    "SHARD_SCHEMA",
    "image_folder_index",
    "index_to_dataset",
    "kaggle_index",
    "read_manifest",
    "read_shards",
    "stratified_split",
    "write_shards",
]
