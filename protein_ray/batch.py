"""Bulk scoring of plate scans with Ray Data: ``protein-ray predict``.

::

    driver     index every input (shards, Kaggle root, image or plate folder; local
               or s3://) -> rows in a stable order -> fixed-size chunks, minus the
               chunks whose part file already exists
    Ray Data   chunk -> read + decode + preprocess   (CPU tasks: scale with CPU count)
                     -> model                         (actor pool: one Predictor each)
    driver     rows of a chunk complete -> parts/part-<chunk>.parquet (atomic)
               all parts -> predictions.parquet/.csv, wells, heatmaps, submission.csv,
               embeddings.parquet, summary.json

Nothing is lost (DESIGN.md section 8): every input image yields exactly one row,
with probabilities or with the reason it could not be scored, and the driver
checks count in = count out. Rerunnable: a chunk is the same slice of the same
index on every run, so a rerun on the same output skips the chunks whose part
file exists and writes only the rest; ``--overwrite`` starts afresh.

Decoding and preprocessing call the one path of ``protein_ray.imaging`` with the
checkpoint's settings, exactly what ``Predictor.preprocess`` does, so a job's
probabilities equal the Predictor's (and Serve's) for the same bytes.

pandas, torch and Ray are imported inside the functions that use them (numpy and
pyarrow come with ``protein_ray.storage`` anyway), so that ``protein-ray --help``,
which defines this command, stays quick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from protein_ray import storage
from protein_ray.labels import CLASS_NAMES, NUM_CLASSES, format_label_string
from protein_ray.plates import PROB_COLUMNS, compare_with_planted, well_table, write_heatmaps

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

FORMAT = "protein-ray predictions v1"
JOB_FILE = "job.json"
PARTS_DIR = "parts"
OUTPUT_NAMES = (
    JOB_FILE, PARTS_DIR, "predictions.parquet", "predictions.csv", "wells.parquet", "wells.csv",
    "heatmaps", "submission.csv", "embeddings.parquet", "summary.json",
)
MAX_PIXELS = 40_000_000  # = imaging.MAX_PIXELS; repeated so that --help does not import torch
READ_THREADS = 8  # concurrent reads per decode task: hides S3 latency, harmless on local disk
PROGRESS_EVERY_S = 10.0
# Most frequent class of the real data (DESIGN.md section 9): the submission's last
# resort for an image that could not be scored when nothing else was scored either.
MOST_FREQUENT_CLASS = CLASS_NAMES.index("Nucleoplasm")


class PredictJobError(ValueError):
    """A scoring job that cannot start or finish as asked; the message says why."""


class ErrorRateExceeded(PredictJobError):
    """More images failed than ``--max-error-rate`` allows. Raised after every output
    was written; ``summary`` is what summary.json holds."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class PredictOptions:
    checkpoint: str
    inputs: list[str]
    output: str
    split: str | None = None  # Kaggle roots and shards: which split (default: test, else the only one)
    pattern: str | None = None  # plate file-name regex (default: data.DEFAULT_PLATE_PATTERN)
    batch_size: int = 32  # images per model call
    actors: int | None = None  # model actors (default: one per GPU, else 1)
    num_gpus: float | None = None  # per actor (default: 1 when the cluster has GPUs)
    cpus_per_actor: float = 1.0  # logical CPUs each model actor reserves
    threads_per_actor: int | None = None  # torch threads in each CPU actor (default: cores / actors)
    decode_tasks: int | None = None  # concurrent decode tasks (default: as free CPUs allow)
    decode_batch: int = 16  # images per decode output block
    chunk_size: int = 512  # images per part file: the unit of rerun
    tta: bool = False
    embeddings: bool = False
    max_pixels: int = MAX_PIXELS
    max_error_rate: float = 0.05
    allow_empty: bool = False
    submission: bool = False  # write submission.csv for all images, not only Kaggle test splits
    heatmaps: bool = True
    overwrite: bool = False
    address: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PredictOptions":
        values = vars(args)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def check(self) -> None:
        problems = [
            (self.batch_size < 1, "--batch-size must be at least 1"),
            (self.chunk_size < 1, "--chunk-size must be at least 1"),
            (self.decode_batch < 1, "--decode-batch must be at least 1"),
            (self.actors is not None and self.actors < 1, "--actors must be at least 1"),
            (self.max_pixels < 1, "--max-pixels must be at least 1"),
            (not 0 <= self.max_error_rate <= 1, "--max-error-rate must be between 0 and 1"),
            (not self.inputs, "give at least one --input"),
        ]
        for failed, message in problems:
            if failed:
                raise PredictJobError(message)


# ------------------------------------------------------------------ index ----


@dataclass
class InputIndex:
    """Every image to score, in a stable order: one row per image with its
    metadata and where its bytes are (``sources`` files, or a shard file and row)."""

    rows: pd.DataFrame
    skipped: list[str] = field(default_factory=list)
    submission_ids: list[str] = field(default_factory=list)  # Kaggle test ids, in submission.csv order

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for image_id, source in zip(self.rows["image_id"], self.rows["source"]):
            digest.update(f"{image_id}\t{source}\n".encode())
        return digest.hexdigest()


