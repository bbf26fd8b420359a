"""The README's main job: the whole story on one machine with the embedded default.

``make demo`` runs ``python -m protein_ray.demo``: generate the synthetic data set
and shard it, train with the cpu-demo settings, then print where everything is.
Each step reuses what an earlier run left, so a second run is quick.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from protein_ray import storage

logger = logging.getLogger("protein_ray.demo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="training overrides, as for `protein-ray train`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from protein_ray.config import load_config
    from protein_ray.runtime import init_ray
    from protein_ray.train import ensure_embedded_dataset, run_training

    started = time.perf_counter()
    out = storage.absolute(args.out)
    config = load_config(None, [f"data.synthetic_dir={out}/data", f"run.storage_path={out}/train", *args.set])
    init_ray(num_cpus=max(os.cpu_count() or 1, config.run.num_workers * config.run.cpus_per_worker + 2))

    shards = ensure_embedded_dataset(config)
    print(f"[1/2] synthetic data and shards ready: {shards}")
    best = run_training(config)
    print(f"[2/2] trained; best checkpoint: {best}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s. Outputs:")
    print(f"  synthetic images  {out}/data")
    print(f"  shards            {shards}")
    print(f"  training run      {out}/train/{config.run.name} (history.jsonl, curves.png, classes.png)")
    print(f"  best checkpoint   {best}")


if __name__ == "__main__":
    main()
