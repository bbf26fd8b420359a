"""Final outputs from the part files: predictions (with QC flags), wells, plates (Z′, edge
effects), heatmaps, profiles, submission, embeddings and the HTML report."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from protein_ray import storage
from protein_ray.checkpoint import ModelCard
from protein_ray.inputs import InputIndex
from protein_ray.labels import format_label_string
from protein_ray.metrics import apply_thresholds
from protein_ray.plate_map import attach_plate_map
from protein_ray.plates import good_fields, prob_columns, well_table, write_heatmaps
from protein_ray.qc import QcThresholds, flag_fields, measure_names
from protein_ray.report import write_report
from protein_ray.scoring.decode import load_fields
from protein_ray.scoring.options import PredictJobError, PredictOptions
from protein_ray.scoring.parts import PARTS_DIR, chunk_of_part, parquet_bytes, predictions_schema
from protein_ray.screening import add_robust_z, plate_table, well_profiles

logger = logging.getLogger(__name__)

# Most frequent class of the real data (DESIGN.md section 9): the submission's last
# resort for an image that could not be scored when nothing else was scored either.
MOST_FREQUENT_CLASS = "Nucleoplasm"


def read_parts(parts: str) -> pd.DataFrame:
    uris = sorted(u for u in storage.list_files(parts, recursive=False) if chunk_of_part(u) is not None)
    fs, _ = storage.resolve(parts)
    tables = [pq.read_table(storage.resolve(uri)[1], filesystem=fs) for uri in uris]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def label_strings(frame: pd.DataFrame, classes: list[str], thresholds, never_empty: bool) -> list[str | None]:
    """Kaggle label strings from the probabilities (None for failed rows)."""
    scored = frame["error"].isna().to_numpy()
    labels: list[str | None] = [None] * len(frame)
    if scored.any():
        chosen = apply_thresholds(frame.loc[scored, prob_columns(classes)].to_numpy(), thresholds, never_empty)
        for position, row in zip(np.flatnonzero(scored), chosen):
            labels[position] = format_label_string(np.flatnonzero(row).tolist(), num_classes=len(classes))
    return labels


def predictions_frame(parts: pd.DataFrame, classes: list[str], thresholds, never_empty: bool,
                      qc_names: list[str], qc_thresholds: QcThresholds) -> pd.DataFrame:
    frame = parts.sort_values("row", ignore_index=True)
    frame["labels"] = label_strings(frame, classes, thresholds, never_empty)
    columns = ["image_id", "source", "plate", "well", "field", *prob_columns(classes), "labels", "error",
               "error_detail"]
    if qc_names:
        # Flags need every field of a plate: its own distribution sets the thresholds.
        frame["qc_flags"] = flag_fields(frame[["plate", *qc_names]], qc_thresholds)
        columns += [*qc_names, "qc_flags"]
    return frame[columns + (["embedding"] if "embedding" in frame else [])]


def submission_frame(predictions: pd.DataFrame, classes: list[str], ids: list[str], allow_empty: bool) -> pd.DataFrame:
    """Kaggle's Image,Label for ``ids`` in their order. An image that could not be
    scored still gets a row: empty with ``allow_empty``, else the class most
    probable on average over the scored images (an empty answer always scores 0)."""
    labels = predictions.drop_duplicates("image_id", keep="last").set_index("image_id")["labels"]
    scored = predictions[predictions["error"].isna()]
    if allow_empty:
        fallback = ""
    elif len(scored):
        fallback = str(int(np.argmax(scored[prob_columns(classes)].to_numpy().mean(axis=0))))
    else:
        fallback = str(classes.index(MOST_FREQUENT_CLASS) if MOST_FREQUENT_CLASS in classes else 0)
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


def write_outputs(options: PredictOptions, index: InputIndex, card: ModelCard, thresholds,
                  plate_map: pd.DataFrame | None = None) -> tuple[dict, pd.DataFrame]:
    """Final outputs from all part files; returns (output URIs, predictions)."""
    out = options.output
    parts = read_parts(storage.join(out, PARTS_DIR))
    if len(parts) != len(index.rows) or not np.array_equal(np.sort(parts["row"].to_numpy()), np.arange(len(index.rows))):
        raise PredictJobError(f"{out}/{PARTS_DIR} holds {len(parts)} rows for {len(index.rows)} input images; "
                              "rerun with --overwrite")
    classes = card.class_names
    qc_names = measure_names(card.preprocessing.stain_names) if options.qc else []
    predictions = predictions_frame(parts, classes, thresholds, not options.allow_empty, qc_names,
                                    qc_thresholds(options))
    table = predictions.drop(columns=["embedding"], errors="ignore")
    schema = predictions_schema(classes, qc_names)
    written = {"predictions_parquet": write_table(table, storage.join(out, "predictions.parquet"), schema),
               "predictions_csv": write_table(table, storage.join(out, "predictions.csv"))}
    if options.embeddings:
        embeddings = predictions[["image_id", "embedding"]]
        written["embeddings_parquet"] = write_table(embeddings, storage.join(out, "embeddings.parquet"))
    wells = add_robust_z(attach_plate_map(well_table(table, classes), plate_map), classes)
    plates = plate_table(wells, classes)
    if len(wells):
        if options.heatmaps:
            written["heatmaps"] = write_heatmaps(wells, storage.join(out, "heatmaps"), classes)
        written |= write_screen_tables(out, wells, plates)
        if options.embeddings:
            profiles = well_profiles(predictions, good_fields(predictions), wells)
            written["profiles_parquet"] = write_table(profiles, storage.join(out, "profiles.parquet"))
    ids = table["image_id"].tolist() if options.submission else index.submission_ids
    if ids:
        written["submission_csv"] = write_table(submission_frame(table, classes, ids, options.allow_empty),
                                                storage.join(out, "submission.csv"))
    if options.report:
        written["report_html"] = write_job_report(options, index, card, table, wells, plates)
    return written, table


def qc_thresholds(options: PredictOptions) -> QcThresholds:
    return QcThresholds(mad_k=options.qc_mad, min_focus=options.qc_min_focus,
                        max_saturated=options.qc_max_saturated, min_foreground=options.qc_min_foreground)


def write_screen_tables(out: str, wells: pd.DataFrame, plates: pd.DataFrame) -> dict:
    return {"wells_parquet": write_table(wells, storage.join(out, "wells.parquet")),
            "wells_csv": write_table(wells, storage.join(out, "wells.csv")),
            "plates_parquet": write_table(plates, storage.join(out, "plates.parquet")),
            "plates_csv": write_table(plates, storage.join(out, "plates.csv"))}


def write_job_report(options: PredictOptions, index: InputIndex, card: ModelCard, predictions: pd.DataFrame,
                     wells: pd.DataFrame, plates: pd.DataFrame) -> str:
    """report.html; thumbnails are decoded again from the inputs, for the few fields it shows."""
    preprocessing = card.preprocessing.with_bits(options.bit_depth)

    def load(image_ids: list[str]) -> dict:
        rows = index.rows[index.rows["image_id"].isin(image_ids)]  # keeps the row numbers shards are read by
        return load_fields(rows, preprocessing, options.max_pixels)

    title = f"protein-ray: {', '.join(options.inputs)}"
    return write_report(storage.join(options.output, "report.html"), predictions, wells, plates, card.class_names,
                        preprocessing.stain_names, load, title=title)