def _choose_split(available: list[str], requested: str | None, uri: str) -> str:
    if requested:
        if requested not in available:
            raise PredictJobError(f"--input {uri} has splits {available}, not {requested!r}")
        return requested
    for preferred in ("test", "images"):
        if preferred in available:
            return preferred
    return available[0]


def _file_rows(index: pd.DataFrame) -> pd.DataFrame:
    """Kaggle/folder index -> the common row format (bytes come from ``sources``)."""
    frame = index.copy()
    if "sources" not in frame:
        frame["sources"] = frame["source"].map(lambda uri: [uri])
    frame["source"] = frame["sources"].map(lambda uris: uris[0] if len(uris) == 1 else " ".join(uris))
    for column in ("plate", "well", "field"):
        if column not in frame:
            frame[column] = None
    frame["shard_file"], frame["shard_row"] = None, -1
    return frame


def _shard_rows(root: str, split: str) -> pd.DataFrame:
    """Shard index -> common rows; only the small columns are read here, the image
    bytes are read by the decode tasks."""
    import pandas as pd

    from protein_ray.data import list_shard_files, read_manifest

    read_manifest(root)  # refuses a shard folder whose writing did not finish
    fs, _ = storage.resolve(root)
    frames = []
    for uri in list_shard_files(storage.join(root, split)):
        table = pq.read_table(storage.resolve(uri)[1], columns=["image_id", "plate", "well", "field", "source"],
                              filesystem=fs)
        frame = table.to_pandas()
        frame["sources"], frame["shard_file"], frame["shard_row"] = None, uri, np.arange(len(frame))
        frames.append(frame)
    if not frames:
        raise PredictJobError(f"--input {root}: no Parquet files in split {split!r}")
    return pd.concat(frames, ignore_index=True)


def index_input(uri: str, split: str | None, pattern: str | None) -> InputIndex:
    """One ``--input``: shards, a Kaggle root, a folder of images (plate or not), or one image file."""
    import pandas as pd

    from protein_ray.data import DEFAULT_PLATE_PATTERN, image_folder_index, is_kaggle_root, is_shard_root, kaggle_index

    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise PredictJobError(f"--input {uri}: does not exist")
    if is_shard_root(uri):
        from protein_ray.data import read_manifest

        chosen = _choose_split(list(read_manifest(uri)["counts"]), split, uri)
        rows = _shard_rows(uri, chosen)
        return InputIndex(rows, submission_ids=rows["image_id"].tolist() if chosen == "test" else [])
    if is_kaggle_root(uri):
        available = [s for s, csv in (("test", "submission.csv"), ("train", "train.csv"))
                     if storage.exists(storage.join(uri, csv))]
        chosen = _choose_split(available, split, uri)
        rows = _file_rows(kaggle_index(uri, chosen))
        return InputIndex(rows, submission_ids=rows["image_id"].tolist() if chosen == "test" else [])
    if not storage.is_dir(uri):  # a single image file
        stem = uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return InputIndex(_file_rows(pd.DataFrame({"image_id": [stem], "sources": [[uri]]})))
    index, skipped = image_folder_index(uri, pattern or DEFAULT_PLATE_PATTERN)
    return InputIndex(_file_rows(index), skipped=skipped)


def index_inputs(inputs: list[str], split: str | None = None, pattern: str | None = None) -> InputIndex:
    """All inputs, concatenated in the order given (the order chunks are cut in)."""
    import pandas as pd

    parts = [index_input(uri, split, pattern) for uri in inputs]
    rows = pd.concat([p.rows for p in parts], ignore_index=True)
    rows = rows[["image_id", "source", "plate", "well", "field", "sources", "shard_file", "shard_row"]]
    rows["field"] = rows["field"].astype("Int32")
    duplicated = rows["image_id"].duplicated()
    if duplicated.any():
        logger.warning("%d image ids occur more than once (e.g. %s); each is scored", duplicated.sum(),
                       rows.loc[duplicated, "image_id"].iloc[0])
    return InputIndex(rows, [s for p in parts for s in p.skipped], [i for p in parts for i in p.submission_ids])


def chunk_work(rows: pd.DataFrame, chunk_size: int, chunks: list[int]) -> list[dict]:
    """One Ray Data item per chunk: its rows and where their bytes are, as JSON
    (a plain string column: no nested Arrow types to reconcile across blocks)."""
    items = []
    for chunk in chunks:
        part = rows.iloc[chunk * chunk_size:(chunk + 1) * chunk_size]
        work = [
            {"row": int(row), "shard": shard, "at": int(at)} if isinstance(shard, str)
            else {"row": int(row), "sources": list(sources)}
            for row, sources, shard, at in zip(part.index, part["sources"], part["shard_file"], part["shard_row"])
        ]
        items.append({"chunk": chunk, "work": json.dumps(work)})
    return items


# ------------------------------------------------- decode stage (Ray tasks) --


