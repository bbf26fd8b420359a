"""Part files and the job folder: how a job's results survive an interruption.

Each chunk's rows land in ``parts/part-<chunk>.parquet``, written once and
atomically when the chunk is complete; ``job.json`` says which job the parts
belong to, so a rerun continues only the same job.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from protein_ray import storage
from protein_ray.inputs import InputIndex
from protein_ray.plates import prob_columns
from protein_ray.scoring.options import PredictJobError, PredictOptions

logger = logging.getLogger(__name__)

FORMAT = "protein-ray predictions v2"  # v2: image-QC columns
JOB_FILE = "job.json"
PARTS_DIR = "parts"
OUTPUT_NAMES = (
    JOB_FILE, PARTS_DIR, "predictions.parquet", "predictions.csv", "wells.parquet", "wells.csv",
    "plates.parquet", "plates.csv", "profiles.parquet", "report.html", "heatmaps", "submission.csv",
    "embeddings.parquet", "summary.json",
)
PROGRESS_EVERY_S = 10.0
# Errors a rerun retries: the file may be readable next time (a storage outage).
TRANSIENT_ERRORS = ("unreadable",)


def predictions_schema(classes: Sequence[str], qc_names: Sequence[str] = (), with_labels: bool = True) -> pa.Schema:
    """Columns of predictions.parquet (and, without ``labels`` and ``qc_flags``, of the part
    files): typed explicitly so that a part whose plates are all unknown still has string columns."""
    columns = [("image_id", pa.string()), ("source", pa.string()), ("plate", pa.string()), ("well", pa.string()),
               ("field", pa.int32())]
    columns += [(column, pa.float32()) for column in prob_columns(classes)]
    columns += [("labels", pa.string())] if with_labels else []
    columns += [("error", pa.string()), ("error_detail", pa.string())]
    columns += [(name, pa.float32()) for name in qc_names]
    columns += [("qc_flags", pa.string())] if with_labels and qc_names else []
    return pa.schema(columns)


def part_schema(classes: Sequence[str], qc_names: Sequence[str], embedding_width: int | None) -> pa.Schema:
    schema = predictions_schema(classes, qc_names, with_labels=False).insert(0, pa.field("row", pa.int64()))
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


def part_table(index: pd.DataFrame, classes: Sequence[str], qc_names: Sequence[str], results: dict) -> pa.Table:
    """A chunk's rows: index metadata joined with the model stage's results, in row order."""
    order = np.argsort(results["row"])
    rows = results["row"][order]
    meta = index.loc[rows, ["image_id", "source", "plate", "well", "field"]].reset_index(drop=True)
    frame = pd.concat([pd.DataFrame({"row": rows}), meta], axis=1)
    probs = results["probs"][order]
    for c, column in enumerate(prob_columns(classes)):
        frame[column] = probs[:, c]
    errors = results["error"][order]
    frame["error"] = [str(e) if e else None for e in errors]
    frame["error_detail"] = [str(d) if e else None for e, d in zip(errors, results["detail"][order])]
    for m, name in enumerate(qc_names):
        frame[name] = results["qc"][order, m]
    width = results["embedding"].shape[1] if "embedding" in results else None
    if width:
        frame["embedding"] = [None if e else row for e, row in zip(errors, results["embedding"][order])]
    return pa.Table.from_pandas(frame, schema=part_schema(classes, qc_names, width), preserve_index=False)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class PartWriter:
    """Driver side of the stream: collects result rows per chunk, writes a chunk's
    part file once all its rows are in, and reports progress."""

    def __init__(self, index: pd.DataFrame, classes: Sequence[str], chunk_size: int, chunks: list[int], parts: str,
                 qc_names: Sequence[str] = ()):
        self.index, self.classes, self.chunk_size, self.parts = index, classes, chunk_size, parts
        self.qc_names = list(qc_names)
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
        storage.write_bytes(part_uri(self.parts, chunk), parquet_bytes(part_table(self.index, self.classes, self.qc_names, results)))
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
        "layout": [options.layout, options.pattern, options.channel_map],
        "bit_depth": options.bit_depth,
        "qc": options.qc,
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
        if storage.TEMPORARY_INFIX in uri.rsplit("/", 1)[-1]:
            storage.delete_file(uri)  # left by an interrupted write; its chunk is rescored
        elif (chunk := chunk_of_part(uri)) is not None and not has_transient_errors(uri):
            done.add(chunk)
    return done


def has_transient_errors(part: str) -> bool:
    """Whether a part holds rows that failed for a reason a rerun may not meet
    (its chunk is then scored again; its other rows come out the same)."""
    fs, path = storage.resolve(part)
    errors = pq.read_table(path, columns=["error"], filesystem=fs).column("error").to_pylist()
    return any(error in TRANSIENT_ERRORS for error in errors)
