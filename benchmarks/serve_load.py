"""Serve under a bounded HTTP load: dynamic batching on vs off, and the autoscaler.

    python benchmarks/serve_load.py                    # resnet18 at 128 px, ~5 minutes on 2 cores
    python benchmarks/serve_load.py --image-size 256 --rounds 1 --skip-autoscale

Deploys serve_config.yaml's application (an untrained resnet18 checkpoint made
here, one replica of each deployment) on 127.0.0.1 and drives it from a separate
process: an async httpx client with a fixed number of requests in flight, a
bounded request count and a time limit. It prints requests/s and p50/p95/p99
latency with ``max_batch_size`` 16 and 1 (switched in place through user_config,
alternating rounds so drift in a shared machine's load hits both alike), their
ratio, and then replica counts over time while the autoscaler adds a classifier
replica under load and removes it afterwards.

The client mode (``--client URL``) is what the subprocess runs; it prints one
JSON line.
"""

import argparse
import asyncio
import io
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


async def drive(url: str, body: bytes, requests: int, duration_s: float, concurrency: int) -> dict:
    import httpx

    latencies, statuses = [], []
    deadline = time.monotonic() + duration_s
    remaining = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        for _ in remaining:  # shared iterator: the count is bounded across workers
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
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
    body = Path(args.image).read_bytes()
    result = asyncio.run(drive(args.client, body, args.requests, args.duration, args.concurrency))
    print(json.dumps(result))


def run_load(url: str, image: Path, requests: int, duration_s: float, concurrency: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--client", url, "--image", str(image), "--requests", str(requests),
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


def make_image(path: Path) -> Path:
    """A 512x512 8-bit PNG like the real data (what the endpoint will be sent)."""
    from PIL import Image

    from protein_ray.synthetic_cells import render_field

    pixels = render_field([4, 6], 512, np.random.default_rng(0))
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def app_config(checkpoint: str, classifier: dict) -> dict:
    """serve_config.yaml's application with our checkpoint and classifier settings."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [application] = config["applications"]
    application["args"]["checkpoint"] = checkpoint
    for deployment in application["deployments"]:
        fixed = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        deployment.update(fixed if deployment["name"] == "ProteinApi" else classifier)
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


def batching(max_batch_size: int, wait_s: float, model_cpus: float, model_gpus: float) -> dict:
    return {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            "max_ongoing_requests": 64,
            # Ray gives an actor as many torch/OpenMP threads as CPUs it asks for.
            "ray_actor_options": {"num_cpus": model_cpus, "num_gpus": model_gpus},
            "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}}


def warm_up(url: str, image: Path, count: int = 8) -> None:
    import httpx

    for _ in range(count):
        httpx.post(url, content=image.read_bytes(), headers={"Content-Type": "image/png"}, timeout=120).raise_for_status()


# --------------------------------------------------------------------------
# Phase 1: batching on vs off


def summarize(results: list[dict]) -> dict:
    latencies = np.concatenate([r["latencies_s"] for r in results]) * 1000
    ok, elapsed = sum(r["ok"] for r in results), sum(r["elapsed_s"] for r in results)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"requests": int(sum(r["sent"] for r in results)), "ok": ok, "rps": ok / elapsed,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "errors": sorted({e for r in results for e in r["errors"]})}


def compare_batching(args, checkpoint: str, url: str, image: Path) -> dict:
    modes = {"batched (max_batch_size 16)": batching(16, args.batch_wait, args.model_cpus, args.model_gpus),
             "unbatched (max_batch_size 1)": batching(1, 0.0, args.model_cpus, args.model_gpus)}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_number in range(args.rounds):
        for mode, classifier in modes.items():
            deploy(app_config(checkpoint, classifier))
            warm_up(url, image)
            process = run_load(url, image, args.requests, args.duration, args.concurrency)
            results[mode].append(load_result(process, args.duration + 120))
            print(f"  round {round_number + 1} {mode}: {results[mode][-1]['ok']} ok in "
                  f"{results[mode][-1]['elapsed_s']:.1f} s", flush=True)
    return {mode: summarize(runs) for mode, runs in results.items()}


def print_batching(summary: dict) -> None:
    print(f"\n{'mode':32} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for mode, s in summary.items():
        print(f"{mode:32} {s['requests']:8d} {s['rps']:7.1f} {s['p50_ms']:8.0f} {s['p95_ms']:8.0f} {s['p99_ms']:8.0f}"
              + (f"  errors: {s['errors']}" if s["errors"] else ""))
    on, off = summary.values()
    print(f"batching on/off: {on['rps'] / off['rps']:.2f}x requests/s, p99 {on['p99_ms'] / off['p99_ms']:.2f}x")


# --------------------------------------------------------------------------
# Phase 2: the autoscaler adds a classifier replica under load and removes it after


def classifier_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["protein-ray"].deployments["ProteinClassifier"]
    return int(deployment.replica_states.get("RUNNING", 0))


def watch_autoscaling(args, checkpoint: str, url: str, image: Path) -> list[tuple[float, int]]:
    classifier = {
        "max_ongoing_requests": 64,
        "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": args.batch_wait},
        # Short delays so the benchmark sees both decisions in a minute or two (the look-back
        # window must exceed Serve's 10 s metrics interval).
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                               "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 12},
    }
    deploy(app_config(checkpoint, classifier))
    warm_up(url, image)
    timeline, started = [], time.monotonic()
    process = run_load(url, image, 100_000, args.autoscale_load_s, args.concurrency)
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
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--requests", type=int, default=600, help="per round and mode, at most")
    parser.add_argument("--duration", type=float, default=30, help="seconds per round and mode, at most")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-cpus", type=float, default=1, help="CPUs (= torch threads) per model replica")
    parser.add_argument("--model-gpus", type=float, default=0, help="GPUs per model replica (gpu_check.sh: 1)")
    parser.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s when batching")
    parser.add_argument("--autoscale-load-s", type=float, default=45)
    parser.add_argument("--skip-autoscale", action="store_true")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.client:
        return client_main(args)
    # Autoscaling metrics every second instead of every 10 s, so decisions come
    # quickly enough to watch; must be set before Ray starts its workers.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    import ray
    from ray import serve

    from protein_ray.demo import free_port

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = make_checkpoint(Path(scratch), args.backbone, args.image_size)
        image = make_image(Path(scratch) / "field.png")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/predict"
        print(f"{args.backbone} at {args.image_size} px (untrained) on {args.model_cpus:g} CPU(s), "
              f"512 px PNG of {image.stat().st_size // 1024} KB, {args.concurrency} requests in flight, "
              f"{os.cpu_count()} cores", flush=True)
        try:
            print_batching(compare_batching(args, checkpoint, url, image))
            if not args.skip_autoscale:
                watch_autoscaling(args, checkpoint, url, image)
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