def read_shard_images(work: list[dict]) -> dict[int, bytes]:
    """Image bytes of the work rows stored in shards, reading only the row groups
    that hold them (a shard file is a few hundred MB; a chunk needs a slice)."""
    wanted = defaultdict(list)
    for item in work:
        if "shard" in item:
            wanted[item["shard"]].append(item)
    found = {}
    for uri, items in wanted.items():
        fs, path = storage.resolve(uri)
        shard = pq.ParquetFile(fs.open_input_file(path))
        starts = np.cumsum([0] + [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
        lo, hi = min(i["at"] for i in items), max(i["at"] for i in items)
        groups = [g for g in range(shard.num_row_groups) if starts[g] <= hi and starts[g + 1] > lo]
        images = shard.read_row_groups(groups, columns=["image"]).column("image")
        for item in items:
            found[item["row"]] = images[item["at"] - int(starts[groups[0]])].as_py()
    return found


def fetch_encoded(item: dict, shard_images: dict[int, bytes]) -> list[bytes] | Exception:
    """The encoded file(s) of one image, or the error that stopped reading them."""
    from protein_ray.imaging import ImageDecodeError

    if "shard" in item:
        return [shard_images[item["row"]]]
    # data.image_folder_index names a stain file it did not find "<missing blue stain>".
    missing = [uri.strip("<>").split()[1] for uri in item["sources"] if uri.startswith("<missing")]
    if missing:
        present = [uri for uri in item["sources"] if not uri.startswith("<missing")]
        return ImageDecodeError("missing_stain", f"no {' or '.join(missing)} stain file next to {present}")
    try:
        return [storage.read_bytes(uri) for uri in item["sources"]]
    except storage.StorageError as error:
        return error


def decode_encoded(encoded: list[bytes] | Exception, max_pixels: int) -> tuple[np.ndarray | None, str, str]:
    """(float image, "", "") or (None, reason, detail). One merged file is decoded;
    per-stain files are merged (red, green, blue)."""
    from protein_ray.imaging import ImageDecodeError, decode_image, merge_channels

    try:
        if isinstance(encoded, Exception):
            raise encoded
        if len(encoded) == 1:
            return decode_image(encoded[0], max_pixels), "", ""
        return merge_channels(encoded, max_pixels), "", ""
    except ImageDecodeError as error:
        return None, error.reason, error.args[0]
    except storage.StorageError as error:
        return None, "unreadable", str(error)
    except Exception as error:  # a decoder library's own failure must not stop the job
        return None, "decode_failed", f"{type(error).__name__}: {error}"


def decode_rows(work: list[dict], shard_images: dict[int, bytes], image_size: int, mean, std,
                max_pixels: int) -> dict:
    """Work rows -> one output row each: preprocessed pixels, or zeros and an error."""
    from protein_ray.imaging import preprocess_batch

    with ThreadPoolExecutor(min(READ_THREADS, len(work))) as pool:
        encoded = list(pool.map(lambda item: fetch_encoded(item, shard_images), work))
    outcomes = [decode_encoded(data, max_pixels) for data in encoded]
    good = [i for i, (image, _, _) in enumerate(outcomes) if image is not None]
    pixels = preprocess_batch([outcomes[i][0] for i in good], image_size, mean, std)
    if len(good) < len(work):
        padded = np.zeros((len(work), 3, image_size, image_size), np.float32)
        padded[good] = pixels
        pixels = padded
    return {
        "row": np.array([item["row"] for item in work], np.int64),
        "error": np.array([reason for _, reason, _ in outcomes], dtype=object),
        "detail": np.array([detail for _, _, detail in outcomes], dtype=object),
        "pixels": pixels,
    }


def decode_chunks(batch: dict, image_size: int, mean, std, max_pixels: int, decode_batch: int):
    """Ray Data map function: chunk items -> blocks of ``decode_batch`` decoded rows.
    Yielding small blocks keeps memory flat and starts the model before a chunk is done."""
    for text in batch["work"]:
        work = json.loads(str(text))
        shard_images = read_shard_images(work)
        for start in range(0, len(work), decode_batch):
            yield decode_rows(work[start:start + decode_batch], shard_images, image_size, mean, std, max_pixels)


# --------------------------------------------------- model stage (actors) ----


class ModelStage:
    """Ray Data callable class: the model, loaded once per actor, on its GPU if it has one."""

    def __init__(self, checkpoint: str, tta: bool, threads: int | None, actors: int, embeddings: bool):
        import os

        import torch

        from protein_ray.predictor import Predictor

        self.predictor = Predictor(checkpoint, tta=tta)
        if self.predictor.device.type == "cpu":
            # Ray starts actors with one thread per reserved CPU; the model is the slow
            # stage on CPU, so by default it gets the node's cores (shared by the actors).
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // actors))
        size = self.predictor.image_size
        # Known up front so that a batch with no decodable image still has the column's width.
        self.embedding_width = self.predictor.embed_batch(np.zeros((1, 3, size, size), np.float32)).shape[1] \
            if embeddings else 0

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not reason for reason in batch["error"]], dtype=bool)
        probs = np.full((len(ok), NUM_CLASSES), np.nan, np.float32)
        out = {"row": batch["row"], "error": batch["error"], "detail": batch["detail"], "probs": probs}
        if self.embedding_width:
            out["embedding"] = np.full((len(ok), self.embedding_width), np.nan, np.float32)
        if ok.any():
            pixels = batch["pixels"][ok]  # a copy: the batch itself is a read-only view
            probs[ok] = self.predictor.predict_batch(pixels)
            if self.embedding_width:
                out["embedding"][ok] = self.predictor.embed_batch(pixels)
        return out


