"""The scoring job on the driver: options -> index -> pipeline -> outputs -> summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from protein_ray import storage
from protein_ray.checkpoint import ModelCard, read_model_card, resolve_checkpoint, weights_bytes
from protein_ray.inputs import InputIndex, resolve_inputs
from protein_ray.plate_map import read_plate_map
from protein_ray.predictor import model_summary
from protein_ray.qc import measure_names
from protein_ray.runtime import init_ray
from protein_ray.scoring.decode import chunk_work
from protein_ray.scoring.options import ErrorRateExceeded, PredictOptions
from protein_ray.scoring.outputs import write_outputs
from protein_ray.scoring.parts import FORMAT, PARTS_DIR, PartWriter, job_description, prepare_output
from protein_ray.scoring.pipeline import plan_resources, scoring_dataset
from protein_ray.sources import InputOptions, parse_channel_map

logger = logging.getLogger(__name__)


def score(options: PredictOptions) -> dict:
    """Run (or continue) a scoring job; returns the summary also written to summary.json.

    Raises ``ErrorRateExceeded`` after writing every output when more than
    ``options.max_error_rate`` of the images could not be scored."""
    started = time.perf_counter()
    options.check()
    # A run folder stands for its best epoch; a bad checkpoint fails here, before any Ray work.
    options = replace(options, output=storage.absolute(options.output),
                      checkpoint=resolve_checkpoint(options.checkpoint))
    card = read_model_card(options.checkpoint)
    index = resolve_inputs(options.inputs, input_options(options, card))
    for uri in index.skipped:
        logger.warning("skipped: %s", uri)
    # Read now: a bad plate map fails before any image is scored.
    plate_map = read_plate_map(options.plate_map, card.class_names) if options.plate_map else None
    done = prepare_output(options.output, job_description(options, index), options.overwrite)
    n_chunks = -(-len(index.rows) // options.chunk_size)
    todo = [c for c in range(n_chunks) if c not in done]
    logger.info("%d images in %d chunk(s) of %d; %d chunk(s) already written in %s", len(index.rows), n_chunks,
                options.chunk_size, len(done), options.output)
    qc_names = measure_names(card.preprocessing.stain_names) if options.qc else ()
    writer = PartWriter(index.rows, card.class_names, options.chunk_size, todo, storage.join(options.output, PARTS_DIR),
                        qc_names)
    if todo:
        run_pipeline(options, card, index, writer)
    scoring_seconds = time.perf_counter() - writer.started
    thresholds = np.asarray(card.thresholds, dtype=np.float32)
    outputs, predictions = write_outputs(options, index, card, thresholds, plate_map)
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


def input_options(options: PredictOptions, card: ModelCard) -> InputOptions:
    """How to read the inputs for this checkpoint: its stains, its classes."""
    stains = card.preprocessing.stain_names
    return InputOptions(split=options.split, layout=options.layout, pattern=options.pattern, stains=stains,
                        channel_map=parse_channel_map(options.channel_map, stains),
                        num_classes=len(card.class_names))


def run_pipeline(options: PredictOptions, card: ModelCard, index: InputIndex, writer: PartWriter) -> None:
    """Stream the chunks still to do through Ray Data into part files."""
    import ray

    init_ray(options.address)
    batches = sum(-(-images // options.batch_size) for images in writer.expected.values())
    resources = plan_resources(options, ray.cluster_resources(), weights_bytes(options.checkpoint),
                               card.preprocessing, batches)
    logger.info("model stage: %d actor(s) with %g GPU and %g CPU each, batch %d; %s", resources.actors,
                resources.num_gpus, resources.cpus_per_actor, options.batch_size,
                "the actors decode their images" if resources.decode_in_actors else "decode tasks feed them")
    # Actors that decode take one model batch at a time; decode tasks take whole chunks.
    item_size = options.batch_size if resources.decode_in_actors else options.chunk_size
    work = chunk_work(index.rows, options.chunk_size, list(writer.expected), item_size)
    preprocessing = card.preprocessing.with_bits(options.bit_depth)
    dataset = scoring_dataset(work, options, preprocessing, resources)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
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
        "qc_flagged": qc_counts(predictions),
        "images_this_run": writer.images,
        "chunks": {"total": n_chunks, "written_this_run": len(writer.written),
                   "already_written": n_chunks - len(writer.expected)},
    }


def qc_counts(predictions: pd.DataFrame) -> dict:
    """Fields per QC flag (a field may carry more than one)."""
    if "qc_flags" not in predictions:
        return {}
    flags = predictions["qc_flags"].fillna("").str.split(";").explode()
    return {str(flag): int(count) for flag, count in flags[flags != ""].value_counts().sort_index().items()}


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
    if summary["qc_flagged"]:
        flagged = ", ".join(f"{flag} {count}" for flag, count in summary["qc_flagged"].items())
        lines.append(f"image QC flagged: {flagged} (kept in predictions, left out of well aggregates)")
    lines.append(f"outputs in {summary['output']}: " + ", ".join(sorted(summary["outputs"])) + ", summary.json")
    if "report_html" in summary["outputs"]:
        lines.append(f"report: {summary['outputs']['report_html']}")
    return "\n".join(lines)
