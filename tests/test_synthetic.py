"""The synthetic HPA-like generator: determinism, layouts, realism, and that global stats can't solve it."""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from protein_ray import synthetic
from protein_ray.labels import NUM_CLASSES, multi_hot_matrix, parse_label_string
from protein_ray.synthetic_cells import render_field


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest (it holds timings)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synthetic.MANIFEST}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kaggle") / "data"
    synthetic.write_kaggle_dataset(out, n_train=12, n_test=5, size=64, seed=3, workers=1, progress=False)
    return out


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_whatever_the_worker_count(kaggle, tmp_path):
    again = tmp_path / "again"
    synthetic.write_kaggle_dataset(again, n_train=12, n_test=5, size=64, seed=3, workers=2, progress=False)
    assert digests(again) == digests(kaggle)


def test_different_seed_gives_different_images(kaggle, tmp_path):
    other = tmp_path / "other"
    synthetic.write_kaggle_dataset(other, n_train=12, n_test=5, size=64, seed=4, workers=1, progress=False)
    a, b = digests(kaggle), digests(other)
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a if name.endswith(".png"))


def test_render_field_is_a_pure_function_of_the_rng():
    first = render_field([2, 4], 64, np.random.default_rng(11))
    second = render_field([2, 4], 64, np.random.default_rng(11))
    assert first.dtype == np.float32 and first.shape == (64, 64, 3)
    assert 0 <= first.min() and first.max() <= 1
    np.testing.assert_array_equal(first, second)


# ----------------------------------------------------------------------------- layouts
def test_kaggle_layout(kaggle):
    train, submission, truth = (read_csv(kaggle / name) for name in ("train.csv", "submission.csv", "test_labels.csv"))
    assert list(train[0]) == ["Image", "Label"] and list(submission[0]) == ["Image", "Label"]
    assert len(train) == 12 and len(submission) == 5
    assert [row["Image"] for row in submission] == [row["Image"] for row in truth]
    assert all(row["Label"] == "" for row in submission)
    assert all(parse_label_string(row["Label"]) for row in train + truth)  # never an empty label set
    assert sorted(p.stem for p in (kaggle / "train").iterdir()) == sorted(row["Image"] for row in train)
    assert sorted(p.stem for p in (kaggle / "test").iterdir()) == sorted(row["Image"] for row in submission)
    assert len({row["Image"] for row in train + submission}) == 17
    with Image.open(kaggle / "train" / f"{train[0]['Image']}.png") as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    assert not (kaggle / synthetic.INCOMPLETE_MARKER).exists()
    assert not list(kaggle.parent.glob(".*partial*"))  # the staging folder is gone


@pytest.mark.parametrize("channels, bit_depth", [("merged", 8), ("merged", 16), ("separate", 8), ("separate", 16)])
def test_plate_layout(tmp_path, channels, bit_depth):
    out = tmp_path / "plates"
    plates, fields = (2, 2) if channels == "merged" and bit_depth == 8 else (1, 1)  # the full grid once
    summary = synthetic.write_plate_dataset(out, plates=plates, wells=96, fields=fields, channels=channels,
                                            bit_depth=bit_depth, size=32, seed=1, workers=1, progress=False)
    truth, wells = read_csv(out / "ground_truth.csv"), read_csv(out / "wells.csv")
    assert list(truth[0]) == ["plate", "well", "field", "image_id", "labels"]
    assert list(wells[0]) == ["plate", "well", "labels"]
    assert len(truth) == summary["images"] == plates * 96 * fields and len(wells) == plates * 96
    assert {row["plate"] for row in truth} == {f"P{p:03d}" for p in range(1, plates + 1)} == set(summary["plate_names"])
    assert wells[0]["well"] == "A01" and wells[-1]["well"] == "H12"
    well_labels = {(row["plate"], row["well"]): row["labels"] for row in wells}
    assert all(row["labels"] == well_labels[row["plate"], row["well"]] for row in truth)  # fields share the well's set
    assert all(row["image_id"] == f"{row['plate']}_{row['well']}_f{row['field']}" for row in truth)

    ext = "png" if bit_depth == 8 else "tif"
    suffixes = [f".{ext}"] if channels == "merged" else [f"_{s}.{ext}" for s in ("red", "green", "blue")]
    expected = {f"{row['plate']}/{row['image_id']}{suffix}" for row in truth for suffix in suffixes}
    written = {str(p.relative_to(out)) for p in out.glob("P*/*")}
    assert written == expected and summary["files"] == len(expected)

    first = out / "P001" / f"P001_A01_f1{suffixes[0]}"
    pixels = np.asarray(Image.open(first)) if ext == "png" else tifffile.imread(first)
    assert pixels.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
    assert pixels.shape == ((32, 32, 3) if channels == "merged" else (32, 32))
    if bit_depth == 16:
        assert pixels.max() > 255  # the 16-bit range is used, not 8-bit values in a 16-bit file