@dataclass
class Resources:
    actors: int
    num_gpus: float
    cpus_per_actor: float
    actor_memory: int


def plan_resources(options: PredictOptions, checkpoint_bytes: int, image_size: int) -> Resources:
    """Defaults from the cluster: one actor per GPU when there are GPUs, else one
    CPU actor. The decode tasks must keep at least one CPU, or nothing feeds the model."""
    import ray

    cluster = ray.cluster_resources()
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 1.0)
    num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if num_gpus > gpus:
        raise PredictJobError(f"--num-gpus {num_gpus} per actor, but the cluster has {gpus:g} GPU(s)")
    actors = options.actors or (max(1, int(gpus // num_gpus)) if num_gpus > 0 else 1)
    if actors * options.cpus_per_actor > cpus - 1:
        raise PredictJobError(
            f"{actors} actor(s) x {options.cpus_per_actor:g} CPU(s) leave no CPU of {cpus:g} for decoding; "
            "lower --actors or --cpus-per-actor"
        )
    # Room for the weights (and their copy while loading) and a batch with its TTA views.
    batch_bytes = options.batch_size * 3 * image_size * image_size * 4 * (5 if options.tta else 2)
    memory = 3 * checkpoint_bytes + batch_bytes + 768 * 2**20  # torch and timm alone take ~500 MB
    return Resources(actors, num_gpus, options.cpus_per_actor, int(memory))


def scoring_dataset(work_items: list[dict], options: PredictOptions, card, resources: Resources):
    """The lazy Ray Dataset: chunk items -> decoded rows (tasks) -> probabilities (actors)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints one progress line per part instead
    items = ray.data.from_items(work_items, override_num_blocks=len(work_items))
    decoded = items.map_batches(
        decode_chunks,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"image_size": card.image_size, "mean": list(card.mean), "std": list(card.std),
                   "max_pixels": options.max_pixels, "decode_batch": options.decode_batch},
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=options.decode_tasks) if options.decode_tasks else None,
    )
    # The model stage's memory request also differs from the decode tasks' resources,
    # which keeps Ray Data from fusing decoding into the actors (it fuses adjacent maps
    # with equal resources), where it would run in series with the model.
    return decoded.map_batches(
        ModelStage,
        batch_size=options.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"checkpoint": options.checkpoint, "tta": options.tta,
                               "threads": options.threads_per_actor, "actors": resources.actors,
                               "embeddings": options.embeddings},
        compute=ray.data.ActorPoolStrategy(size=resources.actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.num_gpus or None,
        memory=resources.actor_memory,
    )


# ------------------------------------------------------------ part files ----


def predictions_schema(with_labels: bool = True) -> pa.Schema:
    """Columns of predictions.parquet (and, without ``labels``, of the part files):
    typed explicitly so that a part whose plates are all unknown still has string columns."""
    columns = [("image_id", pa.string()), ("source", pa.string()), ("plate", pa.string()), ("well", pa.string()),
               ("field", pa.int32())]
    columns += [(column, pa.float32()) for column in PROB_COLUMNS]
    columns += [("labels", pa.string())] if with_labels else []
    return pa.schema(columns + [("error", pa.string()), ("error_detail", pa.string())])


def part_schema(embedding_width: int | None) -> pa.Schema:
    schema = predictions_schema(with_labels=False).insert(0, pa.field("row", pa.int64()))
    if embedding_width:
        schema = schema.append(pa.field("embedding", pa.list_(pa.float32(), embedding_width)))
    return schema


def part_uri(parts: str, chunk: int) -> str:
    return storage.join(parts, f"part-{chunk:06d}.parquet")


def chunk_of_part(uri: str) -> int | None:
    name = uri.rsplit("/", 1)[-1]
    if name.startswith("part-") and name.endswith(".parquet"):
        return int(name[len("part-"):-len(".parquet")])
    return None


def write_atomically(uri: str, data: bytes) -> None:
    """A reader (or a rerun) sees the whole file or none: local files are written
    under a temporary name and renamed; an S3 object appears only once complete."""
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    temporary = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(temporary, data)
    fs, path = storage.resolve(temporary)
    fs.move(path, storage.resolve(uri)[1])


def part_table(index: pd.DataFrame, results: dict) -> pa.Table:
    """A chunk's rows: index metadata joined with the model stage's results, in row order."""
    import pandas as pd

    order = np.argsort(results["row"])
    rows = results["row"][order]
    meta = index.loc[rows, ["image_id", "source", "plate", "well", "field"]].reset_index(drop=True)
    frame = pd.concat([pd.DataFrame({"row": rows}), meta], axis=1)
    probs = results["probs"][order]
    for c, column in enumerate(PROB_COLUMNS):
        frame[column] = probs[:, c]
    errors = results["error"][order]
    frame["error"] = [str(e) if e else None for e in errors]
    frame["error_detail"] = [str(d) if e else None for e, d in zip(errors, results["detail"][order])]
    width = results["embedding"].shape[1] if "embedding" in results else None
    if width:
        frame["embedding"] = [None if e else row for e, row in zip(errors, results["embedding"][order])]
    return pa.Table.from_pandas(frame, schema=part_schema(width), preserve_index=False)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class PartWriter:
    """Driver side of the stream: collects result rows per chunk, writes a chunk's
    part file once all its rows are in, and reports progress."""

    def __init__(self, index: pd.DataFrame, chunk_size: int, chunks: list[int], parts: str):
        self.index, self.chunk_size, self.parts = index, chunk_size, parts
        self.expected = {c: len(index.iloc[c * chunk_size:(c + 1) * chunk_size]) for c in chunks}
        self.pieces: dict[int, list[dict]] = defaultdict(list)
        self.rows_in: dict[int, set[int]] = defaultdict(set)
        self.written: set[int] = set()
        self.images = self.failed = 0
        self.done_before = len(index) - sum(self.expected.values())
        self.started = self.last_report = time.perf_counter()

    def add(self, batch: dict) -> None:
        chunk_ids = batch["row"] // self.chunk_size
        for chunk in map(int, np.unique(chunk_ids)):
            # A row seen before (a retried task's output, in principle) is dropped, so a
            # part never holds a row twice and is written exactly once.
            if chunk in self.written:
                continue
            fresh = (chunk_ids == chunk) & ~np.isin(batch["row"], list(self.rows_in[chunk]))
            self.pieces[chunk].append({key: value[fresh] for key, value in batch.items()})
            self.rows_in[chunk].update(batch["row"][fresh].tolist())
            self.images += int(fresh.sum())
            self.failed += sum(1 for reason in batch["error"][fresh] if reason)
            if len(self.rows_in[chunk]) == self.expected[chunk]:
                self._write(chunk)
        if time.perf_counter() - self.last_report > PROGRESS_EVERY_S:
            self._report(f"{len(self.written)} of {len(self.expected)} parts written")

    def _write(self, chunk: int) -> None:
        pieces = self.pieces.pop(chunk)
        del self.rows_in[chunk]
        results = {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}
        write_atomically(part_uri(self.parts, chunk), parquet_bytes(part_table(self.index, results)))
        self.written.add(chunk)
        self._report(f"part {chunk} written ({len(self.written)} of {len(self.expected)} this run)")

    def _report(self, what: str) -> None:
        self.last_report = now = time.perf_counter()
        done = self.done_before + self.images
        rate = self.images / max(now - self.started, 1e-9)
        logger.info("%s: %d/%d images (%.0f%%), %.1f images/s, %d failed", what, done, len(self.index),
                    100 * done / max(len(self.index), 1), rate, self.failed)

    def check_complete(self) -> None:
        missing = {c: self.expected[c] - len(self.rows_in[c]) for c in self.expected if c not in self.written}
        if missing:
            raise PredictJobError(f"the pipeline returned fewer rows than it was given (chunk: rows missing): {missing}")


# ----------------------------------------------------------- job folder -----


def job_description(options: PredictOptions, index: InputIndex) -> dict:
    """What the parts depend on: a rerun may continue only the same job."""
    return {
        "format": FORMAT,
        "inputs": [storage.absolute(uri) for uri in options.inputs],
        "checkpoint": storage.absolute(options.checkpoint),
        "images": len(index.rows),
        "index_sha256": index.fingerprint(),
        "chunk_size": options.chunk_size,
        "tta": options.tta,
        "embeddings": options.embeddings,
        "max_pixels": options.max_pixels,
    }


def remove_outputs(output: str) -> None:
    for name in OUTPUT_NAMES:
        uri = storage.join(output, name)
        if storage.exists(uri):
            (storage.delete_dir if storage.is_dir(uri) else storage.delete_file)(uri)


def prepare_output(output: str, job: dict, overwrite: bool) -> set[int]:
    """Start or continue the job at ``output``; returns the chunks already written."""
    if overwrite:
        remove_outputs(output)
    job_uri = storage.join(output, JOB_FILE)
    if storage.exists(job_uri):
        previous = json.loads(storage.read_text(job_uri))
        changed = [key for key in job if previous.get(key) != job[key]]
        if changed:
            raise PredictJobError(
                f"{output} holds the parts of a different scoring job (it differs in: {', '.join(changed)}); "
                "pass --overwrite to start afresh, or choose another --output"
            )
    else:
        storage.write_text(job_uri, json.dumps(job, indent=2))
    parts = storage.join(output, PARTS_DIR)
    done = set()
    for uri in storage.list_files(parts, recursive=False) if storage.exists(parts) else []:
        if ".tmp-" in uri.rsplit("/", 1)[-1]:
            storage.delete_file(uri)  # left by an interrupted write; its chunk is rescored
        elif (chunk := chunk_of_part(uri)) is not None:
            done.add(chunk)
    return done


# ------------------------------------------------------------- assembly -----


def read_parts(parts: str) -> pd.DataFrame:
    uris = sorted(u for u in storage.list_files(parts, recursive=False) if chunk_of_part(u) is not None)
    fs, _ = storage.resolve(parts)
    tables = [pq.read_table(storage.resolve(uri)[1], filesystem=fs) for uri in uris]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def label_strings(frame: pd.DataFrame, thresholds, never_empty: bool) -> list[str | None]:
    """Kaggle label strings from the probabilities (None for failed rows)."""
    from protein_ray.metrics import apply_thresholds

    scored = frame["error"].isna().to_numpy()
    labels: list[str | None] = [None] * len(frame)
    if scored.any():
        chosen = apply_thresholds(frame.loc[scored, list(PROB_COLUMNS)].to_numpy(), thresholds, never_empty)
        for position, row in zip(np.flatnonzero(scored), chosen):
            labels[position] = format_label_string(np.flatnonzero(row).tolist())
    return labels


def predictions_frame(parts: pd.DataFrame, thresholds, never_empty: bool) -> pd.DataFrame:
    frame = parts.sort_values("row", ignore_index=True)
    frame["labels"] = label_strings(frame, thresholds, never_empty)
    columns = ["image_id", "source", "plate", "well", "field", *PROB_COLUMNS, "labels", "error", "error_detail"]
    return frame[columns + (["embedding"] if "embedding" in frame else [])]


def submission_frame(predictions: pd.DataFrame, ids: list[str], allow_empty: bool) -> pd.DataFrame:
    """Kaggle's Image,Label for ``ids`` in their order. An image that could not be
    scored still gets a row: empty with ``allow_empty``, else the class most
    probable on average over the scored images (an empty answer always scores 0)."""
    import pandas as pd

    labels = predictions.drop_duplicates("image_id", keep="last").set_index("image_id")["labels"]
    scored = predictions[predictions["error"].isna()]
    if allow_empty:
        fallback = ""
    elif len(scored):
        fallback = str(int(np.argmax(scored[list(PROB_COLUMNS)].to_numpy().mean(axis=0))))
    else:
        fallback = str(MOST_FREQUENT_CLASS)
    column = [labels.get(image_id) for image_id in ids]
    filled = sum(1 for label in column if not isinstance(label, str))
    if filled:
        logger.warning("submission: %d image(s) could not be scored; their Label is %r", filled, fallback)
    return pd.DataFrame({"Image": ids, "Label": [label if isinstance(label, str) else fallback for label in column]})


def write_table(frame: pd.DataFrame, uri: str, schema: pa.Schema | None = None) -> str:
    if uri.endswith(".parquet"):
        storage.write_bytes(uri, parquet_bytes(pa.Table.from_pandas(frame, schema=schema, preserve_index=False)))
    else:
        storage.write_text(uri, frame.to_csv(index=False))
    return uri


def write_outputs(options: PredictOptions, index: InputIndex, thresholds, never_empty: bool) -> tuple[dict, pd.DataFrame]:
    """Final outputs from all part files; returns (output URIs, predictions)."""
    out = options.output
    parts = read_parts(storage.join(out, PARTS_DIR))
    if len(parts) != len(index.rows) or not np.array_equal(np.sort(parts["row"].to_numpy()), np.arange(len(index.rows))):
        raise PredictJobError(f"{out}/{PARTS_DIR} holds {len(parts)} rows for {len(index.rows)} input images; "
                              "rerun with --overwrite")
    predictions = predictions_frame(parts, thresholds, never_empty)
    table = predictions.drop(columns=["embedding"], errors="ignore")
    written = {"predictions_parquet": write_table(table, storage.join(out, "predictions.parquet"), predictions_schema()),
               "predictions_csv": write_table(table, storage.join(out, "predictions.csv"))}
    if options.embeddings:
        embeddings = predictions[["image_id", "embedding"]]
        written["embeddings_parquet"] = write_table(embeddings, storage.join(out, "embeddings.parquet"))
    wells = well_table(table)
    if len(wells):
        written["wells_parquet"] = write_table(wells, storage.join(out, "wells.parquet"))
        written["wells_csv"] = write_table(wells, storage.join(out, "wells.csv"))
        if options.heatmaps:
            written["heatmaps"] = write_heatmaps(wells, storage.join(out, "heatmaps"))
    ids = table["image_id"].tolist() if options.submission else index.submission_ids
    if ids:
        written["submission_csv"] = write_table(submission_frame(table, ids, options.allow_empty),
                                                storage.join(out, "submission.csv"))
    return written, table


# ------------------------------------------------------------------ job ------


def score(options: PredictOptions) -> dict:
    """Run (or continue) a scoring job; returns the summary also written to summary.json.

    Raises ``ErrorRateExceeded`` after writing every output when more than
    ``options.max_error_rate`` of the images could not be scored."""
    from protein_ray.model import read_model_card
    from protein_ray.predictor import model_summary

    started = time.perf_counter()
    options.check()
    options = replace(options, output=storage.absolute(options.output), checkpoint=storage.absolute(options.checkpoint))
    card = read_model_card(options.checkpoint)  # a bad checkpoint fails here, before any Ray work
    index = index_inputs(options.inputs, options.split, options.pattern)
    for uri in index.skipped:
        logger.warning("skipped (not an image by name): %s", uri)
    done = prepare_output(options.output, job_description(options, index), options.overwrite)
    n_chunks = -(-len(index.rows) // options.chunk_size)
    todo = [c for c in range(n_chunks) if c not in done]
    logger.info("%d images in %d chunk(s) of %d; %d chunk(s) already written in %s", len(index.rows), n_chunks,
                options.chunk_size, len(done), options.output)
    writer = PartWriter(index.rows, options.chunk_size, todo, storage.join(options.output, PARTS_DIR))
    if todo:
        run_pipeline(options, card, index, writer)
    scoring_seconds = time.perf_counter() - writer.started
    thresholds = np.asarray(card.thresholds, dtype=np.float32)
    outputs, predictions = write_outputs(options, index, thresholds, never_empty=not options.allow_empty)
    summary = build_summary(options, index, predictions, writer, n_chunks) | {
        "scoring_seconds": round(scoring_seconds, 3),
        "images_per_s": round(writer.images / scoring_seconds, 2) if writer.images else None,
        "total_seconds": round(time.perf_counter() - started, 3),
        "model": model_summary(card, options.checkpoint, thresholds),
        "thresholds": [float(t) for t in thresholds],
        "outputs": outputs,
    }
    storage.write_text(storage.join(options.output, "summary.json"), json.dumps(summary, indent=2))
    if summary["error_rate"] > options.max_error_rate:
        raise ErrorRateExceeded(
            f"{summary['failed']} of {summary['images']} images could not be scored "
            f"({summary['error_rate']:.1%} > --max-error-rate {options.max_error_rate:.1%}): "
            f"{summary['failed_by_reason']}. Outputs were written to {options.output}; "
            "the error column of predictions.csv says why for each image.",
            summary,
        )
    return summary


def run_pipeline(options: PredictOptions, card, index: InputIndex, writer: PartWriter) -> None:
    """Stream the chunks still to do through Ray Data into part files."""
    from protein_ray.runtime import init_ray

    init_ray(options.address)
    weights = storage.file_info(storage.join(options.checkpoint, "model.safetensors")).size
    resources = plan_resources(options, weights, card.image_size)
    logger.info("model stage: %d actor(s) with %g GPU and %g CPU each, batch %d", resources.actors,
                resources.num_gpus, resources.cpus_per_actor, options.batch_size)
    work = chunk_work(index.rows, options.chunk_size, list(writer.expected))
    for batch in scoring_dataset(work, options, card, resources).iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    writer.check_complete()


def build_summary(options: PredictOptions, index: InputIndex, predictions: pd.DataFrame, writer: PartWriter,
                  n_chunks: int) -> dict:
    failed = predictions["error"].notna()
    reasons = predictions.loc[failed, "error"].value_counts().sort_index()
    return {
        "format": FORMAT,
        "inputs": [storage.absolute(uri) for uri in options.inputs],
        "output": options.output,
        "checkpoint": options.checkpoint,
        "tta": options.tta,
        "images": len(predictions),
        "scored": int((~failed).sum()),
        "failed": int(failed.sum()),
        "failed_by_reason": {str(reason): int(count) for reason, count in reasons.items()},
        "error_rate": float(failed.mean()) if len(predictions) else 0.0,
        "max_error_rate": options.max_error_rate,
        "skipped": index.skipped,
        "images_this_run": writer.images,
        "chunks": {"total": n_chunks, "written_this_run": len(writer.written),
                   "already_written": n_chunks - len(writer.expected)},
    }


def format_summary(summary: dict) -> str:
    """The lines the job prints at the end."""
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["failed_by_reason"].items())
    speed = f"{summary['images_per_s']:.1f} images/s" if summary["images_per_s"] else "nothing left to score"
    lines = [
        f"{summary['images']:,} images from {len(summary['inputs'])} input(s): {summary['scored']:,} scored, "
        f"{summary['failed']:,} failed" + (f" ({reasons})" if reasons else ""),
        f"this run: {summary['images_this_run']:,} images in {summary['scoring_seconds']:.1f} s ({speed}); "
        f"{summary['chunks']['already_written']} of {summary['chunks']['total']} chunk(s) were already written",
    ]
    if summary["skipped"]:
        shown = ", ".join(summary["skipped"][:10]) + (" ..." if len(summary["skipped"]) > 10 else "")
        lines.append(f"skipped {len(summary['skipped'])} file(s) that are not images by name: {shown}")
    lines.append(f"outputs in {summary['output']}: " + ", ".join(sorted(summary["outputs"])) + ", summary.json")
    return "\n".join(lines)


# -------------------------------------------------------------- the demo ----


def score_demo_plate(checkpoint: str, out: str, wells: int = 96, fields: int = 2, size: int = 128,
                     channels: str = "merged", bit_depth: int = 8, seed: int = 11, workers: int | None = None,
                     **options) -> dict:
    """Write a synthetic plate with planted per-well labels to ``out/plate``, score
    it into ``out/scores`` and compare the per-well results with what was planted.

    Returns the job summary plus ``planted_vs_predicted`` (one record per class:
    wells with/without the class, mean probability in each, AUC) and
    ``plate_dir``; also writes ``out/scores/planted_vs_predicted.csv``.
    ``options`` are PredictOptions fields (batch_size, actors, tta, ...)."""
    import pandas as pd

    from protein_ray.runtime import init_ray
    from protein_ray.synthetic import write_plate_dataset

    plate = write_plate_dataset(storage.join(out, "plate"), plates=1, wells=wells, fields=fields, channels=channels,
                                bit_depth=bit_depth, size=size, seed=seed, workers=workers, progress=False)
    init_ray(options.pop("address", None))
    summary = score(PredictOptions(checkpoint=checkpoint, inputs=[plate["out"]], output=storage.join(out, "scores"),
                                   **options))
    wells_table = pd.read_csv(summary["outputs"]["wells_csv"])
    planted = pd.read_csv(plate["wells_csv"], dtype=str, keep_default_na=False)
    agreement = compare_with_planted(wells_table, planted)
    storage.write_text(storage.join(out, "scores", "planted_vs_predicted.csv"), agreement.to_csv(index=False))
    return {**summary, "plate_dir": plate["out"], "planted_vs_predicted": agreement.to_dict("records")}


# ------------------------------------------------------------------ CLI ------


def run_predict(args: argparse.Namespace) -> None:
    options = PredictOptions.from_args(args)
    try:
        summary = score(options)
    except ErrorRateExceeded as error:
        print(format_summary(error.summary))
        raise
    print(format_summary(summary))


OUTPUTS_HELP = """\
outputs (under --output):
  predictions.parquet, predictions.csv  one row per input image: image_id, source,
        plate, well, field, prob_<class> per class, labels (Kaggle ids), error
        (empty, or why the image was not scored), error_detail
  wells.parquet, wells.csv   per well: images scored/failed, mean_prob_<class>,
        frac_pos_<class> (when file names carry plate and well)
  heatmaps/<plate>/<class>.png  fraction of positive fields per well
  submission.csv  Kaggle Image,Label (Kaggle test split, or --submission)
  embeddings.parquet  penultimate-layer features (--embeddings)
  summary.json    counts, failures by reason, skipped files, images/s, model
  parts/, job.json  the job's progress: rerun the same command to continue it
"""


def add_predict_command(commands) -> None:
    from protein_ray.cli import add_address_option

    parser = commands.add_parser(
        "predict",
        help="score images in bulk with Ray Data: per-image predictions, per-well tables, plate heatmaps",
        description="Score Parquet shards, a Kaggle root, a folder of images or a plate-scan folder (merged RGB "
        "or one file per stain; 8/16-bit PNG, TIFF, JPEG), local or s3://. Decoding runs in CPU tasks, the "
        "model on an actor pool (GPU when present). Every image gets one output row: probabilities or the "
        "reason it failed. Rerunning the same command on the same --output continues an interrupted job.",
        epilog=OUTPUTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint directory (local or s3://)")
    parser.add_argument("--input", required=True, action="append", dest="inputs", metavar="URI",
                        help="shards root, Kaggle root, image/plate folder or image file (repeatable)")
    parser.add_argument("--output", required=True, metavar="URI", help="output folder (local or s3://)")
    parser.add_argument("--split", default=None,
                        help="split of a Kaggle root or shards to score (default: test, else the only split)")
    parser.add_argument("--pattern", default=None, metavar="REGEX",
                        help="file-name pattern with named groups plate, well, field[, stain] "
                        "(default: <plate>_<well>_f<field>[_red|_green|_blue].<ext>)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per model actor (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="logical CPUs per model actor (default 1)")
    parser.add_argument("--threads-per-actor", type=int, default=None,
                        help="torch threads per CPU model actor (default: the node's cores / actors)")
    parser.add_argument("--decode-tasks", type=int, default=None,
                        help="at most this many decode tasks at once (default: as many as free CPUs allow)")
    parser.add_argument("--decode-batch", type=int, default=16, help="images per decoded block (default 16)")
    parser.add_argument("--chunk-size", type=int, default=512,
                        help="images per part file, the unit a rerun skips (default 512)")
    parser.add_argument("--tta", action="store_true", help="average flips and a 90-degree turn (4x the compute)")
    parser.add_argument("--embeddings", action="store_true",
                        help="also write penultimate-layer features per image (embeddings.parquet)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"refuse images with more pixels than this (default {MAX_PIXELS:,})")
    parser.add_argument("--max-error-rate", type=float, default=0.05,
                        help="exit non-zero when more than this fraction of images fail (default 0.05); "
                        "outputs are written either way")
    parser.add_argument("--allow-empty", action="store_true",
                        help="let an image have no label (default: at least its most probable class)")
    parser.add_argument("--submission", action="store_true",
                        help="write submission.csv for every image (automatic for a Kaggle test split)")
    parser.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="skip the plate heatmaps")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete this job's earlier outputs at --output and start afresh")
    add_address_option(parser)
    parser.set_defaults(handler=run_predict)
