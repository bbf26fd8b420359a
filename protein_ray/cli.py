"""``protein-ray <command>``: one entry point for every stage.

Each subcommand lives in a small ``add_<name>_command`` function that declares its
options and points at the function that does the work, so ``--help`` documents
the same thing the code does. Heavy imports (torch, ray) happen inside the
handlers, so ``protein-ray --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from protein_ray.runtime import configure_logging, long_lived_setup
from protein_ray.scoring.options import PredictOptions

logger = logging.getLogger("protein_ray")


def run_synth(args: argparse.Namespace) -> None:
    from protein_ray import synthetic, synthetic_exports

    size = args.size or (1080 if args.layout in ("imagexpress", "phenix") else 512)
    plate_args = dict(plates=args.plates, wells=args.wells, fields=args.fields, size=size, seed=args.seed,
                      workers=args.workers)
    if args.layout == "kaggle":
        summary = synthetic.write_kaggle_dataset(
            args.out, n_train=args.train, n_test=args.test, size=size, seed=args.seed, workers=args.workers
        )
    elif args.layout == "plate":
        summary = synthetic.write_plate_dataset(
            args.out, channels=args.channels, bit_depth=args.bit_depth, controls=args.controls or bool(args.target),
            target=args.target, plant_qc=args.plant_qc, **plate_args
        )
    elif args.layout == "imagexpress":
        summary = synthetic_exports.write_imagexpress_export(args.out, **plate_args)
    else:
        summary = synthetic_exports.write_phenix_export(args.out, **plate_args)
    print(json.dumps(summary, indent=2, default=str))
    print(f"synthetic {args.layout} data set: {args.out}")


def add_synth_command(commands) -> None:
    parser = commands.add_parser(
        "synth",
        help="generate a synthetic HPA-like data set (Kaggle, plate, or an ImageXpress/Phenix plate export)",
        description="Generate realistic synthetic microscopy images whose green pattern follows the labels, "
        "with label sets sampled from the real data set's frequencies: 3-channel Kaggle or plate layouts, or "
        "4-stain (+ yellow ER) 12-bit LZW TIFF plates named as ImageXpress/MetaXpress or Opera Phenix "
        "(Harmony) export them.",
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--layout", choices=["kaggle", "plate", "imagexpress", "phenix"], default="kaggle",
                        help="folder layout (default: kaggle)")
    parser.add_argument("--train", type=int, default=2000, help="kaggle: number of training images (default 2000)")
    parser.add_argument("--test", type=int, default=500, help="kaggle: number of test images (default 500)")
    parser.add_argument("--plates", type=int, default=1, help="plate layouts: number of plates (default 1)")
    parser.add_argument("--wells", type=int, choices=[96, 384], default=96, help="plate layouts: wells per plate")
    parser.add_argument("--fields", type=int, default=4, help="plate layouts: fields (sites) per well (default 4)")
    parser.add_argument("--channels", choices=["merged", "separate"], default="merged",
                        help="plate: one RGB file per field, or one grayscale file per stain (HPA style)")
    parser.add_argument("--bit-depth", type=int, choices=[8, 16], default=8, help="plate: 8-bit PNG or 16-bit TIFF")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default 512 like the real Kaggle data; 1080 for the exports)")
    parser.add_argument("--controls", action="store_true",
                        help="plate: negative (columns 1-2) and positive (last two columns) control wells, "
                        "and plate_map.csv for `predict --plate-map`")
    parser.add_argument("--target", default=None, metavar="CLASS",
                        help="plate: the class the positive controls show (implies --controls)")
    parser.add_argument("--plant-qc", action="store_true",
                        help="plate: plant a blurred, a saturated and an empty field per plate (ground_truth.csv)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.set_defaults(handler=run_synth)


def run_shard(args: argparse.Namespace) -> None:
    from protein_ray.data import write_shards
    from protein_ray.runtime import init_ray
    from protein_ray.sources import InputOptions, parse_channel_map
    from protein_ray.spec import load_spec

    spec = load_spec(args.spec)
    options = InputOptions(layout=args.layout, pattern=args.pattern, stains=spec.stain_names,
                           channel_map=parse_channel_map(args.channel_map, spec.stain_names),
                           num_classes=len(spec.classes), labels_csv=args.labels)
    init_ray(args.address)
    summary = write_shards(args.src, args.dst, rows_per_file=args.rows_per_file, overwrite=args.overwrite,
                           options=options, classes=spec.classes)
    print(
        f"wrote {summary.splits} images in {summary.files} Parquet file(s) in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.0f} images/s)"
    )
    print(f"shards: {summary.destination}")


def add_shard_command(commands) -> None:
    parser = commands.add_parser(
        "shard",
        help="convert a Kaggle root or an image/plate folder into Parquet image shards",
        description="Write Parquet shards (image_id, encoded image bytes, labels, plate/well/field, source) "
        "with Ray Data. SRC and DST may be local paths or s3:// URIs.",
    )
    parser.add_argument("src", help="Kaggle root (train.csv, train/, test/) or a folder of images")
    parser.add_argument("dst", help="output folder or s3:// URI")
    parser.add_argument("--spec", default="hpa-z2g",
                        help="classes and stains: hpa-z2g (default), hpa-rgby, hpa-2018 or a spec YAML file")
    parser.add_argument("--labels", default=None, metavar="CSV",
                        help="plate folders: labels per well or field (columns plate, well[, field], labels)")
    add_layout_options(parser)
    parser.add_argument("--rows-per-file", type=int, default=1000, help="images per Parquet file (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards at DST")
    add_address_option(parser)
    parser.set_defaults(handler=run_shard)


def run_train(args: argparse.Namespace) -> None:
    with long_lived_setup():
        from protein_ray.config import load_config
        from protein_ray.runtime import init_ray
        from protein_ray.train import run_training

    config = load_config(args.config, args.set)  # fails here, before Ray starts, on a bad value
    init_ray(args.address, num_cpus=config.run.local_cpus())
    best = run_training(config)
    print(best)  # last line: the best checkpoint's URI, for scripts


def add_train_command(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train a timm model with Ray Train (DDP) on shards; prints the best checkpoint URI last",
        description="Train on Parquet shards or a Kaggle root (local or s3://). With no options: the embedded "
        "default (synthetic data generated on first use, resnet18 at 128 px on CPU). Rerunning with the same "
        "run.name resumes from its latest checkpoint.",
    )
    parser.add_argument("--config", help="YAML preset (see configs/); default: the embedded cpu-demo settings")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set model.name=resnet34 --set optim.epochs=20 (repeatable)")
    add_address_option(parser)
    parser.set_defaults(handler=run_train)


def add_layout_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", default="auto", choices=["auto", "kaggle", "plate", "imagexpress", "phenix"],
                        help="how folders of images are named (default: auto, the layout most files match): plate "
                        "= <plate>_<well>_f<field>[_<stain>].<ext>; imagexpress = <plate>_<well>_s<site>_w<N>.TIF; "
                        "phenix = <plate>/Images/r<RR>c<CC>f<FF>p<PP>-ch<N>sk1fk1fl1.tiff")
    parser.add_argument("--pattern", default=None, metavar="REGEX",
                        help="any other naming: a regex with named groups plate, well (or row and column), "
                        "field, optional plane, and stain (a name) or channel (a number)")
    parser.add_argument("--channel-map", default=None, metavar="N=STAIN,...",
                        help="which file channel is which stain, e.g. 1=blue,2=green,3=red,4=yellow "
                        "(default: channel N is the model's N-th stain)")


def add_address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address to join (default: $RAY_ADDRESS, else a new local instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protein-ray",
        description="Protein localisation classification on Ray: synthetic data, shards, training, "
        "bulk scoring and serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, Ray's own logs included (or set PROTEIN_RAY_VERBOSE=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def run_predict(args: argparse.Namespace) -> None:
    with long_lived_setup():
        from protein_ray.scoring.job import format_summary, score
        from protein_ray.scoring.options import ErrorRateExceeded

    options = PredictOptions.from_args(args)
    try:
        summary = score(options)
    except ErrorRateExceeded as error:
        print(format_summary(error.summary))
        raise
    print(format_summary(summary))


OUTPUTS_HELP = """\
outputs (under --output):
  report.html     one self-contained page: plate heatmaps, Z′ and QC tables, edge
        effects, top wells with thumbnails, failed and flagged images
  predictions.parquet, predictions.csv  one row per input image: image_id, source,
        plate, well, field, prob_<class> per class, labels (Kaggle ids), error
        (empty, or why the image was not scored), error_detail, qc_* measures and
        qc_flags (blurred, saturated, empty: kept, but left out of well aggregates)
  wells.parquet, wells.csv   per well (when file names carry plate and well): the
        plate map's columns, images scored/failed/flagged, mean_prob_<class>,
        median_prob_<class>, frac_pos_<class>, robust_z_<class> (vs negative wells)
  plates.parquet, plates.csv  per plate and class: Z′, robust Z′, edge effect
  profiles.parquet  median embedding per well, pycytominer layout (--embeddings)
  heatmaps/<plate>/<class>.png  fraction of positive fields per well
  submission.csv  Kaggle Image,Label (Kaggle test split, or --submission)
  embeddings.parquet  penultimate-layer features (--embeddings)
  summary.json    counts, failures by reason, skipped files, images/s, model
  parts/, job.json  the job's progress: rerun the same command to continue it
