"""Synthetic Human Protein Atlas–like data sets, with planted labels, written to disk.

The pictures come from :mod:`protein_ray.synthetic_cells`; this module samples
label sets with the real data's frequencies, renders images over a process pool
and writes dataset folders. Two layouts live here: the Kaggle one (train/test
folders plus CSVs) and a plate-scan one (``P001/P001_A01_f1.png``; or one file per
stain, 8- or 16-bit); vendor plate exports are in :mod:`protein_ray.synthetic_exports`.
Image ``i`` draws its randomness from ``SeedSequence([seed, split, i])`` so a
seed yields the same bytes whatever the worker count or order. Folders are built
in a staging folder and swapped in whole, with a manifest that lets a rerun with
the same arguments reuse them.

Plates can carry a screen's controls (``controls=True``, ``plate_map.csv``): columns 1-2
are negative wells (DMSO) showing the most common real label set without the target
class (Nucleoplasm, or Cytosol when the target is Nucleoplasm), the last two columns
are positive wells showing the target class alone, at full strength (the protein moved
there), the rest are samples. The default target is Plasma membrane:
against the Nucleoplasm baseline a tiny CNN (3 conv layers, 64 px, 192 images) told it
apart fastest of the distinct patterns (validation AUC 0.97 after 15 steps and 0.999
after 60; Mitochondria 0.84 / 0.999, Nucleoli 0.78 / 0.94, Nuclear speckles 0.68 / 0.82),
and it is the third most frequent class, so a model trained on the synthetic set
sees it often. Plates can also carry bad fields for image QC (``plant_qc=True``), field 1
of three sample wells of every plate (``PLANTED_QC``): C05 out of focus (a Gaussian of
``PLANTED_DEFOCUS`` px at 512 added to the optics, before the sensor noise), D06 a
fluorescent particle that clips ``PLANTED_SATURATED_AREA`` of the green stain, E07 no
cells (camera offset and noise only). Their labels stay the well's: the well has them,
that field failed to show them.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from protein_ray import storage
from protein_ray.labels import CLASS_NAMES, format_label_string, parse_label_string
from protein_ray.synthetic_cells import render_background, render_field

logger = logging.getLogger(__name__)

# Bump when the pictures change, so that "reuse an existing dataset" regenerates.
GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"
STAINS = ("red", "green", "blue")  # HPA's per-channel file suffixes
# Streams of the seed: each split/purpose draws from its own SeedSequence branch.
TRAIN, TEST, PLATE, TRAIN_LABELS, TEST_LABELS, PLATE_LABELS, EXPORT, EXPORT_LABELS = range(8)
DEFAULT_TARGET = "Plasma membrane"  # the positive controls' class (module docstring: why)
CONTROL_COLUMNS = 2  # negatives in the first two plate columns, positives in the last two
# Bad fields planted for image QC: (well, field) -> what is wrong with it; all in sample wells.
PLANTED_QC = {("C05", 1): "blurred", ("D06", 1): "saturated", ("E07", 1): "empty"}
PLANTED_DEFOCUS = 5.0  # Gaussian sigma in px at 512: 2.5-6x the camera's own blur (0.8-2 px)
PLANTED_SATURATED_AREA = 0.15  # a particle at full scale over 15% of the field, in the green stain


# ----------------------------------------------------------------------------- labels
@lru_cache(maxsize=1)
def _label_set_table() -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """The 127 real label sets and their probabilities (from 19,236 real images)."""
    resource = importlib.resources.files("protein_ray") / "resources" / "label_set_counts.csv"
    with resource.open("r", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sets = tuple(tuple(parse_label_string(row["label_set"])) for row in rows)
    counts = np.array([float(row["count"]) for row in rows])
    return sets, counts / counts.sum()


def sample_label_sets(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Draw ``n`` label sets with the real data's label-set frequencies."""
    sets, probabilities = _label_set_table()
    picks = rng.choice(len(sets), size=n, p=probabilities)
    return [list(sets[i]) for i in picks]


# ----------------------------------------------------------------------------- writing images
def _write_field(job: _Job, rng: np.random.Generator) -> None:
    """The Kaggle and plate layouts' writer: one RGB render saved as ``job.fmt``."""
    image = _planted_field(job, rng) if job.qc else render_field(job.labels, job.size, rng)
    _save(image, job.stem, job.fmt)


def _planted_field(job: _Job, rng: np.random.Generator) -> np.ndarray:
    """A field with a planted QC fault (``job.qc``): out of focus, a saturated particle, or no cells."""
    if job.qc == "empty":
        return render_background(job.size, len(STAINS), rng)
    if job.qc == "blurred":
        return render_field(job.labels, job.size, rng, defocus=PLANTED_DEFOCUS)
    image = render_field(job.labels, job.size, rng)
    image[..., 1] = np.minimum(image[..., 1] + saturated_particle(job.size), 1)
    return image


