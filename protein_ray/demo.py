"""The README's main job: the whole story on one machine with the embedded default.

``make demo`` runs ``python -m protein_ray.demo``: generate the synthetic data set
and shard it, train with the cpu-demo settings, score a synthetic 96-well plate
with Ray Data, serve the model with Ray Serve and classify one image over HTTP,
then print where everything is. Rerunning resumes the training run (nothing left
to train) and reuses the data, so a second run is quick.
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
    print(f"[1/4] synthetic data and shards ready: {shards}")
    best = run_training(config)
    print(f"[2/4] trained; best checkpoint: {best}")
    plate = score_plate(best, out)
    print(f"[3/4] scored a synthetic plate: {plate['output']}")
    served = serve_one_image(best, out)
    print(f"[4/4] served over HTTP: {served}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s. Outputs:")
    print(f"  synthetic images  {out}/data")
    print(f"  shards            {shards}")
    print(f"  training run      {out}/train/{config.run.name} (history.jsonl, curves.png, classes.png)")
    print(f"  plate scores      {plate['output']} (predictions.csv, wells.csv, heatmaps/)")
    print("  serve it yourself serve run serve_config.yaml")
    print(f"  best checkpoint   {best}")


def score_plate(checkpoint: str, out: str) -> dict:
    """Score a synthetic plate with planted per-well labels; report the agreement."""
    from protein_ray.batch import score_demo_plate

    summary = score_demo_plate(checkpoint, storage.join(out, "plate-scan"), overwrite=True)
    for record in summary["planted_vs_predicted"]:
        logger.info("plate check %s", record)
    return summary


def serve_one_image(checkpoint: str, out: str) -> str:
    from pathlib import Path

    from protein_ray.serve import serve_demo_prediction

    image = sorted(Path(out, "data").glob("kaggle_*/test/*.png"))[0]
    answer = serve_demo_prediction(checkpoint, str(image))["predictions"][0]
    return f"{image.name} -> {', '.join(answer['labels'])}"

if __name__ == "__main__":
    main()