"""


def add_predict_command(commands) -> None:
    defaults = PredictOptions.defaults()
    parser = commands.add_parser(
        "predict",
        help="score images in bulk with Ray Data: per-image predictions, per-well tables, plate heatmaps",
        description="Score Parquet shards, a Kaggle root, a folder of images or a plate-scan folder (merged RGB "
        "or one file per stain; 8/16-bit PNG, TIFF, JPEG), local or s3://. Decoding runs in CPU tasks, the "
        "model on an actor pool (GPU when present). Every image gets one output row: probabilities or the "
        "reason it failed. Rerunning the same command on the same --output continues an interrupted job.",
        epilog=OUTPUTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="URI",
                        help="checkpoint directory, or a run folder for its best epoch (local or s3://)")
    parser.add_argument("--input", required=True, action="append", dest="inputs", metavar="URI",
                        help="shards root, Kaggle root, image/plate folder or image file (repeatable)")
    parser.add_argument("--output", required=True, metavar="URI", help="output folder (local or s3://)")
    parser.add_argument("--split", default=None,
                        help="split of a Kaggle root or shards to score (default: test, else the only split)")
    add_layout_options(parser)
    parser.add_argument("--bit-depth", type=int, default=None, metavar="BITS",
                        help="read 16-bit files as BITS-bit data, e.g. 12 for 12-bit cameras (0..4095 -> 0..1); "
                        "default: the checkpoint's (the file's own depth)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help=f"images per model call (default {defaults['batch_size']})")
    parser.add_argument("--actors", type=int, default=None,
                        help="model actors (default: one per GPU; without GPUs one per CPU, no more than the "
                        "model batches, or 1 with --decode-tasks)")
    parser.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs per model actor (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-actor", type=float, default=defaults["cpus_per_actor"],
                        help=f"logical CPUs per model actor (default {defaults['cpus_per_actor']:g})")
    parser.add_argument("--threads-per-actor", type=int, default=None,
                        help="torch threads per CPU model actor (default: the node's cores / actors, at least 1)")
    parser.add_argument("--decode-tasks", type=int, default=None,
                        help="at most this many decode tasks at once (default: as many as free CPUs allow). "
                        "Without GPUs the model actors decode their own images unless this is given")
    parser.add_argument("--decode-batch", type=int, default=defaults["decode_batch"],
                        help=f"images per block a decode task yields (default {defaults['decode_batch']})")
    parser.add_argument("--chunk-size", type=int, default=defaults["chunk_size"],
                        help=f"images per part file, the unit a rerun skips (default {defaults['chunk_size']})")
    parser.add_argument("--tta", action="store_true", help="average flips and a 90-degree turn (4x the compute)")
    parser.add_argument("--embeddings", action="store_true",
                        help="also write penultimate-layer features per image (embeddings.parquet)")
    parser.add_argument("--max-pixels", type=int, default=defaults["max_pixels"],
                        help=f"refuse images with more pixels than this (default {defaults['max_pixels']:,})")
    parser.add_argument("--max-error-rate", type=float, default=defaults["max_error_rate"],
                        help=f"exit non-zero when more than this fraction of images fail (default "
                        f"{defaults['max_error_rate']}); outputs are written either way")
    parser.add_argument("--allow-empty", action="store_true",
                        help="let an image have no label (default: at least its most probable class)")
    parser.add_argument("--submission", action="store_true",
                        help="write submission.csv for every image (automatic for a Kaggle test split)")
    parser.add_argument("--no-heatmaps", dest="heatmaps", action="store_false", help="skip the plate heatmaps")
    add_screen_options(parser, defaults)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete this job's earlier outputs at --output and start afresh")
    add_address_option(parser)
    parser.set_defaults(handler=run_predict)


def add_screen_options(parser: argparse.ArgumentParser, defaults: dict) -> None:
    screen = parser.add_argument_group("plate map, image QC and report")
    screen.add_argument("--plate-map", default=None, metavar="CSV",
                        help="plate, well, role (negative/positive/sample/empty) and free columns such as compound "
                        "or target (the class a positive control stands for); gives robust z and Z′")
    screen.add_argument("--no-qc", dest="qc", action="store_false",
                        help="skip the per-field focus/saturation/foreground measures and flags")
    screen.add_argument("--qc-mad", type=float, default=defaults["qc_mad"], metavar="K",
                        help=f"flag a field beyond K robust SDs of its plate (default {defaults['qc_mad']:g})")
    screen.add_argument("--qc-min-focus", type=float, default=None, metavar="X",
                        help="flag fields with qc_focus below X (instead of the plate-derived threshold)")
    screen.add_argument("--qc-max-saturated", type=float, default=None, metavar="FRACTION",
                        help="flag fields with more than this fraction of saturated pixels in a stain")
    screen.add_argument("--qc-min-foreground", type=float, default=None, metavar="FRACTION",
                        help="flag fields with less than this fraction of foreground (cell) pixels as empty")
    screen.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")


COMMANDS = [add_synth_command, add_shard_command, add_train_command, add_predict_command]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        args.handler(args)
    except (ValueError, OSError) as error:  # our input errors carry a message meant for the user
        print(f"protein-ray {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