def saturated_particle(size: int) -> np.ndarray:
    """A bright fluorescent particle: exactly 1.0 on a disc of ``PLANTED_SATURATED_AREA`` of the
    field (so the saturated fraction is known), fading out over a few pixels around it."""
    yy, xx = np.ogrid[:size, :size]
    distance = np.hypot(yy + 0.5 - 0.4 * size, xx + 0.5 - 0.6 * size)
    radius = size * math.sqrt(PLANTED_SATURATED_AREA / math.pi)
    halo = np.exp(-(((distance - radius) / (4 * size / 512 + 0.5)) ** 2)) * 0.6
    return np.where(distance <= radius, np.float32(1), halo).astype(np.float32)


@dataclass(frozen=True)
class _Job:
    """One image to render and save: picklable, so it can go to a worker process."""

    entropy: tuple[int, ...]  # SeedSequence entropy: fixes the image whatever the worker
    labels: tuple[int, ...]
    size: int
    stem: str  # path without extension (vendor exports: the image path, with a {channel} field)
    fmt: str  # "png" | "tif16" | "png-separate" | "tif16-separate", or a vendor export's name
    # Renders and saves the job; a module-level function, so the job stays picklable.
    write: Callable[[_Job, np.random.Generator], None] = _write_field
    drop: tuple[int, ...] = ()  # vendor exports: channel numbers whose files are left out
    qc: str = ""  # plate layout: a planted QC fault ("blurred", "saturated", "empty") or none


def _save(image: np.ndarray, stem: str, fmt: str) -> None:
    """8-bit PNG or 16-bit TIFF; merged RGB, or one grayscale file per stain (``-separate``)."""
    sixteen = fmt.startswith("tif16")
    pixels = np.rint(image * (65535 if sixteen else 255)).astype(np.uint16 if sixteen else np.uint8)
    planes = {"": pixels}
    if fmt.endswith("-separate"):
        planes = {f"_{stain}": np.ascontiguousarray(pixels[..., c]) for c, stain in enumerate(STAINS)}
    for suffix, plane in planes.items():
        if sixteen:
            tifffile.imwrite(f"{stem}{suffix}.tif", plane, photometric="rgb" if plane.ndim == 3 else "minisblack")
        else:
            Image.fromarray(plane).save(f"{stem}{suffix}.png", compress_level=3)  # level 3: fast, nearly as small


def _render_jobs(jobs: Sequence[_Job]) -> int:
    for job in jobs:
        rng = np.random.default_rng(np.random.SeedSequence(list(job.entropy)))
        job.write(job, rng)
    return len(jobs)


def _run_jobs(jobs: Sequence[_Job], workers: int | None, progress: bool, what: str) -> None:
    """Render all jobs, in chunks over a process pool (or in this process for one worker)."""
    workers = max(1, workers or os.cpu_count() or 1)
    # Chunks amortise pickling/IPC, yet stay small enough to balance the load and update the bar.
    chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    with tqdm(total=len(jobs), desc=what, unit="img", disable=not progress) as bar:
        if workers == 1 or len(chunks) == 1:
            for part in chunks:
                bar.update(_render_jobs(part))
            return
        # Not plain fork: callers may hold Ray/torch threads, and forking those can deadlock.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
            for done in as_completed([pool.submit(_render_jobs, part) for part in chunks]):
                bar.update(done.result())


