"""Bulk scoring throughput, as ratios measured in one run (DESIGN.md section 7).

On the same images and model, with the same torch threads for the model:

  (a) the model alone on already decoded, preprocessed tensors: the compute limit
  (b) a plain PyTorch DataLoader loop over the files: what a user writes without us
      (workers decode + preprocess with the same functions, the main process runs
      the model)
  (c) ``protein_ray.scoring.score``: Ray Data end to end, from listing the folder to
      predictions.parquet/csv, wells, heatmaps and summary.json

It runs (a), (b), (c) in rounds and prints the best images/s of each (on a shared
machine other work changes every rate from minute to minute), c/a and c/b, where
the time of (c) went (start-up of the model actor and decode workers until the
first part file; the rate from the first part file to the last; the final
outputs), and peak memory: the sampled resident memory of the whole process tree
in each phase (Ray's processes are descendants of this one; Ray starts just before
the first (c), so (a) and (b) of round 1 are measured without it) and
``ru_maxrss`` of this process and of its largest child.

    python benchmarks/predict_throughput.py                     # resnet18 @ 256 px, 384 images of 512 px
    python benchmarks/predict_throughput.py --images 96 --backbone test_resnet --image-size 64 --size 128

Data and checkpoint are cached under --out; throughput does not depend on the
weights, so the checkpoint is an untrained one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/predict", help="cache and output folder")
    parser.add_argument("--images", type=int, default=384, help="images to score (rounded up to whole plates' fields)")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic images in pixels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256, help="model input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the model, all three")
    parser.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="DataLoader workers in (b) and decode tasks in (c)")
    parser.add_argument("--chunk-size", type=int, default=64, help="(c): images per part file")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a), (b), (c); the best of each counts")
    parser.add_argument("--sample-rss-of", type=int, default=None, help=argparse.SUPPRESS)  # PeakMemory's sampler
    return parser.parse_args(argv)


# ---------------------------------------------------------------- memory ----


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc (Linux)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    members, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in members]
        members.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in members)


def sample_tree_rss(root: int, every_s: float = 0.25) -> None:
    """Sampler process: print the peak tree RSS of ``root`` (less its own) once stdin closes."""
    peak = 0
    while not select.select([sys.stdin], [], [], every_s)[0]:
        peak = max(peak, tree_rss_bytes(root) - tree_rss_bytes(os.getpid()))
    print(peak)


class PeakMemory:
    """Peak resident memory of this process tree while a phase runs, sampled by a
    small separate process: a thread here would take the GIL from the model's Python
    code in (a) and (b) but not in (c), whose model runs in a Ray actor; a forked
    child would make this process copy its pages on write."""

    peak = 0

    def __enter__(self):
        self._sampler = subprocess.Popen([sys.executable, __file__, "--sample-rss-of", str(os.getpid())],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.peak = int(self._sampler.communicate("")[0] or 0)  # closing stdin ends the sampler


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ------------------------------------------------------------------ setup ----


def prepare(args) -> tuple[list[Path], str]:
    """Synthetic plate images (cached) and an untrained checkpoint (cached)."""
    import torch

    from protein_ray.checkpoint import ModelCard, save_checkpoint
    from protein_ray.imaging import Preprocessing
    from protein_ray.model import create_model
    from protein_ray.synthetic import write_plate_dataset

    out = Path(args.out)
    fields = max(1, math.ceil(args.images / 96))
    plate = write_plate_dataset(out / "data", wells=96, fields=fields, size=args.size, seed=0, progress=True)
    checkpoint = out / f"checkpoint-{args.backbone}-{args.image_size}"
    if not (checkpoint / "config.json").exists():
        torch.manual_seed(0)
        save_checkpoint(checkpoint, create_model(args.backbone), ModelCard(backbone=args.backbone, preprocessing=Preprocessing(args.image_size)))
    files = sorted(Path(plate["out"]).rglob("*.png"))
    return files, str(checkpoint)


# ------------------------------------------------------------ the phases ----


def model_alone(files, checkpoint, args) -> float:
    """(a) images/s of predict_batch on tensors decoded beforehand (not timed)."""
    from protein_ray.imaging import decode_image
    from protein_ray.predictor import Predictor

    predictor = Predictor(checkpoint, device="cpu")
    tensors = predictor.preprocess([decode_image(path.read_bytes()) for path in files])
    predictor.predict_batch(tensors[: args.batch_size])  # warm-up: first call allocates
    started = time.perf_counter()
    for start in range(0, len(tensors), args.batch_size):
        predictor.predict_batch(tensors[start:start + args.batch_size])
    return len(tensors) / (time.perf_counter() - started)


class FileDataset:
    """What a user writes: read, decode and preprocess one file per item."""

    def __init__(self, files, preprocessing):
        self.files, self.preprocessing = files, preprocessing

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from protein_ray.imaging import decode_image, preprocess_batch

        return preprocess_batch([decode_image(self.files[i].read_bytes())], self.preprocessing)[0]


def dataloader_loop(files, checkpoint, args) -> float:
    """(b) images/s of a DataLoader (workers decode) feeding the model in this process."""
    from torch.utils.data import DataLoader

    from protein_ray.predictor import Predictor

    predictor = Predictor(checkpoint, device="cpu")
    predictor.predict_batch(np.zeros((1, 3, args.image_size, args.image_size), np.float32))  # same warm-up as (a)
    dataset = FileDataset(files, predictor.preprocessing)
    started = time.perf_counter()
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.decode_workers)
    for batch in loader:
        predictor.predict_batch(batch.numpy())
    return len(files) / (time.perf_counter() - started)


def our_pipeline(files, checkpoint, args) -> tuple[float, dict]:
    """(c) images/s of the whole job, and where its time went: start-up until the
    first part file, the steady rate from the first part file to the last, and the
    final outputs (predictions, wells, heatmaps, summary) after the last."""
    from protein_ray.scoring.job import score
    from protein_ray.scoring.options import PredictOptions

    output = Path(args.out) / "scores"
    started = time.time()
    summary = score(PredictOptions(
        checkpoint=checkpoint, inputs=[str(files[0].parents[1])], output=str(output), overwrite=True,
        batch_size=args.batch_size, threads_per_actor=args.threads, decode_tasks=args.decode_workers,
        chunk_size=args.chunk_size, max_error_rate=0.0,
    ))
    finished = time.time()
    parts = sorted(p.stat().st_mtime for p in (output / "parts").glob("part-*.parquet"))
    phases = {
        "until first part": parts[0] - started,
        "steady images/s": (summary["images"] - args.chunk_size) / (parts[-1] - parts[0]) if len(parts) > 1 else float("nan"),
        "outputs after last part": finished - parts[-1],
    }
    return summary["images"] / (finished - started), phases


def ray_is_running() -> bool:
    import ray

    return ray.is_initialized()


def start_ray(args) -> float:
    import ray

    started = time.perf_counter()
    # Ray runs its workers at nice 15; on a machine shared with other work they would
    # get less CPU than (a) and (b), which run at nice 0. (No effect on an idle machine.)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Logical CPUs: one for the model actor, the rest for the decode tasks.
    ray.init(num_cpus=args.decode_workers + 1, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def one_round(files, checkpoint, args, number: int) -> dict:
    """(a), (b), (c) once each, back to back; images/s and peak tree RSS of each."""
    figures = {}
    for name, phase in (("a", model_alone), ("b", dataloader_loop), ("c", our_pipeline)):
        if name == "c" and not ray_is_running():
            print(f"ray.init: {start_ray(args):.1f} s (not counted)")
        with PeakMemory() as memory:
            result = phase(files, checkpoint, args)
        rate, phases = result if name == "c" else (result, None)
        figures[name], figures[f"{name}_rss"] = rate, memory.peak
        if phases:
            figures.update(phases)
    print(f"round {number}: (a) {figures['a']:6.2f}  (b) {figures['b']:6.2f}  (c) {figures['c']:6.2f} images/s; "
          f"(c) took {figures['until first part']:.1f} s to its first part, then ran at "
          f"{figures['steady images/s']:.2f} images/s, then {figures['outputs after last part']:.1f} s "
          "for the final outputs", flush=True)
    return figures


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.sample_rss_of:
        return sample_tree_rss(args.sample_rss_of)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray
    import torch

    torch.set_num_threads(args.threads)
    files, checkpoint = prepare(args)
    print(f"predict throughput: {len(files)} images of {args.size} px -> {args.backbone} at {args.image_size} px, "
          f"batch {args.batch_size}, {args.threads} torch threads for the model, {args.decode_workers} decode "
          f"worker(s), {os.cpu_count()} cores; {args.rounds} rounds of (a), (b), (c)")
    # Other work on a shared machine changes every rate from minute to minute; the best
    # of several rounds is each method's figure least disturbed by it.
    rounds = [one_round(files, checkpoint, args, n + 1) for n in range(args.rounds)]
    best = {key: max(r[key] for r in rounds) for key in ("a", "b", "c", "steady images/s", "c_rss")}
    best |= {key: rounds[0][key] for key in ("a_rss", "b_rss")}  # round 1: before Ray started
    ray.shutdown()  # lets this process reap Ray's processes, so RUSAGE_CHILDREN covers them

    a, b, c, steady = best["a"], best["b"], best["c"], best["steady images/s"]
    print(f"(a) model alone on decoded tensors : {a:8.2f} images/s   peak RSS {gib(best['a_rss'])} (process tree)")
    print(f"(b) PyTorch DataLoader loop         : {b:8.2f} images/s   peak RSS {gib(best['b_rss'])}")
    print(f"(c) protein-ray predict, end to end : {c:8.2f} images/s   peak RSS {gib(best['c_rss'])}")
    print(f"    (c) between its first and last part file: {steady:.2f} images/s")
    print(f"c/a = {c / a:.2f}   c/b = {c / b:.2f}   steady state: c/a = {steady / a:.2f}, c/b = {steady / b:.2f}")
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"ru_maxrss: this process {gib(self_kib * 1024)}, largest child {gib(child_kib * 1024)}")


if __name__ == "__main__":
    main()
