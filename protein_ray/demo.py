"""The README's main job: the whole story on one machine with the embedded default.

``make demo`` runs ``python -m protein_ray.demo``: generate the synthetic data set
and shard it, train with the cpu-demo settings, score a synthetic 96-well plate
with Ray Data, serve the model with Ray Serve and classify one image over HTTP,
then print where everything is. Rerunning resumes the training run (nothing left
to train) and reuses the data, so a second run is quick.

Console: one line per step and per epoch; ``--verbose`` (or ``PROTEIN_RAY_VERBOSE=1``)
brings back Ray's own logs.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
from pathlib import Path

import httpx
import pandas as pd
from ray import serve

from protein_ray import storage
from protein_ray.checkpoint import read_model_card
from protein_ray.config import load_config
from protein_ray.plates import compare_with_planted
from protein_ray.runtime import configure_logging, init_ray, is_verbose
from protein_ray.scoring.job import score
from protein_ray.scoring.options import PredictOptions
from protein_ray.serve import build_app
from protein_ray.synthetic import write_plate_dataset
from protein_ray.train import run_training
from protein_ray.train_data import ensure_embedded_dataset
from protein_ray.uploads import CONTENT_TYPE_BY_SUFFIX

logger = logging.getLogger("protein_ray.demo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="training overrides, as for `protein-ray train`")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's own logs and warnings too")
    args = parser.parse_args(argv)
    verbose = configure_logging(args.verbose)

    started = time.perf_counter()
    out = storage.absolute(args.out)
    config = load_config(None, [f"data.synthetic_dir={out}/data", f"run.storage_path={out}/train", *args.set])
    init_ray(num_cpus=config.run.local_cpus(),
             verbose=verbose)

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
    print(f"  plate scores      {plate['output']} (predictions.csv, wells.csv, plates.csv, heatmaps/)")
    print(f"  plate report      {plate['outputs']['report_html']}")
    print("  serve it yourself serve run serve_config.yaml")
    print(f"  best checkpoint   {best}")


def score_plate(checkpoint: str, out: str) -> dict:
    """Score a synthetic plate with planted per-well labels; print the agreement."""
    summary = score_demo_plate(checkpoint, storage.join(out, "plate-scan"), overwrite=True)
    agreement = pd.DataFrame(summary["planted_vs_predicted"])
    print("plate check (AUC of per-well probability, planted vs other wells): " + ", ".join(
        f"{row['class']} {row['auc']:.2f}" for row in agreement.to_dict("records")))
    controls = pd.read_csv(summary["outputs"]["plates_csv"]).dropna(subset=["z_prime"])
    print("controls: " + ", ".join(f"Z′ {row['class']} {row['z_prime']:.2f} (robust {row['robust_z_prime']:.2f})"
                                   for row in controls.to_dict("records")) +
          f"; image QC flagged {summary['qc_flagged'] or 'nothing'}")
    return summary


def serve_one_image(checkpoint: str, out: str) -> str:
    image = sorted(Path(out, "data").glob("kaggle_*/test/*.png"))[0]
    answer = serve_demo_prediction(checkpoint, str(image))["predictions"][0]
    return f"{image.name} -> {', '.join(answer['labels'])}"


def score_demo_plate(checkpoint: str, out: str, wells: int = 96, fields: int = 2, size: int = 128,
                     channels: str = "merged", bit_depth: int = 8, seed: int = 11, workers: int | None = None,
                     **options) -> dict:
    """Write a synthetic plate with planted per-well labels, control wells and planted bad
    fields to ``out/plate``, score it with its plate map into ``out/scores`` and compare
    the per-well results with what was planted.

    Returns the job summary plus ``planted_vs_predicted`` (one record per class:
    wells with/without the class, mean probability in each, AUC) and
    ``plate_dir``; also writes ``out/scores/planted_vs_predicted.csv``.
    ``options`` are PredictOptions fields (batch_size, actors, tta, ...)."""
    plate = write_plate_dataset(storage.join(out, "plate"), plates=1, wells=wells, fields=fields, channels=channels,
                                bit_depth=bit_depth, size=size, seed=seed, workers=workers, progress=False,
                                controls=True, plant_qc=True)
    init_ray(options.pop("address", None))
    summary = score(PredictOptions(checkpoint=checkpoint, inputs=[plate["out"]], output=storage.join(out, "scores"),
                                   plate_map=storage.join(plate["out"], plate["plate_map_csv"]), **options))
    wells_table = pd.read_csv(summary["outputs"]["wells_csv"])
    planted = pd.read_csv(plate["wells_csv"], dtype=str, keep_default_na=False)
    agreement = compare_with_planted(wells_table, planted, read_model_card(summary["checkpoint"]).class_names)
    storage.write_text(storage.join(out, "scores", "planted_vs_predicted.csv"), agreement.to_csv(index=False))
    return {**summary, "plate_dir": plate["out"], "planted_vs_predicted": agreement.to_dict("records")}




DEMO_APP_NAME = "protein-ray-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_serve_port() -> int | None:
    """The HTTP port of a Serve instance already running in this cluster, if any.
    (Serve has no public call for this; its client object holds the config.)"""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return client.http_config.port if client is not None else None


def serve_demo_prediction(checkpoint: str, image_path: str, timeout_s: float = 120.0) -> dict:
    """Deploy the app on 127.0.0.1, POST one image over HTTP, tear down, return the JSON.

    Starts Serve on a free port (and Ray, if needed) and shuts Serve down after;
    if Serve already runs in this cluster, only the demo app is added and removed.
    """
    init_ray()
    # Serve's controller, proxy and replicas log every step at INFO; the demo prints its own line.
    quiet = {} if is_verbose() else {"logging_config": {"log_level": "WARNING", "enable_access_log": False}}
    port = running_serve_port()
    started_here = port is None
    if started_here:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, **quiet)
        if quiet:  # serve.start sets its driver-side logger to INFO
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
    route = "/" if started_here else f"/{DEMO_APP_NAME}"
    try:
        serve.run(build_app({"checkpoint": checkpoint}), name=DEMO_APP_NAME, route_prefix=route, **quiet)
        url = f"http://127.0.0.1:{port}{route.rstrip('/')}/predict"
        content_type = CONTENT_TYPE_BY_SUFFIX.get(Path(image_path).suffix.lower(), "application/octet-stream")
        started = time.perf_counter()
        response = httpx.post(url, content=Path(image_path).read_bytes(),
                              headers={"Content-Type": content_type}, timeout=timeout_s)
        logger.info("POST %s -> %d in %.2f s", url, response.status_code, time.perf_counter() - started)
        response.raise_for_status()
        return response.json()
    finally:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(DEMO_APP_NAME)


if __name__ == "__main__":
    main()
