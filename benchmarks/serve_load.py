"""Serve under a bounded HTTP load against a plain in-process loop, batching on vs
off, and the autoscaler; every ratio from one run on the same images and model.

    python benchmarks/serve_load.py                        # ~6 minutes on 2 cores
    python benchmarks/serve_load.py --skip-autoscale --rounds 1
    python benchmarks/serve_load.py --ingress haproxy     # Ray's HAProxy ingress instead of its Python proxy

Two scenarios, each on its own untrained checkpoint and synthetic PNGs (16 distinct
fields, sent in turn):

- ``decode+model``: resnet18 at 256 px on 512-px PNGs (~400 KB), 8 requests in
  flight, 10 ms batch wait, where decoding a request costs a fifth of its model
  time: Serve must keep up with the loop.
- ``model-bound``: resnet50 at 96 px on 128-px PNGs, 32 requests in flight, 50 ms
  batch wait, where the model is the cost and running 16 images at once is ~2x cheaper per image
  than one at a time: dynamic batching must show it.

For each: (1) the plain loop a user writes without Serve: decode, preprocess and
run the model in batches of 16 in this process, with torch on every core; (2)
Serve, from serve_config.yaml's application with ``--replicas`` fixed replicas of
one CPU each, driven by a separate process (an async httpx client with a fixed
number of requests in flight, a bounded request count and a time limit), with
``max_batch_size`` 16 and 1 switched in place through user_config, alternating
rounds so drift in a shared machine's load hits both alike. It prints requests/s,
p50/p95/p99 latency, each mode's ratio to the plain loop and the batch sizes the
replicas ran; then replica counts over time while the autoscaler adds a replica
under load and removes it afterwards.

The client mode (``--client URL``) is what the subprocess runs; it prints one
JSON line.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# The load generator (runs in its own process)


async def drive(url: str, bodies: list[bytes], requests: int, duration_s: float, concurrency: int) -> dict:
    import httpx

    latencies, statuses = [], []
    deadline = time.monotonic() + duration_s
    remaining = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for number in remaining:  # shared iterator: the count is bounded across workers
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                body = bodies[number % len(bodies)]
                response = await http.post(url, content=body, headers={"Content-Type": "image/png"})
                statuses.append(response.status_code)
            except httpx.HTTPError as error:
                statuses.append(type(error).__name__)
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = sum(status == 200 for status in statuses)
    return {"sent": len(statuses), "ok": ok, "elapsed_s": elapsed, "latencies_s": latencies,
            "errors": sorted({str(s) for s in statuses if s != 200})}


def client_main(args: argparse.Namespace) -> None:
    bodies = [path.read_bytes() for path in sorted(Path(args.images).glob("*.png"))]
    result = asyncio.run(drive(args.client, bodies, args.requests, args.duration, args.concurrency))
    print(json.dumps(result))


def run_load(url: str, images: Path, requests: int, duration_s: float, concurrency: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--client", url, "--images", str(images), "--requests", str(requests),
               "--duration", str(duration_s), "--concurrency", str(concurrency)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def load_result(process: subprocess.Popen, timeout_s: float) -> dict:
    output, _ = process.communicate(timeout=timeout_s)
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Set-up: a checkpoint, an image, Serve from the shipped config


def make_checkpoint(directory: Path, backbone: str, image_size: int) -> str:
    from protein_ray.checkpoint import ModelCard, save_checkpoint
    from protein_ray.imaging import Preprocessing
    from protein_ray.model import create_model

    card = ModelCard(backbone=backbone, preprocessing=Preprocessing(image_size), run_name="serve-benchmark (untrained)")
    return str(save_checkpoint(directory / "epoch_001", create_model(backbone), card))


def make_images(directory: Path, size: int, count: int = 16) -> Path:
    """``count`` synthetic ``size``-px 8-bit PNG fields like the real data (what the endpoint is sent)."""
    from PIL import Image

    from protein_ray.synthetic_cells import render_field

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for number in range(count):
        pixels = render_field([4, 6] if number % 2 else [7], size, rng)
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(directory / f"field{number:02d}.png")
    return directory


def plain_loop(checkpoint: str, images: Path, batch_size: int, seconds: float, device: str) -> float:
    """Images/s of what a user writes without Serve: read, decode, preprocess and run
    the model in batches, in this process, torch on every core or the model on the GPU
    (after a warm-up)."""
    import torch

    from protein_ray.imaging import decode_image
    from protein_ray.predictor import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor(checkpoint, device=device)
    files = sorted(images.glob("*.png"))
    batch = files[:batch_size]
    predictor.predict_batch(predictor.preprocess([decode_image(f.read_bytes()) for f in batch]))  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = [files[(done + i) % len(files)] for i in range(batch_size)]
        predictor.predict_batch(predictor.preprocess([decode_image(f.read_bytes()) for f in batch]))
        done += batch_size
    return done / (time.perf_counter() - started)


def app_config(checkpoint: str, classifier: dict) -> dict:
    """serve_config.yaml's application with our checkpoint and classifier settings."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [application] = config["applications"]
    application["args"]["checkpoint"] = checkpoint
    [deployment] = application["deployments"]
    deployment.update(classifier)
    return {"applications": [application]}


