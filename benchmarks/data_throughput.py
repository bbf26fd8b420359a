"""Synthetic generator images/s and shard write/read rates, in one run.

    python benchmarks/data_throughput.py [--images 200] [--workers N]

Generates the same number of Kaggle-layout images at 128 and 512 px (all cores),
then shards the 512-px set with Ray Data (``protein-ray shard``) and reads every
shard row back, reporting images/s and MB/s of encoded bytes for each step. The
128-px set is sharded first, unmeasured, so that Ray's worker start-up is not
counted against the 512-px figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def generate(out: Path, size: int, images: int, workers: int) -> float:
    from protein_ray.synthetic import write_kaggle_dataset

    started = time.perf_counter()
    write_kaggle_dataset(out, n_train=images, n_test=1, size=size, seed=0, workers=workers, progress=False)
    return (images + 1) / (time.perf_counter() - started)


def shard_rates(kaggle: Path, shards: Path) -> tuple[float, float, float]:
    """(write images/s, read images/s, encoded MB per image) through Ray Data."""
    from protein_ray.data import dataset_of, write_shards
    from protein_ray.inputs import resolve_input
    from protein_ray.sources import InputOptions

    started = time.perf_counter()
    write_shards(str(kaggle), str(shards))
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rows, encoded = 0, 0
    for batch in dataset_of(resolve_input(str(shards), InputOptions(split="train"))).iter_batches(batch_size=64, batch_format="pyarrow"):
        rows += batch.num_rows
        encoded += sum(len(image) for image in batch.column("image").to_pylist())
    read_seconds = time.perf_counter() - started
    return rows / write_seconds, rows / read_seconds, encoded / rows / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generator processes")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    rates = {size: generate(work / f"kaggle_{size}", size, args.images, args.workers) for size in (128, 512)}
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shard_rates(work / "kaggle_128", work / "shards_128")  # warm-up: Ray Data's first job starts its workers
    write, read, megabytes = shard_rates(work / "kaggle_512", work / "shards_512")
    print(f"\n{args.images} images, {args.workers} generator process(es), {os.cpu_count()} cores")
    for size, rate in rates.items():
        print(f"synthetic generator at {size:>3} px : {rate:8.1f} images/s")
    print(f"shard write (512 px PNG)      : {write:8.1f} images/s  {write * megabytes:6.1f} MB/s")
    print(f"shard read, every row         : {read:8.1f} images/s  {read * megabytes:6.1f} MB/s "
          f"({megabytes:.2f} MB per encoded image)")


if __name__ == "__main__":
    main()
