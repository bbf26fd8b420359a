"""What a scoring job is asked to do, checked before any work starts.

Light on imports: the command line builds its ``--help`` from these defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields

from protein_ray.defaults import MAX_PIXELS


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
    layout: str = "auto"  # folders: auto, kaggle, plate, imagexpress, phenix
    pattern: str | None = None  # folders: file-name regex with named groups (overrides the layout's)
    channel_map: str | None = None  # "1=blue,2=green,...": file channel -> the checkpoint's stain
    bit_depth: int | None = None  # read 16-bit files as this many bits (12-bit cameras); default: the checkpoint's
    batch_size: int = 32  # images per model call
    actors: int | None = None  # model actors (default: one per GPU; else one per CPU, up to the model batches)
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
    plate_map: str | None = None  # CSV: plate, well, role (negative/positive/sample/empty), free columns
    qc: bool = True  # measure focus, foreground and saturation per field; flagged fields leave well aggregates
    qc_mad: float = 3.0  # a field is flagged beyond this many robust SDs of its plate
    qc_min_focus: float | None = None  # absolute QC thresholds instead of the plate-derived ones
    qc_max_saturated: float | None = None
    qc_min_foreground: float | None = None
    report: bool = True  # report.html: heatmaps, Z′, QC, top wells, failures
    overwrite: bool = False
    address: str | None = None

    @classmethod
    def defaults(cls) -> dict:
        """Field name -> default value: the command line shows and uses these."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

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
            (self.bit_depth is not None and not 8 <= self.bit_depth <= 16, "--bit-depth must be between 8 and 16"),
            (self.qc_mad <= 0, "--qc-mad must be above 0"),
        ]
        for failed, message in problems:
            if failed:
                raise PredictJobError(message)