def deploy(config: dict, timeout_s: float = 600) -> None:
    # What `serve deploy` does (it goes through the dashboard's REST API, which this
    # minimal local Ray leaves out): the controller builds the app from the config
    # and applies a user_config-only change to running replicas in place.
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    name = config["applications"][0]["name"]
    deadline = time.monotonic() + timeout_s
    time.sleep(1)
    while serve.status().applications[name].status != "RUNNING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not running after {timeout_s} s")
        time.sleep(0.5)


def batching(max_batch_size: int, wait_s: float, replicas: int, model_gpus: float) -> dict:
    from protein_ray.serve import replica_cpus

    return {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas},
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": replica_cpus(model_gpus), "num_gpus": model_gpus},
            "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}}


def warm_up(url: str, images: Path, count: int = 8) -> None:
    import httpx

    for path in sorted(images.glob("*.png"))[:count]:
        httpx.post(url, content=path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=120).raise_for_status()


def replica_batches(url: str, replicas: int) -> dict[str, dict[int, int]]:
    """Batches run so far by size, per replica: GET /model answers from one replica
    at a time, so ask until every replica has answered."""
    import httpx

    seen: dict[str, dict[int, int]] = {}
    for _ in range(40 * replicas):
        model = httpx.get(url.replace("/predict", "/model"), timeout=30).json()
        seen[model["replica"]] = {int(size): count for size, count in model["batch_sizes"].items()}
        if len(seen) == replicas:
            break
    return seen


def batches_between(before: dict, after: dict) -> dict[int, int]:
    """Batches by size that all replicas ran between two ``replica_batches``."""
    ran: dict[int, int] = {}
    for replica, sizes in after.items():
        for size, count in sizes.items():
            ran[size] = ran.get(size, 0) + count - before.get(replica, {}).get(size, 0)
    return {size: count for size, count in sorted(ran.items()) if count}


# --------------------------------------------------------------------------
# Phase 1: the plain loop, and Serve with batching on vs off


SCENARIOS = {
    "decode+model": {"backbone": "resnet18", "image_size": 256, "png_size": 512, "concurrency": 8, "batch_wait": 0.01},
    # A model whose batch of 16 costs half per image of one image alone and whose single image
    # costs more than Serve's ~25 ms per request (resnet50 at 96 px on one thread, batch norms
    # folded: 58 vs 29 ms; resnet34, used before the fold, fell to 33 vs 20 ms), enough requests in
    # flight to fill batches on both replicas, and a batch wait long enough for requests to arrive
    # while the CPU is busy (10 ms gave batches of 1-2).
    "model-bound": {"backbone": "resnet50", "image_size": 96, "png_size": 128, "concurrency": 32, "batch_wait": 0.05},
}


