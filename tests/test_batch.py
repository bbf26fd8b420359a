"""Bulk scoring (``protein-ray predict``) on the session's real local Ray instance,
local disk and the local S3 server: count in = count out, error reasons, stain
merging, parity with the Predictor, S3, rerun after a real kill, error rate."""

from __future__ import annotations

import io
import json
import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from protein_ray import storage
from protein_ray.checkpoint import ModelCard, save_checkpoint
from protein_ray.demo import score_demo_plate
from protein_ray.imaging import Preprocessing
from protein_ray.labels import CLASS_NAMES
from protein_ray.model import create_model
from protein_ray.plates import compare_with_planted, plate_format, prob_columns, well_table

PROB_COLUMNS = prob_columns(CLASS_NAMES)
from protein_ray.predictor import Predictor
from protein_ray.scoring.outputs import submission_frame
from protein_ray.scoring.parts import PartWriter
from protein_ray.synthetic import write_kaggle_dataset, write_plate_dataset

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- helpers ----


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    """An untrained test_resnet at 64 px: fast, and its outputs vary with the image."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(directory, create_model("test_resnet"), ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64)))
    return str(directory)


@pytest.fixture
def predict(ray_session, capsys):
    """Run `protein-ray predict ARGS` in this process (Ray already up); returns
    (exit code, stdout, stderr)."""
    from protein_ray import cli

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["predict", *map(str, argv)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def read_predictions(output: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(output, "predictions.parquet"))))


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(PROB_COLUMNS)].to_numpy(dtype=np.float32)


# ------------------------------------------------- nothing lost, reasons ----


BAD_FILES = {  # image id (a file naming no plate field: its path) -> expected error reason
    "empty.png": "empty",
    "truncated.png": "truncated",
    "text.png": "not_an_image",
    "gray.png": "channels",
    "gray-alpha.png": "channels",
    "float32.tif": "bit_depth",
    "huge.png": "too_large",
    "P9_A01_f1": "missing_stain",  # red and green stain files, no blue
}


def write_mixed_folder(folder: Path) -> list[str]:
    """Good images, one of each kind of bad file, a complete and an incomplete
    per-stain field, and a non-image; returns the good image ids."""
    folder.mkdir()
    good = []
    for i in range(6):
        (folder / f"good-{i}.png").write_bytes(png_bytes(random_rgb(i)))
        good.append(f"good-{i}.png")
    (folder / "empty.png").write_bytes(b"")
    full = png_bytes(random_rgb(99))
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("this is a text file with an image's name\n")
    (folder / "gray.png").write_bytes(png_bytes(random_rgb(7)[..., 0]))
    (folder / "gray-alpha.png").write_bytes(png_bytes(np.stack([random_rgb(8)[..., 0]] * 2, -1).reshape(32, 32, 2)))
    tifffile.imwrite(folder / "float32.tif", np.random.default_rng(9).random((32, 32, 3), dtype=np.float32))
    (folder / "huge.png").write_bytes(png_bytes(random_rgb(10, size=100)))  # 10,000 px > --max-pixels 5000
    for stain in ("red", "green"):
        (folder / f"P9_A01_f1_{stain}.png").write_bytes(png_bytes(random_rgb(11)[..., 0]))
    for c, stain in enumerate(("red", "green", "blue")):
        (folder / f"P9_A01_f2_{stain}.png").write_bytes(png_bytes(random_rgb(12)[..., c]))
    good.append("P9_A01_f2")
    (folder / "notes.txt").write_text("not an image by name\n")
    return good


@pytest.mark.ray
@pytest.mark.parametrize("layout", [(), ("--decode-tasks", 1)], ids=["actors-decode", "decode-tasks"])
def test_every_input_gets_one_row_and_too_many_failures_exit_nonzero(tmp_path, tiny_checkpoint, predict, layout):
    folder, out = tmp_path / "mixed", tmp_path / "out"
    good = write_mixed_folder(folder)
    code, stdout, stderr = predict("--checkpoint", tiny_checkpoint, "--input", folder, "--output", out,
                                   "--max-pixels", 5000, "--chunk-size", 4, *layout)

    # Failed fraction 8/15 > the default 5%: a non-zero exit that says why...
    assert code != 0
    assert "could not be scored" in stderr and "--max-error-rate" in stderr
    # ...after every output was written, with one row per input image.
    predictions = read_predictions(str(out))
    assert sorted(predictions["image_id"]) == sorted(good + list(BAD_FILES))
    reasons = predictions.set_index("image_id")["error"]
    for name, reason in BAD_FILES.items():
        assert reasons[name] == reason, name
    assert reasons[good].isna().all()
    scored = predictions[predictions["error"].isna()]
    assert np.isfinite(probabilities(scored)).all() and scored["labels"].str.len().gt(0).all()
    assert predictions.loc[predictions["error"].notna(), "labels"].isna().all()
    assert (pd.read_csv(out / "predictions.csv")["image_id"].sort_values().tolist()
            == sorted(predictions["image_id"]))

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["scored"], summary["failed"]) == (15, 7, 8)
    assert summary["failed_by_reason"] == {"bit_depth": 1, "channels": 2, "empty": 1, "missing_stain": 1,
                                           "not_an_image": 1, "too_large": 1, "truncated": 1}
    assert summary["skipped"] == [f"{folder / 'notes.txt'} (not an image by name)"]
    assert "notes.txt" in stdout and "8 failed" in stdout and "images/s" in stdout

    # The good merged images score exactly as the Predictor scores their bytes.
    predictor = Predictor(tiny_checkpoint, device="cpu")
    expected = [r.probabilities for r in predictor.predict_bytes([(folder / name).read_bytes() for name in good[:6]])]
    np.testing.assert_allclose(probabilities(predictions.set_index("image_id").loc[good[:6]]), expected, atol=1e-5)


# --------------------------------------------------------- per-stain plate ----


@pytest.mark.ray
def test_per_stain_16bit_plate_merges_like_the_predictor_sees_the_merged_image(tmp_path, tiny_checkpoint, predict):
    plate = write_plate_dataset(tmp_path / "plate", wells=96, fields=1, channels="separate", bit_depth=16,
                                size=32, seed=3, workers=1, progress=False)
    out = tmp_path / "out"
    code, stdout, _ = predict("--checkpoint", tiny_checkpoint, "--input", plate["out"], "--output", out,
                              "--chunk-size", 32, "--batch-size", 16)
    assert code == 0, stdout
    predictions = read_predictions(str(out)).set_index("image_id")
    assert len(predictions) == 96 and predictions["error"].isna().all()
    assert predictions["plate"].eq("P001").all() and predictions["field"].eq(1).all()

    # Merge three 16-bit stain files by hand into one RGB TIFF and let the Predictor score it.
    ids = ["P001/P001_A01_f1", "P001/P001_C05_f1", "P001/P001_H12_f1"]
    merged = []
    for image_id in ids:
        planes = [tifffile.imread(tmp_path / "plate" / f"{image_id}_{s}.tif") for s in ("red", "green", "blue")]
        assert planes[0].dtype == np.uint16
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, np.stack(planes, -1), photometric="rgb")
        merged.append(buffer.getvalue())
    expected = [r.probabilities for r in Predictor(tiny_checkpoint, device="cpu").predict_bytes(merged)]
    np.testing.assert_allclose(probabilities(predictions.loc[ids]), expected, atol=1e-5)

    wells = pd.read_csv(out / "wells.csv")
    assert len(wells) == 96 and wells["images_scored"].eq(1).all() and wells["images_failed"].eq(0).all()
    assert (out / "heatmaps" / "P001" / "nucleoplasm.png").exists()
    assert len(list((out / "heatmaps" / "P001").glob("*.png"))) == 11  # 10 classes + overview


# ---------------------------------------------------- Kaggle, TTA, embeddings --


@pytest.mark.ray
def test_kaggle_test_split_writes_a_full_submission_and_matches_the_predictor_with_tta(
        tmp_path, tiny_checkpoint, predict):
    kaggle = write_kaggle_dataset(tmp_path / "kaggle", n_train=0, n_test=10, size=48, seed=5, workers=1,
                                  progress=False)
    out = tmp_path / "out"
    code, stdout, _ = predict("--checkpoint", tiny_checkpoint, "--input", kaggle["out"], "--output", out,
                              "--tta", "--embeddings", "--chunk-size", 4)
    assert code == 0, stdout

    ids = pd.read_csv(kaggle["submission_csv"])["Image"].tolist()
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["Image", "Label"] and submission["Image"].tolist() == ids
    assert submission["Label"].str.len().gt(0).all()  # never empty without --allow-empty

    predictions = read_predictions(str(out)).set_index("image_id").loc[ids]
    predictor = Predictor(tiny_checkpoint, device="cpu", tta=True)
    encoded = [(Path(kaggle["test_dir"]) / f"{i}.png").read_bytes() for i in ids]
    np.testing.assert_allclose(probabilities(predictions), [r.probabilities for r in predictor.predict_bytes(encoded)],
                               atol=1e-5)
    assert submission["Label"].tolist() == predictions["labels"].tolist()

    embeddings = pd.read_parquet(out / "embeddings.parquet").set_index("image_id").loc[ids]
    from protein_ray.imaging import decode_image

    expected = predictor.embed_batch(predictor.preprocess([decode_image(data) for data in encoded]))
    np.testing.assert_allclose(np.stack(embeddings["embedding"].to_numpy()), expected, atol=1e-5)


# -------------------------------------------------------------------- S3 ----


@pytest.mark.ray
@pytest.mark.s3
def test_shards_and_a_plate_folder_on_s3_scored_into_s3(tmp_path, tiny_checkpoint, predict, s3_bucket):
    from protein_ray.data import write_shards

    first = write_plate_dataset(tmp_path / "first", wells=96, fields=1, size=32, seed=1, workers=1, progress=False)
    second = write_plate_dataset(tmp_path / "second", wells=96, fields=1, size=32, seed=2, workers=1, progress=False)
    write_shards(first["out"], f"{s3_bucket}/shards", rows_per_file=40)
    for path in sorted(Path(second["out"]).rglob("*.png"))[:24]:  # a quarter of the second plate, renamed P002
        storage.write_bytes(f"{s3_bucket}/plate2/{path.name.replace('P001', 'P002')}", path.read_bytes())
    out = f"{s3_bucket}/scores"

    code, stdout, _ = predict("--checkpoint", tiny_checkpoint, "--input", f"{s3_bucket}/shards",
                              "--input", f"{s3_bucket}/plate2", "--output", out, "--chunk-size", 30)
    assert code == 0, stdout

    predictions = read_predictions(out)
    assert len(predictions) == 96 + 24 and predictions["error"].isna().all()
    assert predictions.groupby("plate").size().to_dict() == {"P001": 96, "P002": 24}
    assert predictions["source"].str.startswith(f"{s3_bucket}/plate2/").sum() == 24
    assert len([u for u in storage.list_files(f"{out}/parts") if u.endswith(".parquet")]) == 4  # 120 / 30
    wells = pd.read_csv(io.BytesIO(storage.read_bytes(f"{out}/wells.csv")))
    assert len(wells) == 96 + 24
    assert storage.exists(f"{out}/heatmaps/P002/cytosol.png")
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert summary["scored"] == 120 and summary["inputs"] == [f"{s3_bucket}/shards", f"{s3_bucket}/plate2"]

    # The shard rows score as the Predictor scores the original files.
    ids = ["P001/P001_A01_f1", "P001/P001_D07_f1"]
    encoded = [(Path(first["out"]) / f"{i}.png").read_bytes() for i in ids]
    expected = [r.probabilities for r in Predictor(tiny_checkpoint, device="cpu").predict_bytes(encoded)]
    np.testing.assert_allclose(probabilities(predictions.set_index("image_id").loc[ids]), expected, atol=1e-5)


# ------------------------------------------------------------------ rerun ----


def part_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.parquet")} if (out / "parts").exists() else {}


@pytest.mark.ray
def test_a_killed_job_continues_where_it_stopped(tmp_path, tiny_checkpoint, predict, ray_session):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for i in range(96):
        (folder / f"img-{i:03d}.png").write_bytes(png_bytes(random_rgb(i, size=48)))
    args = ["--checkpoint", tiny_checkpoint, "--input", str(folder), "--output", str(out),
            "--chunk-size", "4", "--batch-size", "4", "--decode-batch", "4"]
    # A separate driver process joins this session's cluster, so killing it is a real interruption.
    driver = "import sys; from protein_ray import cli; sys.exit(cli.main(['predict', *sys.argv[1:]]))"
    address = ray_session.get_runtime_context().gcs_address
    log = (tmp_path / "driver.log").open("w")
    process = subprocess.Popen([sys.executable, "-c", driver, *args, "--address", address],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 600  # a loaded 2-core machine takes minutes to start the actor
    while len(part_files(out)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    before = part_files(out)
    assert 3 <= len(before) < 24, f"could not interrupt the job mid-way ({len(before)} parts); log: " \
                                  f"{(tmp_path / 'driver.log').read_text()[-2000:]}"
    assert not (out / "predictions.parquet").exists()

    code, stdout, _ = predict(*args)
    assert code == 0, stdout
    after = part_files(out)
    assert len(after) == 24
    assert {name: after[name] for name in before} == before  # nothing already written was rewritten
    assert not list((out / "parts").glob("*.tmp-*"))
    predictions = read_predictions(str(out))
    assert len(predictions) == 96 and predictions["image_id"].is_unique
    assert set(predictions["image_id"]) == {f"img-{i:03d}.png" for i in range(96)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks"] == {"total": 24, "written_this_run": 24 - len(before), "already_written": len(before)}
    assert summary["images_this_run"] == 96 - 4 * len(before)

    # A finished job reruns as a no-op; a different job on the same output is refused.
    assert predict(*args)[0] == 0 and part_files(out) == after
    code, _, stderr = predict(*args[:-6], "--chunk-size", "8")
    assert code != 0 and "different scoring job" in stderr and "--overwrite" in stderr


# ------------------------------------------------- per-well results, slow ----


@pytest.mark.slow
@pytest.mark.ray
def test_trained_model_per_well_results_follow_the_planted_composition(tmp_path, smoke_checkpoint, ray_session):
    summary = score_demo_plate(smoke_checkpoint, str(tmp_path), wells=96, fields=2, size=128, seed=11, chunk_size=64)
    assert summary["images"] == 192 and summary["failed"] == 0
    agreement = pd.DataFrame(summary["planted_vs_predicted"]).set_index("class")
    # The smoke model (a tiny network, 3 epochs at 64 px) is weak overall, but the two most
    # frequent classes are learnt: per-well mean probability ranks wells with the class
    # above wells without it, well beyond chance (AUC 0.5) though not reliably above ~0.75.
    for name in ("Nucleoplasm", "Cytosol"):
        row = agreement.loc[name]
        assert row["wells_planted"] >= 10 and row["wells_other"] >= 10
        assert row["mean_prob_planted"] > row["mean_prob_other"], agreement
        assert row["auc"] > 0.65, agreement


# ------------------------------------------------------- pure functions ----


def test_well_table_counts_failed_fields_apart_from_negatives():
    base = {column: 0.2 for column in PROB_COLUMNS}
    rows = [
        {"plate": "P1", "well": "A01", **base, "prob_cytosol": 0.9, "labels": "6", "error": None},
        {"plate": "P1", "well": "A01", **base, "prob_cytosol": 0.5, "labels": "4", "error": None},
        {"plate": "P1", "well": "A01", **{c: np.nan for c in PROB_COLUMNS}, "labels": None, "error": "truncated"},
        {"plate": "P1", "well": "B02", **{c: np.nan for c in PROB_COLUMNS}, "labels": None, "error": "empty"},
        {"plate": None, "well": None, **base, "labels": "0", "error": None},
    ]
    wells = well_table(pd.DataFrame(rows), CLASS_NAMES).set_index("well")
    assert wells.loc["A01", ["images_scored", "images_failed"]].tolist() == [2, 1]
    assert wells.loc["A01", "mean_prob_cytosol"] == pytest.approx(0.7)
    assert wells.loc["A01", "frac_pos_cytosol"] == 0.5 and wells.loc["A01", "frac_pos_nucleoplasm"] == 0.5
    assert wells.loc["B02", ["images_scored", "images_failed"]].tolist() == [0, 1]
    assert np.isnan(wells.loc["B02", "frac_pos_cytosol"])
    assert plate_format(["A01", "H12"]) == (8, 12) and plate_format(["A01", "P24"]) == (16, 24)


def test_submission_keeps_every_id_and_fills_failed_images():
    predictions = pd.DataFrame({"image_id": ["a", "b", "c"], **{c: [0.1, 0.2, np.nan] for c in PROB_COLUMNS},
                                "labels": ["4", "", None], "error": [None, None, "truncated"]})
    predictions["prob_cytosol"] = [0.8, 0.9, np.nan]
    filled = submission_frame(predictions, list(CLASS_NAMES), ["c", "b", "a"], allow_empty=False)
    assert filled.to_dict("list") == {"Image": ["c", "b", "a"], "Label": ["6", "", "4"]}
    assert submission_frame(predictions, list(CLASS_NAMES), ["c"], allow_empty=True)["Label"].tolist() == [""]


def test_compare_with_planted_measures_separation():
    wells = pd.DataFrame({"plate": ["P"] * 4, "well": ["A01", "A02", "A03", "A04"],
                          **{f"mean_prob_{c[5:]}": [0.1, 0.2, 0.3, 0.4] for c in PROB_COLUMNS},
                          **{f"frac_pos_{c[5:]}": [0.0, 0.0, 1.0, 1.0] for c in PROB_COLUMNS}})
    planted = pd.DataFrame({"plate": ["P"] * 4, "well": ["A01", "A02", "A03", "A04"], "labels": ["0", "0", "6", "6 0"]})
    agreement = compare_with_planted(wells, planted, CLASS_NAMES).set_index("class")
    assert agreement.loc["Cytosol", "auc"] == 1.0 and agreement.loc["Cytosol", "wells_planted"] == 2
    assert agreement.loc["Mitochondria", "mean_prob_planted"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)


def test_predict_help_documents_the_options(capsys):
    from protein_ray.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--input", "--output", "--num-gpus", "--batch-size", "--actors", "--tta",
                   "--embeddings", "--max-error-rate", "--max-pixels", "--allow-empty", "--overwrite",
                   "predictions.parquet", "wells.csv", "submission.csv"):
        assert option in text


def test_part_writer_writes_each_chunk_once_without_duplicate_rows(tmp_path):
    index = pd.DataFrame({"image_id": [f"i{n}" for n in range(5)], "source": "x", "plate": None, "well": None,
                          "field": pd.array([None] * 5, dtype="Int32")})
    writer = PartWriter(index, CLASS_NAMES, chunk_size=3, chunks=[0, 1], parts=str(tmp_path))

    def results(rows, error=""):
        n = len(rows)
        return {"row": np.array(rows, np.int64), "error": np.array([error] * n, dtype=object),
                "detail": np.array([error] * n, dtype=object), "probs": np.full((n, 10), 0.5, np.float32)}

    writer.add(results([4, 0]))
    writer.add(results([0, 1], error="empty"))  # row 0 again: dropped
    assert writer.written == set()
    writer.add(results([2, 3]))
    assert writer.written == {0, 1}
    writer.add(results([1]))  # after its chunk was written: ignored
    writer.check_complete()
    part = pd.read_parquet(tmp_path / "part-000000.parquet")
    assert part["row"].tolist() == [0, 1, 2] and part["image_id"].tolist() == ["i0", "i1", "i2"]
    assert part["error"].fillna("").tolist() == ["", "empty", ""]
    assert len(pd.read_parquet(tmp_path / "part-000001.parquet")) == 2
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize(
    "cluster, options, batches, expected",
    [
        ({"CPU": 8.0}, {}, 1000, (8, 0.0, True)),  # no GPU: one CPU actor per CPU, each decoding its images
        ({"CPU": 8.0}, {}, 2, (2, 0.0, True)),  # ... but no more than there are model batches
        ({"CPU": 8.0}, {"cpus_per_actor": 2}, 1000, (4, 0.0, True)),
        ({"CPU": 8.0}, {"decode_tasks": 2}, 1000, (1, 0.0, False)),  # one actor when decode tasks are asked for
        ({"CPU": 4.0}, {"actors": 2, "cpus_per_actor": 2}, 1000, (2, 0.0, True)),  # no CPU need be left to decode
        ({"CPU": 16.0, "GPU": 4.0}, {}, 1000, (4, 1.0, False)),  # one actor per GPU, fed by decode tasks
        ({"CPU": 16.0, "GPU": 4.0}, {"num_gpus": 0.5}, 1000, (8, 0.5, False)),  # two actors share each GPU
        ({"CPU": 16.0, "GPU": 4.0}, {"actors": 2}, 10, (2, 1.0, False)),
    ],
)
def test_resource_plan_follows_the_cluster(cluster, options, batches, expected):
    from protein_ray.scoring.options import PredictOptions
    from protein_ray.scoring.pipeline import plan_resources

    plan = plan_resources(PredictOptions("c", ["i"], "o", **options), cluster, 50 * 2**20, Preprocessing(64), batches)
    assert (plan.actors, plan.num_gpus, plan.decode_in_actors) == expected
    assert plan.actor_memory > 3 * 50 * 2**20  # the weights, their copy while loading, and a batch


def test_resource_plan_refuses_what_the_cluster_cannot_give():
    from protein_ray.scoring.options import PredictJobError, PredictOptions
    from protein_ray.scoring.pipeline import plan_resources

    def plan(cluster, **options):
        return plan_resources(PredictOptions("c", ["i"], "o", **options), cluster, 1, Preprocessing(64), 100)

    with pytest.raises(PredictJobError, match="cluster has 0 GPU"):
        plan({"CPU": 4.0}, num_gpus=1)
    with pytest.raises(PredictJobError, match="leave no CPU .* for decoding"):
        plan({"CPU": 4.0}, actors=2, cpus_per_actor=2, decode_tasks=1)
    with pytest.raises(PredictJobError, match="need more than the cluster's 4 CPU"):
        plan({"CPU": 4.0}, actors=3, cpus_per_actor=2)
    small, tta = (plan_resources(PredictOptions("c", ["i"], "o", tta=t), {"CPU": 4.0}, 1, Preprocessing(512), 100)
                  for t in (False, True))
    assert tta.actor_memory > small.actor_memory  # four views of each batch are held at once


def test_long_lived_setup_freezes_what_it_made_and_gives_the_collector_back():
    import gc

    from protein_ray.runtime import long_lived_setup

    frozen = gc.get_freeze_count()
    try:
        with long_lived_setup():
            assert not gc.isenabled()  # paused while the set-up makes its objects
            made = [[i] for i in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
        with pytest.raises(RuntimeError, match="set-up failed"), long_lived_setup():
            raise RuntimeError("set-up failed")
        assert gc.isenabled()
        gc.disable()  # a caller that had paused the collector keeps it paused
        with long_lived_setup():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_model_actor_freezes_its_model_and_imports(tiny_checkpoint):
    import gc

    import torch

    from protein_ray.scoring.stages import ModelStage

    gc.unfreeze()
    try:
        stage = ModelStage(str(tiny_checkpoint), tta=False, threads=torch.get_num_threads(), actors=1,
                           embeddings=False)
        # Frozen objects are out of every collection, the one at exit included (which
        # cost each actor 1 s of CPU while the driver wrote the outputs).
        assert gc.get_freeze_count() > 10_000
        assert stage.predictor.num_classes > 0
    finally:
        gc.unfreeze()


def test_a_model_actor_imports_torch_timm_and_the_decoder_with_the_collector_paused(tiny_checkpoint):
    # In a fresh process with ray.data imported, as a Ray Data actor is when it unpickles
    # its class: the stage's module must not import torch, so that its __init__ does,
    # as long-lived set-up (with torch imported at module level: 351 collections).
    script = textwrap.dedent(f"""
        import gc, sys
        import ray.data

        collections_after_torch = []
        gc.callbacks.append(lambda phase, info: collections_after_torch.append(1)
                            if phase == "start" and "torch" in sys.modules else None)
        from protein_ray.scoring.stages import DecodeAndModelStage
        light = "torch" not in sys.modules
        # The decode arguments are only used per batch.
        stage = DecodeAndModelStage({{}}, checkpoint={str(tiny_checkpoint)!r}, tta=False, threads=1, actors=1,
                                    embeddings=False)
        print(light, len(collections_after_torch), "timm" in sys.modules, stage.predictor.num_classes)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    light, collections, timm_imported, num_classes = run.stdout.split()[-4:]
    assert light == "True" and timm_imported == "True" and int(num_classes) > 0
    assert collections == "0"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_a_cpu_model_actor_keeps_freed_memory_for_the_next_batch(tiny_checkpoint):
    # In a fresh process (glibc's mallinfo2 counts what malloc holds): with glibc's defaults a
    # 64 MiB block is mapped on its own and unmapped when freed, so the next batch faults it
    # in again; once a CPU model actor has started it comes from the heap and stays there.
    script = textwrap.dedent(f"""
        import ctypes
        import numpy as np

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = MallInfo2

        def block_of_64_mib():
            before = mallinfo2()
            block = np.ones(64 * 2**20, np.uint8)
            mapped_alone = (mallinfo2().hblkhd - before.hblkhd) >> 20
            del block
            return mapped_alone, mallinfo2().fordblks >> 20  # MiB mapped for it; MiB free in the heap after

        defaults = block_of_64_mib()
        from protein_ray.scoring.stages import ModelStage
        ModelStage({str(tiny_checkpoint)!r}, tta=False, threads=1, actors=1, embeddings=False)
        print(*defaults, *block_of_64_mib())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    mapped_alone, _, mapped_alone_in_actor, kept_in_actor = map(int, run.stdout.split()[-4:])
    assert mapped_alone == 64
    assert mapped_alone_in_actor == 0 and kept_in_actor >= 64


def test_chunk_work_splits_chunks_into_items_that_never_cross_a_chunk():
    import json

    from protein_ray.scoring.decode import chunk_work

    rows = pd.DataFrame({"sources": [[f"/d/{i}.png"] for i in range(10)], "shard_file": [None] * 10,
                         "shard_row": [None] * 10})
    whole = chunk_work(rows, 4, [0, 2])  # chunk 1 already written
    assert [(item["chunk"], [w["row"] for w in json.loads(item["work"])]) for item in whole] == [
        (0, [0, 1, 2, 3]), (2, [8, 9])]
    pieces = chunk_work(rows, 4, [0, 1, 2], item_size=3)
    assert [(item["chunk"], [w["row"] for w in json.loads(item["work"])]) for item in pieces] == [
        (0, [0, 1, 2]), (0, [3]), (1, [4, 5, 6]), (1, [7]), (2, [8, 9])]
    assert json.loads(pieces[0]["work"])[0] == {"row": 0, "sources": ["/d/0.png"]}


def test_plate_grid_puts_each_well_at_its_row_and_column():
    from protein_ray.plates import parse_well, plate_grid

    wells = pd.DataFrame({"well": ["B07", "H12", "A1"], "value": [0.5, 0.9, 0.1]})
    grid = plate_grid(wells, "value", (8, 12))
    assert parse_well("B7") == parse_well("B07") == (1, 6) and parse_well("Q01") is None
    assert grid[1, 6] == 0.5 and grid[7, 11] == 0.9 and grid[0, 0] == 0.1  # row B, column 7
    assert np.isnan(grid[6, 1]) and np.isnan(grid).sum() == 96 - 3


def test_each_class_heatmap_png_shows_that_class_values(tmp_path):
    """Each class's PNG carries its own class's values, in viridis."""
    import matplotlib

    from protein_ray.plates import class_keys, write_heatmaps

    classes = ["Nucleoplasm", "Cytosol", "Mitochondria"]
    keys = class_keys(classes)
    wells = pd.DataFrame({"plate": "P1", "well": [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]})
    for key, value in zip(keys, (0.0, 1.0, 0.5)):
        wells[f"frac_pos_{key}"] = value
    write_heatmaps(wells, str(tmp_path), classes)
    for key, value in zip(keys, (0.0, 1.0, 0.5)):
        pixels = np.asarray(Image.open(tmp_path / "P1" / f"{key}.png").convert("RGB")).reshape(-1, 3)
        colours, counts = np.unique(pixels[(pixels < 250).any(axis=1)], axis=0, return_counts=True)
        expected = np.array(matplotlib.colormaps["viridis"](value)[:3]) * 255
        assert np.abs(colours[counts.argmax()] - expected).max() <= 2, key  # the plate's 96 wells


def test_heatmap_png_draws_each_well_at_its_row_and_column(tmp_path):
    """Row B, column 7 of a 96-well plate: the second row from the top, the seventh from the left."""
    from protein_ray.plates import HEATMAP_CELL_PX, plate_grid, viridis_rgb, well_mosaic, write_heatmaps

    wells = pd.DataFrame({"plate": "P1", "well": [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]})
    wells["frac_pos_nucleoplasm"] = np.where(wells["well"] == "B07", 1.0, 0.0)
    write_heatmaps(wells, str(tmp_path), ["Nucleoplasm"])
    cell = HEATMAP_CELL_PX[0]
    mosaic = well_mosaic(plate_grid(wells, "frac_pos_nucleoplasm", (8, 12)), cell)
    centres = mosaic[cell // 2::cell, cell // 2::cell]  # one pixel per well
    assert centres.shape == (8, 12, 3) and np.argwhere((centres == viridis_rgb()[255]).all(-1)).tolist() == [[1, 6]]
    pixels = np.asarray(Image.open(tmp_path / "P1" / "nucleoplasm.png").convert("RGB"))
    ys, xs = np.nonzero((pixels == viridis_rgb()[0]).all(-1))  # the first in reading order: well A01's corner
    assert np.array_equal(pixels[ys[0]:ys[0] + 8 * cell, xs[0]:xs[0] + 12 * cell], mosaic)


def test_a_rerun_scores_again_the_chunks_whose_rows_failed_to_read(tmp_path):
    from protein_ray.scoring.parts import PARTS_DIR, part_uri, prepare_output

    index = pd.DataFrame({"image_id": [f"i{n}" for n in range(4)], "source": "x", "plate": None, "well": None,
                          "field": pd.array([None] * 4, dtype="Int32")})
    writer = PartWriter(index, CLASS_NAMES, chunk_size=2, chunks=[0, 1], parts=str(tmp_path / PARTS_DIR))
    for rows, error in (([0, 1], "truncated"), ([2, 3], "unreadable")):  # a bad file; S3 briefly unreachable
        writer.add({"row": np.array(rows, np.int64), "error": np.array([error, ""], dtype=object),
                    "detail": np.array([error, ""], dtype=object), "probs": np.full((2, 10), 0.5, np.float32)})
    assert storage.exists(part_uri(str(tmp_path / PARTS_DIR), 1))
    done = prepare_output(str(tmp_path), {"format": "test"}, overwrite=False)
    assert done == {0}  # chunk 1 is scored again; a truncated file would fail the same way, so chunk 0 stays


def test_a_shard_that_cannot_be_read_fails_its_rows_not_the_job(tmp_path):
    from protein_ray.scoring.decode import decode_rows, read_shard_images

    broken = tmp_path / "part-0.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file PAR1")
    work = [{"row": 0, "shard": str(broken), "at": 0}, {"row": 1, "shard": str(broken), "at": 1}]
    images = read_shard_images(work)
    assert set(images) == {0, 1} and all(isinstance(error, Exception) for error in images.values())
    rows = decode_rows(work, images, Preprocessing(32), max_pixels=10**6, measure_qc=True)
    assert np.isnan(rows["qc"]).all() and rows["qc"].shape == (2, 5)  # focus, foreground, saturation x 3 stains
    assert list(rows["error"]) == ["unreadable", "unreadable"] and str(broken) in rows["detail"][0]
