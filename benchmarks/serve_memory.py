"""Serve's memory under a burst of the largest legitimate images.

    python benchmarks/serve_memory.py [--requests 32] [--side 4096]

Deploys the app (an untrained test_resnet checkpoint made here, one replica,
default limits but ``--max-decodes``) on 127.0.0.1, then sends ``--requests``
concurrent POSTs of a ``side`` x ``side`` 16-bit RGBA TIFF (LZW-compressed zeros:
a small body that decodes to ``side``^2 x 8 bytes). It samples the
replica's resident memory every 50 ms and prints: the answers by status (each
must be 200 or 503), the replica's peak RSS growth over its idle RSS, and the
bound the settings give (max_decodes images in flight, each up to its decoded
integer array, its float copy and the resized copy), and whether the replica
restarted (its process id changed).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import tifffile


def replica_process() -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        if any("ProteinClassifier" in part for part in process.info["cmdline"] or []):
            return process
    raise RuntimeError("no ProteinClassifier replica process found")


def sample_rss(process: psutil.Process, stop: threading.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        try:
            peaks.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--max-decodes", type=int, default=2, help="images decoded at once by the replica")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from protein_ray.checkpoint import ModelCard, save_checkpoint
    from protein_ray.demo import free_port
    from protein_ray.imaging import Preprocessing
    from protein_ray.model import create_model
    from protein_ray.serve import compose_app
    from protein_ray.serve_settings import AppArgs

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((args.side, args.side, 4), np.uint16), photometric="rgb",
                     extrasamples=["unassalpha"], compression="lzw")
    body = buffer.getvalue()
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        checkpoint = str(save_checkpoint(Path(scratch), create_model("test_resnet"),
                                         ModelCard(backbone="test_resnet", preprocessing=Preprocessing(64))))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        one = {"num_replicas": 1, "autoscaling_config": None}
        serve.run(compose_app(AppArgs(checkpoint=checkpoint, max_decodes=args.max_decodes), one), route_prefix="/")
        try:
            replica = replica_process()
            idle = replica.memory_info().rss
            peaks, stop = [], threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(replica, stop, peaks))
            sampler.start()
            url = f"http://127.0.0.1:{port}/predict"

            def send(_):
                try:
                    return httpx.post(url, content=body, headers={"Content-Type": "image/tiff"},
                                      timeout=300).status_code
                except httpx.HTTPError as error:
                    return type(error).__name__

            started = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                statuses = Counter(pool.map(send, range(args.requests)))
            seconds = time.perf_counter() - started
            stop.set()
            sampler.join()
            restarted = replica_process().pid != replica.pid
        finally:
            serve.shutdown()
            ray.shutdown()
    pixels = args.side**2
    # Per image at its peak: RGBA uint16 decoded (8 bytes/px), three float32 planes, their stacked copy and
    # the tensor copy the resize makes (3 x 3 x 4 bytes/px).
    per_image = pixels * (8 + 3 * 3 * 4)
    print(f"{args.requests} concurrent {args.side}^2 16-bit RGBA TIFFs ({len(body) / 1e3:.0f} KB each) "
          f"in {seconds:.1f} s: {dict(statuses)}")
    print(f"replica RSS: idle {idle / 2**30:.2f} GiB, peak {max(peaks) / 2**30:.2f} GiB, growth "
          f"{(max(peaks) - idle) / 2**30:.2f} GiB; bound from the settings: max_decodes "
          f"{args.max_decodes} x {per_image / 2**30:.2f} GiB = "
          f"{args.max_decodes * per_image / 2**30:.2f} GiB (+ bodies of queued requests)")
    print(f"replica restarted: {restarted}; answers other than 200/503: "
          f"{sum(n for status, n in statuses.items() if status not in (200, 503))}")


if __name__ == "__main__":
    main()