def summarize(results: list[dict]) -> dict:
    latencies = np.concatenate([r["latencies_s"] for r in results]) * 1000
    ok, elapsed = sum(r["ok"] for r in results), sum(r["elapsed_s"] for r in results)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    batches: dict[int, int] = {}
    for r in results:
        for size, count in r["batches"].items():
            batches[size] = batches.get(size, 0) + count
    return {"requests": int(sum(r["sent"] for r in results)), "ok": ok, "rps": ok / elapsed,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "batches": dict(sorted(batches.items())),
            "errors": sorted({e for r in results for e in r["errors"]})}


def run_scenario(args, name: str, scratch: Path, url: str) -> dict:
    settings = SCENARIOS[name]
    checkpoint = make_checkpoint(scratch / name, settings["backbone"], settings["image_size"])
    images = make_images(scratch / name / "images", settings["png_size"])
    plain = plain_loop(checkpoint, images, 16, args.plain_seconds, "cuda" if args.model_gpus else "cpu")
    concurrency = args.concurrency or settings["concurrency"]
    print(f"{name}: {settings['backbone']} at {settings['image_size']} px on {settings['png_size']}-px PNGs "
          f"({sum(p.stat().st_size for p in images.glob('*.png')) // 16 // 1024} KB), {concurrency} requests in flight; "
          f"plain loop {plain:.1f} images/s",
          flush=True)
    wait = args.batch_wait if args.batch_wait is not None else settings["batch_wait"]
    modes = {f"batched (16, wait {1000 * wait:.0f} ms)": batching(16, wait, args.replicas, args.model_gpus),
             "unbatched (max_batch_size 1)": batching(1, 0.0, args.replicas, args.model_gpus)}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_number in range(args.rounds):
        for mode, classifier in modes.items():
            deploy(app_config(checkpoint, classifier))
            warm_up(url, images)
            before = replica_batches(url, args.replicas)
            process = run_load(url, images, args.requests, args.duration, concurrency)
            result = load_result(process, args.duration + 120)
            result["batches"] = batches_between(before, replica_batches(url, args.replicas))
            results[mode].append(result)
            print(f"  round {round_number + 1} {mode}: {result['ok']} ok in {result['elapsed_s']:.1f} s", flush=True)
    return {"plain": plain, **{mode: summarize(runs) for mode, runs in results.items()}}


def print_scenario(name: str, summary: dict) -> None:
    plain = summary.pop("plain")
    print(f"\n{name}: {'mode':30} {'requests':>8} {'req/s':>7} {'/plain':>7} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8}  batch sizes run (size: count)")
    print(f"{'':{len(name) + 2}}{'plain in-process loop':30} {'':8} {plain:7.1f} {1:7.2f}")
    for mode, s in summary.items():
        print(f"{'':{len(name) + 2}}{mode:30} {s['requests']:8d} {s['rps']:7.1f} {s['rps'] / plain:7.2f} "
              f"{s['p50_ms']:8.0f} {s['p95_ms']:8.0f} {s['p99_ms']:8.0f}  {s['batches']}"
              + (f"  errors: {s['errors']}" if s["errors"] else ""))
    on, off = summary.values()
    print(f"{'':{len(name) + 2}}batched / plain loop: {on['rps'] / plain:.2f}x; batched / unbatched: "
          f"{on['rps'] / off['rps']:.2f}x requests/s, p99 {on['p99_ms'] / off['p99_ms']:.2f}x")


# --------------------------------------------------------------------------
# Phase 2: the autoscaler adds a classifier replica under load and removes it after


def classifier_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["protein-ray"].deployments["ProteinClassifier"]
    return int(deployment.replica_states.get("RUNNING", 0))


