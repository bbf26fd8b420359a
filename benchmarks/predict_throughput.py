"""Bulk scoring: cost versus job size, against this machine's limit, as ratios from one run.

On the same images and model, with the same torch threads for the model:

  limit  what the machine's cores can do at all: cores / (CPU seconds per image of
         the decode stage + CPU seconds per image of the model), each measured
         here on its own (the decode stage as the job runs it: read, decode, image
         QC, resize; the model at the batch size, on 1 thread and on --threads
         threads, whichever costs less CPU per image), in this process with glibc's
         malloc keeping freed memory as the job's CPU actors do
         (``runtime.keep_freed_memory_for_reuse``); printed first also with glibc's
         defaults, for comparison. With --device cuda (``gpu_check.sh``): the lesser
         of the model's images/s on the GPU and what the cores but one (the model
         actor's) decode, as the job's decode tasks do beside the GPU
  (a)    the model alone on already decoded tensors
  (b)    a plain PyTorch DataLoader loop over the files: what a user writes without
         us (workers decode + preprocess with the same functions, the main process
         runs the model)
  (c)    ``protein_ray.scoring.score``, end to end, from listing the folders to
         predictions.parquet/csv, wells, plates, heatmaps, report.html and
         summary.json, on jobs of --sizes images (96, 768 and 3,072 by default)

For (c) it prints the time of each job, its peak memory (the sampled resident
memory of the whole process tree: Ray's processes are descendants of this one),
where its time went (until the first part file; the rate from the first part file
to the last; the final outputs), and the line ``time = fixed + images / marginal``
fitted through the job times: the fixed seconds every job pays and the marginal
rate at which it grows, each rate also as a fraction of the limit. For the steady
part of each job it then prints the cores used by the job's workers, the driver and
Ray's other processes, and the workers' images/s per core they had against the
limit's per core: near 1, the workers turn their CPU into images at the limit's cost,
and their share of the cores is what the steady rate can reach. With
--layout-rounds N it then scores one job N times in each CPU layout the job can run
(1-thread actors that decode, the default; one actor on all cores that decodes; one
actor fed by a decode task), interleaved, and prints each against its limit.

    python benchmarks/predict_throughput.py                     # resnet18 @ 256 px, 512-px PNGs, ~12 min
    python benchmarks/predict_throughput.py --sizes 96 --layout-rounds 2   # + 6 jobs of 768 images, ~10 min more
    python benchmarks/predict_throughput.py --sizes 96 384 --backbone test_resnet --image-size 64 --size 128

The images are the synthetic plate's 384 fields (cached under --out) repeated
under new plate names, which costs the same to decode as new pixels would; the
checkpoint is an untrained one, since throughput does not depend on the weights.
Ray starts before the first job, and one job of the smallest size runs first (both
printed, not counted): a cluster is up before a job runs, and the first Ray Data job on
a cluster also creates Ray Data's detached helper actors (stats, actor locations,
autoscaling coordinator), which then serve every later job on it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from process_tree import CPU_GROUPS, TreeSampler

UNIQUE_FIELDS = 384  # generated once; larger jobs repeat them under other plate names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/predict", help="cache and output folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 768, 3072], help="images per job (c)")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic images in pixels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=256, help="model input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for the model in (a), (b)")
    parser.add_argument("--device", default="cpu", help="where (a) and (b) run the model: cpu or cuda (the job "
                        "itself uses the cluster's GPUs when it has any)")
    # The job's own defaults on CPU: one 1-thread actor per core, each decoding its own images.
    parser.add_argument("--actors", type=int, default=None, help="(c): model actors (default: the job's)")
    parser.add_argument("--actor-threads", type=int, default=None,
                        help="(c): torch threads per model actor (default: the job's, cores / actors)")
    parser.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="DataLoader workers in (b)")
    parser.add_argument("--decode-tasks", type=int, default=None,
                        help="(c): decode tasks feeding the actors (default: the job's; on CPU the actors decode)")
    parser.add_argument("--chunk-size", type=int, default=64, help="(c): images per part file")
    parser.add_argument("--reference-images", type=int, default=384, help="images for the limit, (a) and (b)")
    parser.add_argument("--bracket-images", type=int, default=96,
                        help="images for the limit measured again before and after each job (c)")
    parser.add_argument("--layout-rounds", type=int, default=0,
                        help="then score the job of --layout-images this many times in each CPU layout, interleaved")
    parser.add_argument("--layout-images", type=int, default=768, help="images per job of the layout comparison")
    return parser.parse_args(argv)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ------------------------------------------------------------------ setup ----


def prepare(args) -> tuple[list[Path], str]:
    """The synthetic plate's fields and an untrained checkpoint (both cached)."""
    import torch

    from protein_ray.checkpoint import ModelCard, save_checkpoint
    from protein_ray.imaging import Preprocessing
    from protein_ray.model import create_model
    from protein_ray.synthetic import write_plate_dataset

    out = Path(args.out)
    plate = write_plate_dataset(out / "data", wells=96, fields=UNIQUE_FIELDS // 96, size=args.size, seed=0,
                                progress=True)
    checkpoint = out / f"checkpoint-{args.backbone}-{args.image_size}"
    if not (checkpoint / "config.json").exists():
        torch.manual_seed(0)
        save_checkpoint(checkpoint, create_model(args.backbone), ModelCard(backbone=args.backbone, preprocessing=Preprocessing(args.image_size)))
    return sorted(Path(plate["out"]).rglob("*.png")), str(checkpoint)