def test_well_names_384():
    names = synthetic.well_names(384)
    assert len(names) == 384 and names[0] == "A01" and names[-1] == "P24" and len(set(names)) == 384


# ----------------------------------------------------------------------------- realism
def real_label_sets() -> list[list[int]]:
    resource = importlib.resources.files("protein_ray") / "resources" / "label_set_counts.csv"
    with resource.open() as handle:
        rows = list(csv.DictReader(handle))
    return [parse_label_string(row["label_set"]) for row in rows for _ in range(int(row["count"]))]


def test_label_sets_follow_real_frequencies():
    real = real_label_sets()
    sampled = synthetic.sample_label_sets(2000, np.random.default_rng(0))
    assert len(real) == 19236
    np.testing.assert_allclose(multi_hot_matrix(sampled).mean(0), multi_hot_matrix(real).mean(0), atol=0.03)
    for count in (1, 2, 3):
        real_share = np.mean([len(s) == count for s in real])
        assert abs(np.mean([len(s) == count for s in sampled]) - real_share) < 0.03


def test_images_are_dark_like_hpa():
    sets = synthetic.sample_label_sets(50, np.random.default_rng(5))
    means = np.array([render_field(labels, 96, np.random.default_rng([5, i])).mean((0, 1))
                      for i, labels in enumerate(sets)])
    red, green, blue = means.mean(0)
    assert 0.05 < red < 0.12 and 0.03 < green < 0.08 and 0.03 < blue < 0.08, means.mean(0)
    assert means.std(0).min() > 0.005  # brightness varies from image to image


def test_each_class_leaves_a_visible_green_signal():
    for class_id in range(NUM_CLASSES):
        green = render_field([class_id], 128, np.random.default_rng(class_id))[..., 1]
        assert np.percentile(green, 99.5) > 0.15, class_id


def test_global_channel_statistics_do_not_solve_the_task():
    """15 global features + one logistic regression per class must stay far from the pattern task."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sets = synthetic.sample_label_sets(600, np.random.default_rng(1))
    features = []
    for i, labels in enumerate(sets):
        pixels = render_field(labels, 64, np.random.default_rng([7, i])).reshape(-1, 3)
        features.append(np.concatenate([pixels.mean(0), pixels.std(0), *np.percentile(pixels, [50, 90, 99], axis=0)]))
    x, y = np.array(features), multi_hot_matrix(sets)
    predicted = np.zeros_like(y)
    for class_id in range(NUM_CLASSES):
        model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
        predicted[:, class_id] = cross_val_predict(model, x, y[:, class_id], cv=5)
    macro_f1 = f1_score(y, predicted, average="macro", zero_division=0)
    print(f"global-statistics baseline macro F1: {macro_f1:.3f}")
    assert macro_f1 <= 0.6


# ----------------------------------------------------------------------------- reuse and safety
def test_refuses_to_overwrite_an_unrelated_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        synthetic.write_kaggle_dataset(tmp_path, n_train=2, n_test=1, size=32, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_reuses_identical_and_replaces_different(tmp_path):
    out = tmp_path / "data"
    first = synthetic.write_kaggle_dataset(out, n_train=3, n_test=2, size=32, workers=1, progress=False)
    marker = out / "train" / "syn000000.png"
    before = marker.stat().st_mtime_ns
    again = synthetic.write_kaggle_dataset(out, n_train=3, n_test=2, size=32, workers=1, progress=False)
    assert (first["reused"], again["reused"]) == (False, True)
    assert again["train_csv"] == first["train_csv"] == str(out / "train.csv")
    assert marker.stat().st_mtime_ns == before
    changed = synthetic.write_kaggle_dataset(out, n_train=4, n_test=2, size=32, workers=1, progress=False)
    assert not changed["reused"] and len(read_csv(out / "train.csv")) == 4
    assert json.loads((out / synthetic.MANIFEST).read_text())["args"]["n_train"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging or old copies left


def test_failed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_render_jobs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.write_kaggle_dataset(tmp_path / "data", n_train=3, n_test=1, size=32, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        synthetic.write_plate_dataset(tmp_path / "p", channels="rgb", progress=False)
    with pytest.raises(ValueError, match="bit_depth"):
        synthetic.write_plate_dataset(tmp_path / "p", bit_depth=12, progress=False)
    with pytest.raises(ValueError, match="wells"):
        synthetic.write_plate_dataset(tmp_path / "p", wells=48, progress=False)