def watch_autoscaling(args, checkpoint: str, url: str, images: Path) -> list[tuple[float, int]]:
    classifier = {
        "max_ongoing_requests": 64,
        "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": args.batch_wait or 0.01},
        # Short delays so the benchmark sees both decisions in a minute or two (the look-back
        # window must exceed Serve's 10 s metrics interval).
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                               "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 12},
    }
    deploy(app_config(checkpoint, classifier))
    warm_up(url, images)
    timeline, started = [], time.monotonic()
    process = run_load(url, images, 100_000, args.autoscale_load_s, args.concurrency or 32)
    load_ended = None
    while time.monotonic() - started < args.autoscale_load_s + 120:
        timeline.append((time.monotonic() - started, classifier_replicas()))
        if load_ended is None and process.poll() is not None:
            load_ended = time.monotonic() - started
        if load_ended is not None and max(n for _, n in timeline) > 1 and timeline[-1][1] == 1:
            break
        time.sleep(0.5)
    load_result(process, 120)
    print_timeline(timeline, load_ended)
    return timeline


def print_timeline(timeline: list[tuple[float, int]], load_ended: float | None) -> None:
    changes = [timeline[0]] + [(t, n) for (t, n), (_, before) in zip(timeline[1:], timeline) if n != before]
    print("\nclassifier replicas over time (load from t=0 to t=%.0f s):" % (load_ended or float("nan")))
    for t, n in changes:
        print(f"  t={t:5.1f} s  running replicas: {n}")
    peak = max(n for _, n in timeline)
    print(f"scaled up under load: {'yes' if peak > 1 else 'NO'}; back to 1 after: "
          f"{'yes' if peak > 1 and timeline[-1][1] == 1 else 'NO'}")


# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: the scenario's)")
    parser.add_argument("--requests", type=int, default=2000, help="per round and mode, at most")
    parser.add_argument("--duration", type=float, default=25, help="seconds per round and mode, at most")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=os.cpu_count(), help="Serve replicas, one CPU each")
    parser.add_argument("--plain-seconds", type=float, default=20, help="duration of the plain loop")
    parser.add_argument("--model-gpus", type=float, default=0, help="GPUs per model replica (gpu_check.sh: 1)")
    parser.add_argument("--batch-wait", type=float, default=None,
                        help="batch_wait_timeout_s when batching (default: the scenario's)")
    parser.add_argument("--autoscale-load-s", type=float, default=45)
    parser.add_argument("--skip-autoscale", action="store_true")
    parser.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                        help="haproxy: Ray Serve's throughput-optimized mode (HAProxy in front of the replicas)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.client:
        return client_main(args)
    # Autoscaling metrics every second instead of every 10 s, so decisions come
    # quickly enough to watch; must be set before Ray starts its workers.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    if args.ingress == "haproxy":
        from protein_ray.serve_settings import HIGH_THROUGHPUT_ENV

        os.environ.update(HIGH_THROUGHPUT_ENV)  # before Ray starts: it reads them there
    import ray
    from ray import serve

    from protein_ray.demo import free_port
    from protein_ray.serve import replica_cpus

    with tempfile.TemporaryDirectory() as scratch:
        # Logical CPUs: the replicas' (the proxy and controller reserve none).
        ray.init(num_cpus=max(args.replicas * replica_cpus(args.model_gpus), 2), include_dashboard=False,
                 log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/predict"
        print(f"{args.replicas} replica(s) of {replica_cpus(args.model_gpus)} CPU(s) and {args.model_gpus:g} GPU(s), {os.cpu_count()} cores; untrained checkpoints; "
              f"ingress: {args.ingress}", flush=True)
        try:
            summaries = {name: run_scenario(args, name, Path(scratch), url) for name in args.scenarios}
            for name, summary in summaries.items():
                print_scenario(name, summary)
            if not args.skip_autoscale:
                name = args.scenarios[0]
                watch_autoscaling(args, str(Path(scratch) / name / "epoch_001"), url, Path(scratch) / name / "images")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