def job_folder(fields: list[Path], images: int, root: Path) -> Path:
    """A folder of ``images`` plate images: the fields hard-linked under plate names
    P001, P002, ... (the same bytes, so the same decode cost, as new pixels)."""
    folder = root / f"job-{images}"
    if len(list(folder.rglob("*.png"))) == images:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for number in range(images):
        source = fields[number % len(fields)]
        plate = f"P{number // len(fields) + 1:03d}"
        target = folder / plate / source.name.replace(source.parent.name, plate, 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    return folder


# ------------------------------------------------------------- the limit ----


def decode_cost_s(fields: list[Path], preprocessing) -> float:
    """CPU seconds per image of the decode stage as the job runs it (read, decode,
    QC measures, resize to model pixels), on one core."""
    import torch

    from protein_ray.defaults import MAX_PIXELS
    from protein_ray.scoring.decode import decode_rows

    torch.set_num_threads(1)  # as in a decode task, which reserves one CPU
    work = [{"row": i, "sources": [str(path)]} for i, path in enumerate(fields)]
    decode_rows(work[:16], {}, preprocessing, MAX_PIXELS, measure_qc=True)  # warm-up
    started = time.process_time()
    for start in range(0, len(work), 16):
        decode_rows(work[start:start + 16], {}, preprocessing, MAX_PIXELS, measure_qc=True)
    return (time.process_time() - started) / len(work)


def model_cost(predictor, tensors: np.ndarray, batch_size: int, threads: int) -> tuple[float, float]:
    """Images/s of the model alone on decoded tensors, and its CPU seconds per image
    (wall time x threads: the cores it holds while it runs)."""
    import torch

    torch.set_num_threads(threads)
    predictor.predict_batch(tensors[:batch_size])  # warm-up: the first call allocates
    started = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        predictor.predict_batch(tensors[start:start + batch_size])
    seconds = time.perf_counter() - started
    return len(tensors) / seconds, seconds * threads / len(tensors)


def measure_limit(predictor, files: list[Path], tensors: np.ndarray, batch_size: int, thread_counts: list[int]) -> dict:
    """The machine's limit. On CPU: cores / (decode stage + model) CPU seconds per image,
    the model on whichever of ``thread_counts`` costs the least CPU. On a GPU the model
    and the decoding run side by side: the lesser of the model's images/s on the GPU and
    what the cores left beside its actor's one decode. Also the model's images/s at each
    thread count."""
    decode_s = decode_cost_s(files, predictor.preprocessing)
    costs = {threads: model_cost(predictor, tensors, batch_size, threads) for threads in thread_counts}
    model_threads = min(costs, key=lambda threads: costs[threads][1])
    model_rate, model_s = costs[model_threads]
    cores = os.cpu_count() or 1
    if predictor.device.type == "cpu":
        rate, bound = cores / (decode_s + model_s), "decode + model on the cores"
    else:
        decode_rate = max(1, cores - 1) / decode_s
        rate, bound = min(model_rate, decode_rate), ("the model on the GPU" if model_rate <= decode_rate
                                                     else f"decoding on {max(1, cores - 1)} cores")
    return {"decode_ms": 1000 * decode_s, "model_ms": 1000 * model_s, "model_threads": model_threads,
            "images_per_s": rate, "bound": bound, "device": predictor.device.type,
            "rates": {threads: rate for threads, (rate, _) in costs.items()}}


class FileDataset:
    """What a user writes: read, decode and preprocess one file per item."""

    def __init__(self, files, preprocessing):
        self.files, self.preprocessing = files, preprocessing

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from protein_ray.imaging import decode_image, preprocess_batch

        return preprocess_batch([decode_image(self.files[i].read_bytes())], self.preprocessing)[0]


def dataloader_loop(predictor, files, args) -> float:
    """(b) images/s of a DataLoader (workers decode) feeding the model in this process."""
    from torch.utils.data import DataLoader

    started = time.perf_counter()
    loader = DataLoader(FileDataset(files, predictor.preprocessing), batch_size=args.batch_size,
                        num_workers=args.decode_workers)
    for batch in loader:
        predictor.predict_batch(batch.numpy())
    return len(files) / (time.perf_counter() - started)


# ------------------------------------------------------------- the jobs ----


def scoring_job(folder: Path, checkpoint: str, args) -> dict:
    """(c) on one folder: seconds, peak memory and where the time went."""
    from protein_ray.scoring.job import score
    from protein_ray.scoring.options import PredictOptions

    output = Path(args.out) / f"scores-{folder.name}"
    started = time.time()
    with TreeSampler() as sampler:
        summary = score(PredictOptions(
            checkpoint=checkpoint, inputs=[str(folder)], output=str(output), overwrite=True,
            batch_size=args.batch_size, actors=args.actors, threads_per_actor=args.actor_threads,
            decode_tasks=args.decode_tasks,
            chunk_size=args.chunk_size, max_error_rate=0.0,
        ))
    finished = time.time()
    parts = sorted(p.stat().st_mtime for p in (output / "parts").glob("part-*.parquet"))
    first_chunk = min(args.chunk_size, summary["images"])
    return {
        "images": summary["images"], "seconds": finished - started, "rss": sampler.peak,
        "until first part": parts[0] - started,
        # Two or more intervals between parts: with fewer the rate is noise (96 images make 2 parts).
        "steady": (summary["images"] - first_chunk) / (parts[-1] - parts[0]) if len(parts) > 2 else math.nan,
        "outputs": finished - parts[-1],
        "steady cores": sampler.cores_used(parts[0], parts[-1]) if len(parts) > 2 else dict.fromkeys(CPU_GROUPS, math.nan),
    }


def fit_line(jobs: list[dict]) -> tuple[float, float]:
    """time = fixed + images / marginal, least squares through the jobs."""
    slope, fixed = np.polyfit([job["images"] for job in jobs], [job["seconds"] for job in jobs], 1)
    return float(fixed), 1.0 / float(slope)


def start_ray(args) -> float:
    import ray

    started = time.perf_counter()
    # Ray runs its workers at nice 15; on a machine shared with other work they would
    # get less CPU than (a) and (b), which run at nice 0. (No effect on an idle machine.)
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Logical CPUs: the cores, or one per model actor and decode task if that is more.
    cpus = max(os.cpu_count() or 1, (args.actors or 1) + (args.decode_tasks or 0))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - started


def print_report(limit: dict, a: float, b: float, jobs: list[dict]) -> None:
    rate = limit["images_per_s"]
    if limit["device"] == "cpu":
        print(f"\nlimit: {os.cpu_count()} cores / ({limit['decode_ms']:.1f} ms decode stage + {limit['model_ms']:.1f} ms "
              f"model on {limit['model_threads']} thread(s)) CPU per image = {rate:.2f} images/s")
    else:
        print(f"\nlimit: the lesser of the model alone on the {limit['device']} device "
              f"({limit['rates'][limit['model_threads']]:.2f} images/s) and {max(1, (os.cpu_count() or 1) - 1)} cores "
              f"decoding at {limit['decode_ms']:.1f} ms CPU per image = {rate:.2f} images/s, set by {limit['bound']}")
    print(f"(a) model alone on decoded tensors : {a:7.2f} images/s")
    print(f"(b) PyTorch DataLoader loop         : {b:7.2f} images/s   ({b / rate:.2f} of the limit)")
    print("\n(c) each job against the limit measured just before and after it (limit/s: the mean); over the "
          "limit: seconds beyond images / limit")
    print(f"    {'images':>6} {'seconds':>8} {'limit/s':>8} {'drift':>6} {'images/s':>9} {'/limit':>7} {'over limit s':>13} "
          f"{'first part s':>13} {'steady/s':>9} {'/limit':>7} {'outputs s':>10} {'peak RSS':>10}")
    for job in jobs:
        e2e = job["images"] / job["seconds"]
        print(f"    {job['images']:6d} {job['seconds']:8.1f} {job['limit']:8.2f} {limit_drift(job):6.0%} {e2e:9.2f} "
              f"{e2e / job['limit']:7.2f} "
              f"{job['seconds'] - job['images'] / job['limit']:13.1f} {job['until first part']:13.1f} "
              f"{job['steady']:9.2f} {job['steady'] / job['limit']:7.2f} {job['outputs']:10.1f} {gib(job['rss']):>10}")
    if len(jobs) > 1:
        fixed, marginal = fit_line(jobs)
        mean_limit = float(np.mean([job["limit"] for job in jobs]))
        print(f"\n(c) time = {fixed:.1f} s fixed + images / {marginal:.2f} per s  (marginal {marginal / mean_limit:.2f} "
              f"of the jobs' mean limit, {marginal / b:.2f} of (b))")
    largest = max(jobs, key=lambda job: job["images"])
    print(f"(c) on {largest['images']} images: end to end {largest['images'] / largest['seconds'] / largest['limit']:.2f} "
          f"of the limit, steady {largest['steady'] / largest['limit']:.2f} of the limit; c/b end to end "
          f"{largest['images'] / largest['seconds'] / b:.2f} (b measured at the start)")
    print(f"(c) the limit moved by up to {max(map(limit_drift, jobs)):.0%} between a job's two measurements (drift): "
          "the host's speed changes under the jobs too, so a ratio is no surer than that")
    print_steady_cpu(jobs)


def print_steady_cpu(jobs: list[dict]) -> None:
    """Where the cores went between a job's first and last part file. The workers' rate
    per core they had, against the limit's per core, says how well they use their
    share; their share of the cores is the most of the limit the steady rate can reach."""
    cores = os.cpu_count() or 1
    print(f"\n(c) CPU in the steady part (first part file to last), in cores of {cores}; the workers' images/s per "
          "core they had, as a fraction of the limit's per core")
    print(f"    {'images':>6} {'job workers':>12} {'driver':>7} {'Ray, other':>11} {'per worker core':>16} "
          f"{'workers share':>14} {'steady/limit':>13}")
    for job in jobs:
        used = job["steady cores"]
        workers = used[CPU_GROUPS[0]] or math.nan  # none seen: no rate per core to give
        print(f"    {job['images']:6d} {workers:12.2f} {used[CPU_GROUPS[1]]:7.2f} {used[CPU_GROUPS[2]]:11.2f} "
              f"{job['steady'] / workers / (job['limit'] / cores):16.2f} {workers / cores:14.2f} "
              f"{job['steady'] / job['limit']:13.2f}")


def limit_drift(job: dict) -> float:
    """How far the limit moved across a job, as a fraction of its mean."""
    return abs(job["limit after"] - job["limit before"]) / job["limit"]


# The CPU layouts the job can run: the default, and what --actors/--decode-tasks select.
LAYOUTS = {
    "1-thread actors that decode (default)": {},
    "1 actor on all cores that decodes": {"actors": 1},
    "1 actor on all cores + 1 decode task": {"actors": 1, "decode_tasks": 1},
}


def compare_layouts(fields, checkpoint, args, predictor, bracket, before, model_threads: int) -> list[dict]:
    """The same job in each layout, --layout-rounds times, interleaved (A B C A B C ...)
    so that the host's drift falls on every layout alike; each against its bracket."""
    folder = job_folder(fields, args.layout_images, Path(args.out) / "jobs")
    limit_before, runs = before["images_per_s"], []
    for round_ in range(args.layout_rounds):
        for name, options in LAYOUTS.items():
            job = scoring_job(folder, checkpoint, argparse.Namespace(**vars(args) | options))
            limit_after = measure_limit(predictor, *bracket, args.batch_size, [model_threads])["images_per_s"]
            runs.append(job | {"layout": name, "round": round_, "limit": (limit_before + limit_after) / 2})
            print(f"(layouts) round {round_ + 1}, {name}: {job['seconds']:.1f} s", flush=True)
            limit_before = limit_after
    return runs


def print_layouts(runs: list[dict]) -> None:
    if not runs:
        return
    print(f"\nlayouts, interleaved, {runs[0]['images']} images per job (each against the limit measured around it)")
    print(f"    {'layout':<40} {'round':>5} {'seconds':>8} {'/limit':>7} {'steady/limit':>13} {'first part s':>13}")
    for run in runs:
        print(f"    {run['layout']:<40} {run['round'] + 1:5d} {run['seconds']:8.1f} "
              f"{run['images'] / run['seconds'] / run['limit']:7.2f} {run['steady'] / run['limit']:13.2f} "
              f"{run['until first part']:13.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from protein_ray.imaging import decode_image
    from protein_ray.predictor import Predictor
    from protein_ray.runtime import keep_freed_memory_for_reuse

    fields, checkpoint = prepare(args)
    reference = [fields[i % len(fields)] for i in range(args.reference_images)]
    print(f"predict throughput: {args.size}-px PNGs -> {args.backbone} at {args.image_size} px, batch "
          f"{args.batch_size}; (a), (b): {args.threads} torch threads; (c): {args.actors or 'the job default'} model actor(s) of "
          f"{args.actor_threads or 'cores / actors'} thread(s), "
          f"{f'{args.decode_tasks} decode task(s)' if args.decode_tasks else 'decoding in the actors'}; {os.cpu_count()} "
          f"cores; jobs of "
          f"{args.sizes} images", flush=True)
    predictor = Predictor(checkpoint, device=args.device)
    tensors = predictor.preprocess([decode_image(p.read_bytes()) for p in reference])
    untuned = measure_limit(predictor, reference, tensors, args.batch_size, [1])
    # The job's CPU actors keep freed memory for the next batch; so does every figure from here on.
    tuned = keep_freed_memory_for_reuse()
    # On CPU the model's cheapest thread count; on a GPU the threads only feed it.
    thread_counts = sorted({1, args.threads}) if args.device == "cpu" else [args.threads]
    limit = measure_limit(predictor, reference, tensors, args.batch_size, thread_counts)
    print(f"glibc's malloc keeping freed memory ({'on' if tuned else 'not available'}): limit "
          f"{untuned['images_per_s']:.2f} -> {limit['images_per_s']:.2f} images/s (model "
          f"{untuned['model_ms']:.1f} -> {limit['model_ms']:.1f} ms, decode {untuned['decode_ms']:.1f} -> "
          f"{limit['decode_ms']:.1f} ms CPU per image)", flush=True)
    a = limit["rates"][args.threads]
    model_cost(predictor, tensors[:args.batch_size], args.batch_size, args.threads)  # (b) runs on --threads
    b = dataloader_loop(predictor, reference, args)
    print(f"limit {limit['images_per_s']:.2f} images/s, (a) {a:.2f}, (b) {b:.2f}", flush=True)

    print(f"ray.init: {start_ray(args):.1f} s (not counted)", flush=True)
    warm_up = scoring_job(job_folder(fields, min(args.sizes), Path(args.out) / "jobs"), checkpoint, args)
    print(f"first job on this Ray instance ({warm_up['images']} images, creates Ray Data's helper actors): "
          f"{warm_up['seconds']:.1f} s (not counted)", flush=True)
    # The host's speed drifts by up to 2x over minutes on a shared machine (seen here on
    # 2026-12-03: the same model loop at 46 and at 100 ms per image hours apart), so
    # each job is held against the limit measured just before and just after it.
    bracket = (reference[:args.bracket_images], tensors[:args.bracket_images])
    before = measure_limit(predictor, *bracket, args.batch_size, [limit["model_threads"]])
    jobs = []
    for images in args.sizes:
        job = scoring_job(job_folder(fields, images, Path(args.out) / "jobs"), checkpoint, args)
        after = measure_limit(predictor, *bracket, args.batch_size, [limit["model_threads"]])
        jobs.append(job | {"limit": (before["images_per_s"] + after["images_per_s"]) / 2,
                           "limit before": before["images_per_s"], "limit after": after["images_per_s"]})
        print(f"(c) {images} images: {job['seconds']:.1f} s; limit {before['images_per_s']:.2f} before, "
              f"{after['images_per_s']:.2f} after", flush=True)
        before = after
    layouts = (compare_layouts(fields, checkpoint, args, predictor, bracket, before, limit["model_threads"])
               if args.layout_rounds else [])
    ray.shutdown()
    print_report(limit, a, b, jobs)
    print_layouts(layouts)


if __name__ == "__main__":
    main()
