"""The synthetic HPA-like generator: determinism, layouts, vendor exports, realism, and that global stats can't solve it."""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from protein_ray import cli, storage, synthetic, synthetic_exports
from protein_ray.labels import CLASS_NAMES, NUM_CLASSES, multi_hot_matrix, parse_label_string
from protein_ray.synthetic_cells import _build_field, render_field, render_stains


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



def test_the_pictures_have_not_changed():
    """Figures of one render: if a change moves them, bump GENERATOR_VERSION (saved data sets differ) and these."""
    pixels = render_field([2, 4], 64, np.random.default_rng(11)).astype(np.float64)
    np.testing.assert_allclose(pixels.mean((0, 1)), [0.06010053, 0.01481866, 0.0302542], rtol=1e-4)
    np.testing.assert_allclose(pixels.std((0, 1)), [0.10968152, 0.03668159, 0.10629188], rtol=1e-4)
    np.testing.assert_allclose(pixels[20, 30], [0.26673818, 0.01391395, 0.00928224], rtol=1e-4)


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
    assert not (kaggle / storage.INCOMPLETE_MARKER).exists()
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


# ----------------------------------------------------------------------------- 4 stains
def test_render_stains_adds_yellow_and_keeps_the_three_stains():
    four = render_stains([2, 4], 64, np.random.default_rng(11))
    assert four.dtype == np.float32 and four.shape == (64, 64, 4) and 0 <= four.min() and four.max() <= 1
    np.testing.assert_array_equal(four[..., :3], render_field([2, 4], 64, np.random.default_rng(11)))
    other_labels = render_stains([0, 7, 8], 64, np.random.default_rng(11))
    np.testing.assert_array_equal(four[..., 3], other_labels[..., 3])  # the ER does not follow the labels
    assert not np.array_equal(four[..., 1], other_labels[..., 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_yellow_er_is_a_mesh_in_the_cytoplasm_brightest_near_the_nucleus(seed):
    yellow = render_stains([4], 256, np.random.default_rng(seed))[..., 3]
    field = _build_field(256, np.random.default_rng(seed))  # render_stains builds this same field first
    cytoplasm = field.cytoplasm & (field.edge_distance > 3)
    nucleus = ndimage.binary_erosion(field.nucleus, iterations=4)  # away from the blurred rim
    assert yellow[cytoplasm].mean() > 5 * yellow[nucleus].mean()
    near, far = cytoplasm & (field.perinuclear > 0.7), cytoplasm & (field.perinuclear < 0.3)
    assert yellow[near].mean() > 1.6 * yellow[far].mean()
    detail = yellow - ndimage.gaussian_filter(yellow, 4)  # a mesh has strong local contrast, a fill does not
    assert detail[cytoplasm].std() > 0.3 * yellow[cytoplasm].mean()


# ----------------------------------------------------------------------------- vendor exports
IMAGEXPRESS_IMAGE = re.compile(r"(?P<plate>[^_/]+)_(?P<well>[A-P]\d{2})_s(?P<site>\d+)_w(?P<wavelength>[1-9])\.TIF")
IMAGEXPRESS_THUMB = re.compile(
    r"(?P<plate>[^_/]+)_(?P<well>[A-P]\d{2})_s(?P<site>\d+)_w(?P<wavelength>[1-9])_thumb(?P<guid>[0-9A-F]{8})\.tif")
PHENIX_IMAGE = re.compile(
    r"r(?P<row>\d{2})c(?P<column>\d{2})f(?P<field>\d{2})p(?P<plane>\d{2})-ch(?P<channel>\d+)sk1fk1fl1\.tiff")
EXPORT_WELLS = ["B03", "C05"]
EXPORT = dict(wells=EXPORT_WELLS, fields=2, size=64, seed=7, workers=1, progress=False)


@pytest.fixture(scope="module")
def imagexpress(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ix") / "export"
    return out, synthetic_exports.write_imagexpress_export(out, drop_stain=("C05", 2, 2), **EXPORT)


@pytest.fixture(scope="module")
def phenix(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phenix") / "export"
    return out, synthetic_exports.write_phenix_export(out, plates=2, drop_stain=("B03", 1, 4), **EXPORT)


def every_field(plates=("P001",)) -> set[tuple[str, str, int, int]]:
    return {(plate, well, site, n) for plate in plates for well in EXPORT_WELLS for site in (1, 2) for n in range(1, 5)}


def test_imagexpress_names_thumbnails_and_plate_file(imagexpress):
    out, summary = imagexpress
    names = sorted(p.name for p in (out / "P001").iterdir())
    images = [IMAGEXPRESS_IMAGE.fullmatch(name) for name in names]
    thumbs = [IMAGEXPRESS_THUMB.fullmatch(name) for name in names]
    others = [name for name, image, thumb in zip(names, images, thumbs) if not image and not thumb]
    assert others == ["P001.HTD"]

    def keys(matches):
        return {(m["plate"], m["well"], int(m["site"]), int(m["wavelength"])) for m in matches if m}

    expected = every_field() - {("P001", "C05", 2, 2)}  # the dropped stain
    assert keys(images) == keys(thumbs) == expected
    assert summary["missing_files"] == ["P001/P001_C05_s2_w2.TIF"] and not (out / "P001/P001_C05_s2_w2.TIF").exists()
    thumb = tifffile.imread(next((out / "P001").glob("P001_B03_s1_w1_thumb*.tif")))
    assert thumb.dtype == np.uint8 and thumb.shape == (16, 16) and thumb.max() > 128  # small, 8-bit, stretched
    htd = (out / "P001" / "P001.HTD").read_text()
    assert htd.startswith('"HTSInfoFile"') and '"NWavelengths", 4' in htd and '"WaveName1", "DAPI"' in htd
    assert '"WellsSelection2", FALSE, FALSE, TRUE, FALSE' in htd  # B03 is imaged
    assert summary["channels"]["4"].startswith("endoplasmic reticulum")


def test_phenix_names_and_index(phenix):
    out, summary = phenix
    found = set()
    for plate in ("P001", "P002"):
        names = {p.name for p in (out / plate / "Images").iterdir()}
        assert "Index.idx.xml" in names
        for name in names - {"Index.idx.xml"}:
            match = PHENIX_IMAGE.fullmatch(name)
            assert match, name
            well = f"{chr(ord('A') + int(match['row']) - 1)}{int(match['column']):02d}"  # r02c03 is B03
            found.add((plate, well, int(match["field"]), int(match["channel"])))
        index = ElementTree.parse(out / plate / "Images" / "Index.idx.xml").getroot()
        assert index.findtext("Plates/Plate/Name") == plate
        assert [e.findtext("ChannelName") for e in index.iterfind("Maps/Map/Entry")] == \
            ["DAPI", "Alexa 488", "Alexa 568", "Alexa 647"]
        assert {e.get("id") for e in index.iterfind("Plates/Plate/Well")} == {"0203", "0305"}
        assert {e.findtext("URL") for e in index.iterfind("Images/Image")} == names - {"Index.idx.xml"} | (
            {"r02c03f01p01-ch4sk1fk1fl1.tiff"})  # the index lists the lost file
    assert found == every_field(("P001", "P002")) - {(p, "B03", 1, 4) for p in ("P001", "P002")}
    assert summary["missing_files"] == [f"{p}/Images/r02c03f01p01-ch4sk1fk1fl1.tiff" for p in ("P001", "P002")]


def test_export_truth_tables(phenix):
    out, _ = phenix
    plate_map, truth = read_csv(out / "plate_map.csv"), read_csv(out / "ground_truth.csv")
    assert list(plate_map[0]) == ["plate", "well", "labels"] and list(truth[0]) == ["plate", "well", "field", "labels"]
    assert [(row["plate"], row["well"]) for row in plate_map] == [(p, w) for p in ("P001", "P002") for w in EXPORT_WELLS]
    well_labels = {(row["plate"], row["well"]): row["labels"] for row in plate_map}
    assert all(parse_label_string(labels) for labels in well_labels.values())
    assert len(truth) == 2 * 2 * 2 and all(row["labels"] == well_labels[row["plate"], row["well"]] for row in truth)


def test_exports_are_12_bit_lzw_uint16(imagexpress, phenix):
    files = sorted(imagexpress[0].glob("P001/*.TIF")) + sorted(phenix[0].glob("P00*/Images/*.tiff"))
    assert len(files) == 15 + 30
    for path in files:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            assert page.compression == tifffile.COMPRESSION.LZW, path
            assert page.dtype == np.uint16 and page.shape == (64, 64)
            pixels = page.asarray()
        assert pixels.max() <= 4095 and pixels.min() >= 90, path  # 12-bit data above the camera offset
        assert np.percentile(pixels, 5) < 300  # dark background sits near the ~100-count offset
    brightest = max(tifffile.imread(path).max() for path in files)
    assert brightest > 2000  # the 12-bit range is used, not 8-bit values


def test_exports_same_seed_same_bytes_and_the_same_plate_in_both_forms(imagexpress, phenix, tmp_path):
    again = tmp_path / "again"
    summary = synthetic_exports.write_imagexpress_export(again, drop_stain=("C05", 2, 2), **{**EXPORT, "workers": 2})
    assert digests(again) == digests(imagexpress[0]) and not summary["reused"]
    ix = tifffile.imread(imagexpress[0] / "P001" / "P001_B03_s2_w3.TIF")
    np.testing.assert_array_equal(ix, tifffile.imread(phenix[0] / "P001" / "Images" / "r02c03f02p01-ch3sk1fk1fl1.tiff"))
    other = synthetic_exports.write_imagexpress_export(tmp_path / "other", **{**EXPORT, "seed": 8})
    assert not np.array_equal(ix, tifffile.imread(Path(other["out"]) / "P001" / "P001_B03_s2_w3.TIF"))


def test_each_well_has_its_own_content_whatever_else_is_imaged(tmp_path):
    row = [f"D{c:02d}" for c in range(1, 13)]
    common = dict(fields=1, size=16, seed=5, workers=1, progress=False)
    full = synthetic_exports.write_phenix_export(tmp_path / "row", wells=row, **common)
    alone = synthetic_exports.write_phenix_export(tmp_path / "alone", wells=["D07"], **common)
    images = {w: tifffile.imread(Path(full["out"]) / "P001" / "Images" / f"r04c{w[1:]}f01p01-ch2sk1fk1fl1.tiff")
              for w in row}
    assert len({pixels.tobytes() for pixels in images.values()}) == 12
    alone_d07 = tifffile.imread(Path(alone["out"]) / "P001" / "Images" / "r04c07f01p01-ch2sk1fk1fl1.tiff")
    np.testing.assert_array_equal(alone_d07, images["D07"])
    labels = {row["well"]: row["labels"] for row in read_csv(Path(full["plate_map_csv"]))}
    assert read_csv(Path(alone["plate_map_csv"]))[0]["labels"] == labels["D07"]
    assert len(set(labels.values())) > 1


def test_export_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="wells"):
        synthetic_exports.write_phenix_export(tmp_path / "x", wells=["B03", "Z99"], progress=False)
    with pytest.raises(ValueError, match="drop_stain"):
        synthetic_exports.write_phenix_export(tmp_path / "x", wells=["B03"], drop_stain=("C05", 1, 2), progress=False)
    with pytest.raises(ValueError, match="drop_stain"):
        synthetic_exports.write_phenix_export(tmp_path / "x", wells=["B03"], drop_stain=("B03", 1, 5), progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_writes_a_whole_384_well_export(tmp_path, capsys):
    out = tmp_path / "ix"
    argv = ["synth", "--out", str(out), "--layout", "imagexpress", "--wells", "384", "--fields", "1", "--size", "16",
            "--seed", "3", "--workers", "1"]
    assert cli.main(argv) == 0
    assert len(list(out.glob("P001/*.TIF"))) == 384 * 4
    assert '"YWells", 16' in (out / "P001" / "P001.HTD").read_text()
    assert json.loads((out / synthetic.MANIFEST).read_text())["args"]["kind"] == "imagexpress"


# ----------------------------------------------------------------------------- controls and planted QC faults
CONTROLS = dict(wells=96, fields=1, size=32, seed=6, workers=1, progress=False)


@pytest.fixture(scope="module")
def plain_plate(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "plate"
    synthetic.write_plate_dataset(out, plates=2, **CONTROLS)
    return out


def test_controls_plate_map_and_labels(plain_plate, tmp_path):
    out = tmp_path / "controls"
    summary = synthetic.write_plate_dataset(out, plates=2, controls=True, **CONTROLS)
    plate_map, wells = read_csv(out / "plate_map.csv"), read_csv(out / "wells.csv")
    assert list(plate_map[0]) == ["plate", "well", "role", "target", "compound"] and len(plate_map) == 2 * 96
    assert summary["plate_map_csv"] == str(out / "plate_map.csv") and summary["target"] == "Plasma membrane"
    target = CLASS_NAMES.index("Plasma membrane")
    labels = {(row["plate"], row["well"]): parse_label_string(row["labels"]) for row in wells}
    for row in plate_map:
        column, key = int(row["well"][1:]), (row["plate"], row["well"])
        role = "negative" if column <= 2 else "positive" if column >= 11 else "sample"
        assert row["role"] == role and (row["target"] == "Plasma membrane") == (role == "positive"), row
        assert row["compound"] == {"negative": "DMSO", "positive": "control-plasma-membrane"}.get(role, row["compound"])
        if role != "sample":
            assert (target in labels[key]) == (role == "positive"), row
    samples = [row["compound"] for row in plate_map if row["role"] == "sample"]
    assert len(set(samples)) == len(samples) == 2 * 8 * 8 and all(re.fullmatch(r"cmpd-\d{4}", c) for c in samples)
    assert {tuple(labels[r["plate"], r["well"]]) for r in plate_map if r["role"] == "negative"} == {(4,)}  # Nucleoplasm
    # Sample wells are the plain plate's, label and pixel for pixel; only control wells changed.
    plain, mine = digests(plain_plate), digests(out)
    sample_wells = {(row["plate"], row["well"]) for row in plate_map if row["role"] == "sample"}
    plain_labels = {(row["plate"], row["well"]): parse_label_string(row["labels"])
                    for row in read_csv(plain_plate / "wells.csv")}
    assert all(labels[key] == plain_labels[key] for key in sample_wells)
    changed = {key for key in labels if labels[key] != plain_labels[key]}
    assert changed and not changed & sample_wells
    for name in (name for name in plain if name.endswith(".png")):  # an image changes iff its labels did
        key = (name.split("/")[0], name.split("_")[1])
        assert (plain[name] != mine[name]) == (key in changed), name


def test_controls_on_384_wells_and_another_target(tmp_path):
    out = tmp_path / "p384"
    synthetic.write_plate_dataset(out, wells=384, fields=1, size=16, controls=True, target="nucleoplasm",
                                  workers=1, progress=False)
    plate_map, wells = read_csv(out / "plate_map.csv"), read_csv(out / "wells.csv")
    roles = {int(row["well"][1:]): row["role"] for row in plate_map}
    assert [roles[c] for c in (1, 2, 3, 22, 23, 24)] == ["negative", "negative", "sample", "sample", "positive", "positive"]
    by_role = {}
    for row, well in zip(plate_map, wells):
        by_role.setdefault(row["role"], set()).add(well["labels"])
    assert by_role["positive"] == {"4"} and by_role["negative"] == {"6"}  # Cytosol: the commonest set without 4
    assert json.loads((out / synthetic.MANIFEST).read_text())["args"]["target"] == "Nucleoplasm"


def test_control_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="controls=True"):
        synthetic.write_plate_dataset(tmp_path / "p", target="Mitochondria", progress=False)
    with pytest.raises(ValueError, match="target must be one of"):
        synthetic.write_plate_dataset(tmp_path / "p", controls=True, target="Cilia", progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("channels, bit_depth", [("merged", 8), ("separate", 16)])
def test_planted_qc_fields_show_their_fault(tmp_path, channels, bit_depth):
    out = tmp_path / "planted"
    synthetic.write_plate_dataset(out, fields=1, size=128, seed=6, plant_qc=True, channels=channels,
                                  bit_depth=bit_depth, workers=2, progress=False)
    full = 255 if bit_depth == 8 else 65535

    def stains(image_id: str) -> np.ndarray:
        if channels == "merged":
            return np.asarray(Image.open(out / "P001" / f"{image_id}.png")) / full
        return np.stack([tifffile.imread(out / "P001" / f"{image_id}_{s}.tif") for s in synthetic.STAINS], -1) / full

    assert (stains("P001_D06_f1")[..., 1] == 1).mean() >= synthetic.PLANTED_SATURATED_AREA
    empty = stains("P001_E07_f1")
    assert empty.max() < 0.1 and empty.std() < 0.01  # offset and noise only: no cells
    # The defocused field against the same field rendered sharp: less fine detail (a 1-2 px band-pass;
    # both carry the same sensor noise, which defocus does not remove, so the ratio is ~0.7, not ~0).
    labels = [row["labels"] for row in read_csv(out / "ground_truth.csv") if row["image_id"] == "P001_C05_f1"][0]
    sharp = render_field(parse_label_string(labels), 128, np.random.default_rng([6, synthetic.PLATE, 0, 28, 1]))
    detail = []
    for image in (stains("P001_C05_f1"), sharp):
        grey = image.mean(-1)
        detail.append((ndimage.gaussian_filter(grey, 1) - ndimage.gaussian_filter(grey, 2)).std() / grey.std())
    assert detail[0] < 0.8 * detail[1], detail


def test_planting_changes_only_the_planted_fields(plain_plate, tmp_path):
    out = tmp_path / "planted"
    summary = synthetic.write_plate_dataset(out, plates=2, plant_qc=True, **CONTROLS)
    truth = read_csv(out / "ground_truth.csv")
    assert list(truth[0]) == ["plate", "well", "field", "image_id", "labels", "planted_qc"]
    planted = {(row["plate"], row["well"], int(row["field"])): row["planted_qc"] for row in truth if row["planted_qc"]}
    assert planted == {(plate, well, field): flag for plate in ("P001", "P002")
                       for (well, field), flag in synthetic.PLANTED_QC.items()}
    assert summary["planted_qc"] == [[well, field, flag] for (well, field), flag in synthetic.PLANTED_QC.items()]
    assert all(int(well[1:]) not in (1, 2, 11, 12) for well, _ in synthetic.PLANTED_QC)  # sample wells
    plain, mine = digests(plain_plate), digests(out)
    changed = {name for name in plain if name.endswith(".png") and plain[name] != mine[name]}
    assert changed == {f"{plate}/{plate}_{well}_f{field}.png" for plate, well, field in planted}


def test_new_options_are_recorded_and_a_changed_folder_is_regenerated(tmp_path):
    out, small = tmp_path / "p", dict(wells=96, fields=1, size=16, workers=1, progress=False)
    synthetic.write_plate_dataset(out, **small)
    assert not {"controls", "target", "plant_qc"} & set(json.loads((out / synthetic.MANIFEST).read_text())["args"])
    again = synthetic.write_plate_dataset(out, plant_qc=True, controls=True, **small)
    args = json.loads((out / synthetic.MANIFEST).read_text())["args"]
    assert not again["reused"] and (args["plant_qc"], args["controls"], args["target"]) == (True, True, "Plasma membrane")
    assert synthetic.write_plate_dataset(out, plant_qc=True, controls=True, **small)["reused"]
    assert not synthetic.write_plate_dataset(out, **small)["reused"] and not (out / "plate_map.csv").exists()