# ----------------------------------------------------------------------------- dataset folders
def _existing_dataset(out: Path, args: dict) -> dict | None:
    """The stored summary when ``out`` already holds this exact dataset; raise if it is foreign."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"{out} exists, is not empty and is not a synthetic dataset (no readable "
                              f"{MANIFEST}); choose another folder or empty it first") from None
    if manifest.get("args") == args:
        return manifest.get("summary", {})
    logger.warning("replacing the synthetic dataset in %s (made with %s)", out, manifest.get("args"))
    return None


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder next to ``out`` that replaces it only if the body finishes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / storage.INCOMPLETE_MARKER).write_text("generation did not finish\n")
    try:
        yield tmp
        (tmp / storage.INCOMPLETE_MARKER).unlink()
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)  # keep the old one until the new one is in place
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _generate(out: Path, args: dict, workers, progress, build: Callable[[Path], tuple[list[_Job], dict]]) -> dict:
    """Shared frame of both layouts: reuse, stage, render, write the manifest, time it."""
    summary = _existing_dataset(out, args)
    if summary is not None:
        logger.info("reusing the synthetic dataset in %s", out)
        return _resolved(summary, out, reused=True)
    start = time.perf_counter()
    with _staging(out) as tmp:
        jobs, summary = build(tmp)
        _run_jobs(jobs, workers, progress, f"synthetic {args['kind']}")
        seconds = time.perf_counter() - start
        summary.update(images=len(jobs), seconds=round(seconds, 3),
                       images_per_s=round(len(jobs) / max(seconds, 1e-9), 2))
        (tmp / MANIFEST).write_text(json.dumps({"args": args, "summary": summary}, indent=2))
    logger.info("wrote %d synthetic images to %s in %.1f s", len(jobs), out, seconds)
    return _resolved(summary, out, reused=False)


def _resolved(summary: dict, out: Path, reused: bool) -> dict:
    """The manifest keeps paths relative (the folder may move); callers get full ones."""
    paths = {key: str(out / value) for key, value in summary.items() if key.endswith(("_csv", "_dir"))}
    return {**summary, **paths, "out": str(out), "reused": reused}


def write_kaggle_dataset(out: str | Path, n_train: int = 2000, n_test: int = 500, size: int = 512,
                         seed: int = 0, workers: int | None = None, progress: bool = True) -> dict:
    """Write the Kaggle layout (train/, test/, train.csv, submission.csv, test_labels.csv)."""
    if n_train < 0 or n_test < 0 or size < 16:
        raise ValueError("n_train and n_test must be >= 0 and size >= 16")
    out = Path(out).absolute()
    args = dict(kind="kaggle", n_train=n_train, n_test=n_test, size=size, seed=seed, version=GENERATOR_VERSION)

    def build(tmp: Path) -> tuple[list[_Job], dict]:
        jobs = []
        for split, prefix, n, stream, label_stream in (
                ("train", "syn", n_train, TRAIN, TRAIN_LABELS), ("test", "syntest", n_test, TEST, TEST_LABELS)):
            (tmp / split).mkdir()
            label_sets = sample_label_sets(n, np.random.default_rng([seed, label_stream]))
            ids = [f"{prefix}{i:06d}" for i in range(n)]
            rows = [(image_id, format_label_string(labels)) for image_id, labels in zip(ids, label_sets)]
            _write_csv(tmp / ("train.csv" if split == "train" else "test_labels.csv"), ("Image", "Label"), rows)
            if split == "test":
                _write_csv(tmp / "submission.csv", ("Image", "Label"), [(image_id, "") for image_id in ids])
            jobs += [_Job((seed, stream, i), tuple(labels), size, str(tmp / split / image_id), "png")
                     for i, (image_id, labels) in enumerate(zip(ids, label_sets))]
        return jobs, dict(args, train_csv="train.csv", submission_csv="submission.csv",
                          test_labels_csv="test_labels.csv", train_dir="train", test_dir="test")

    return _generate(out, args, workers, progress, build)


def well_names(wells: int) -> list[str]:
    """``A01``..``H12`` for 96 wells, ``A01``..``P24`` for 384 (row-major)."""
    shapes = {96: (8, 12), 384: (16, 24)}
    if wells not in shapes:
        raise ValueError(f"wells must be 96 or 384, not {wells}")
    rows, columns = shapes[wells]
    return [f"{chr(ord('A') + r)}{c + 1:02d}" for r in range(rows) for c in range(columns)]


def write_plate_dataset(out: str | Path, plates: int = 1, wells: int = 96, fields: int = 4,
                        channels: str = "merged", bit_depth: int = 8, size: int = 512, seed: int = 0,
                        workers: int | None = None, progress: bool = True, controls: bool = False,
                        target: str | None = None, plant_qc: bool = False) -> dict:
    """Write plate folders ``P001/P001_A01_f1.png`` (or one file per stain) with planted labels.

    Every well gets one label set (real frequencies); all its fields show it. The truth is
    in ``ground_truth.csv`` (per image) and ``wells.csv`` (per well). ``controls`` adds
    negative and positive control wells for ``target`` (a class name, default
    ``DEFAULT_TARGET``) and ``plate_map.csv`` (plate, well, role, target, compound);
    ``plant_qc`` plants the bad fields of ``PLANTED_QC`` in every plate and adds a
    ``planted_qc`` column to ``ground_truth.csv``. Sample wells are the same either way.
    """
    if channels not in ("merged", "separate"):
        raise ValueError(f"channels must be 'merged' or 'separate', not {channels!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    if plates < 1 or fields < 1 or size < 16:
        raise ValueError("plates and fields must be >= 1 and size >= 16")
    if target is not None and not controls:
        raise ValueError("target names the positive controls' class: it needs controls=True")
    names = well_names(wells)
    target_id = _class_id(target or DEFAULT_TARGET) if controls else None
    out = Path(out).absolute()
    fmt = ("png" if bit_depth == 8 else "tif16") + ("-separate" if channels == "separate" else "")
    args = dict(kind="plate", plates=plates, wells=wells, fields=fields, channels=channels,
                bit_depth=bit_depth, size=size, seed=seed, version=GENERATOR_VERSION)
    # New options are recorded only when used: a default data set keeps its manifest (and reuse).
    if controls:
        args.update(controls=True, target=CLASS_NAMES[target_id])
    if plant_qc:
        args.update(plant_qc=True)

    def build(tmp: Path) -> tuple[list[_Job], dict]:
        jobs, truth, well_rows, map_rows = _plate_jobs(tmp, names, plates, fields, size, seed, fmt, target_id, plant_qc)
        _write_csv(tmp / "ground_truth.csv", ("plate", "well", "field", "image_id", "labels")
                   + (("planted_qc",) * plant_qc), truth)
        _write_csv(tmp / "wells.csv", ("plate", "well", "labels"), well_rows)
        extra = {}
        if controls:
            _write_csv(tmp / "plate_map.csv", ("plate", "well", "role", "target", "compound"), map_rows)
            extra.update(plate_map_csv="plate_map.csv")
        if plant_qc:
            extra.update(planted_qc=[[well, field, flag] for (well, field), flag in PLANTED_QC.items()])
        return jobs, dict(args, ground_truth_csv="ground_truth.csv", wells_csv="wells.csv",
                          plate_names=[f"P{p + 1:03d}" for p in range(plates)],
                          files=len(jobs) * (3 if channels == "separate" else 1), **extra)

    return _generate(out, args, workers, progress, build)


def _plate_jobs(tmp: Path, names: Sequence[str], plates: int, fields: int, size: int, seed: int, fmt: str,
                target_id: int | None, plant_qc: bool) -> tuple[list[_Job], list, list, list]:
    """The render jobs and the rows of ground_truth.csv, wells.csv and plate_map.csv.

    Sample wells draw their labels as without controls, and every field its pixels from
    ``(seed, PLATE, plate, well, field)``: controls and planted faults change only their own wells.
    """
    wells = len(names)
    well_labels = sample_label_sets(plates * wells, np.random.default_rng([seed, PLATE_LABELS]))
    layout = _control_layout(names, target_id) if target_id is not None else {}
    jobs, truth, well_rows, map_rows, compounds = [], [], [], [], 0
    for p in range(plates):
        plate = f"P{p + 1:03d}"
        (tmp / plate).mkdir()
        for w, well in enumerate(names):
            role, labels = layout.get(well, ("sample", well_labels[p * wells + w]))
            well_rows.append((plate, well, format_label_string(labels)))
            compounds += role == "sample"  # each sample well gets its own compound
            map_rows.append((plate, well, role, *_control_columns(role, target_id, compounds)))
            for f in range(1, fields + 1):
                image_id = f"{plate}_{well}_f{f}"
                planted = PLANTED_QC.get((well, f), "") if plant_qc else ""
                truth.append((plate, well, f, image_id, format_label_string(labels)) + ((planted,) * plant_qc))
                jobs.append(_Job((seed, PLATE, p, w, f), tuple(labels), size, str(tmp / plate / image_id), fmt,
                                 qc=planted))
    return jobs, truth, well_rows, map_rows


def _class_id(name: str) -> int:
    lowered = [c.lower() for c in CLASS_NAMES]
    if name.strip().lower() not in lowered:
        raise ValueError(f"target must be one of the classes {', '.join(CLASS_NAMES)}; not {name!r}")
    return lowered.index(name.strip().lower())


def baseline_labels(target_id: int) -> tuple[int, ...]:
    """The negative controls' label set: the most frequent real set without the target."""
    sets, probabilities = _label_set_table()
    lacking = [i for i in np.argsort(-probabilities, kind="stable") if target_id not in sets[i]]
    return sets[lacking[0]]


def _control_layout(names: Sequence[str], target_id: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Control wells -> (role, labels): negatives in the first columns, positives in the last."""
    columns = sorted({int(name[1:]) for name in names})
    negative, positive = columns[:CONTROL_COLUMNS], columns[-CONTROL_COLUMNS:]
    layout = {}
    for name in names:
        if int(name[1:]) in negative:
            layout[name] = ("negative", baseline_labels(target_id))
        elif int(name[1:]) in positive:
            layout[name] = ("positive", (target_id,))
    return layout


def _control_columns(role: str, target_id: int | None, compound: int) -> tuple[str, str]:
    """plate_map.csv's target and compound columns for a well of ``role``."""
    if role == "negative":
        return "", "DMSO"
    if role == "positive":
        return CLASS_NAMES[target_id], f"control-{CLASS_NAMES[target_id].lower().replace(' ', '-')}"
    return "", f"cmpd-{compound:04d}"
