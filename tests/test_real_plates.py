"""Real plate exports: layouts, identity by path, stains and bit depths, one decode on every path."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from conftest import encode

from protein_ray.checkpoint import ModelCard, save_checkpoint
from protein_ray.folders import image_folder_index
from protein_ray.imaging import Preprocessing, decode_image
from protein_ray.model import create_model
from protein_ray.predictor import Predictor
from protein_ray.sources import DataSourceError, InputOptions, missing_stains, parse_channel_map
from protein_ray.spec import PRESETS, SpecError, Stain, load_spec
from protein_ray.synthetic_exports import write_imagexpress_export, write_phenix_export

RGBY = PRESETS["hpa-rgby"].stain_names
VENDOR_CHANNELS = "1=blue,2=green,3=red,4=yellow"  # how the synthetic exports number their wavelengths
WELLS = ["B03", "C05"]


def rgby_options(**extra) -> InputOptions:
    return InputOptions(stains=RGBY, channel_map=parse_channel_map(VENDOR_CHANNELS, RGBY), **extra)


@pytest.fixture(scope="module")
def imagexpress(tmp_path_factory):
    return write_imagexpress_export(tmp_path_factory.mktemp("ix") / "export", wells=WELLS, fields=2, size=48,
                                    seed=1, drop_stain=("C05", 2, 2), workers=1, progress=False)


@pytest.fixture(scope="module")
def phenix(tmp_path_factory):
    return write_phenix_export(tmp_path_factory.mktemp("phenix") / "export", wells=WELLS, fields=2, size=48,
                               seed=1, workers=1, progress=False)


# ------------------------------------------------------------------ layouts ----


@pytest.mark.parametrize("layout", ["auto", "imagexpress"])
def test_imagexpress_export_gives_one_row_per_field_with_stains_in_model_order(imagexpress, layout):
    rows, skipped = image_folder_index(imagexpress["out"], rgby_options(layout=layout))
    assert len(rows) == 4  # 2 wells x 2 sites
    row = rows.set_index("image_id").loc["P001/P001_B03_f1"]
    assert (row["plate"], row["well"], row["field"]) == ("P001", "B03", 1)
    # hpa-rgby order is red, green, blue, yellow; the export's w3 is red, w1 blue.
    assert [uri.rsplit("_", 1)[-1] for uri in row["sources"]] == ["w3.TIF", "w2.TIF", "w1.TIF", "w4.TIF"]
    dropped = rows.set_index("image_id").loc["P001/P001_C05_f2", "sources"]
    assert missing_stains(dropped) == ["green"]  # scoring makes this an error row naming the stain
    reasons = [entry.rsplit("(", 1)[-1] for entry in skipped]
    assert reasons.count("thumbnail)") == 15  # 16 fields' channels, one dropped with its thumbnail
    assert reasons.count("not an image by name)") == 4  # .HTD, plate_map.csv, ground_truth.csv, synthetic.json


def test_an_imagexpress_well_without_its_zero_is_the_same_well(tmp_path):
    # MetaXpress pads wells (B07); files renamed by hand or by other tools often do not (B7).
    for name in ("P1_B7_s1_w1.TIF", "P1_B07_s2_w1.TIF"):
        (tmp_path / name).write_bytes(encode(np.zeros((8, 8), np.uint16), "TIFF"))
    rows, skipped = image_folder_index(str(tmp_path), rgby_options())
    assert sorted(zip(rows["well"], rows["field"])) == [("B07", 1), ("B07", 2)] and skipped == []


def test_phenix_export_takes_the_plate_from_the_folder_and_wells_from_row_and_column(phenix):
    rows, skipped = image_folder_index(phenix["out"], rgby_options())
    assert sorted(rows["image_id"]) == [f"P001/Images/P001_{w}_f{f}_p1" for w in WELLS for f in (1, 2)]
    assert set(rows["plate"]) == {"P001"} and set(rows["well"]) == set(WELLS)
    assert all(len(sources) == 4 and not missing_stains(sources) for sources in rows["sources"])
    assert any(entry.startswith(f"{phenix['out']}/P001/Images/Index.idx.xml") for entry in skipped)


def test_a_custom_pattern_reads_any_naming(tmp_path):
    for well, field in [("A01", 1), ("A01", 2)]:
        for channel in (1, 2, 3):
            (tmp_path / f"scan-{well}-{field}-c{channel}.png").write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    options = InputOptions(pattern=r"scan-(?P<well>[A-P]\d+)-(?P<field>\d+)-c(?P<channel>\d)\.png$")
    rows, skipped = image_folder_index(str(tmp_path), options)
    assert sorted(rows["image_id"]) == ["None_A01_f1", "None_A01_f2"] and skipped == []
    assert rows["plate"].isna().all() and rows["well"].eq("A01").all()


def test_upper_case_extensions_and_stain_names_are_merged(tmp_path):
    for stain in ("Red", "GREEN", "blue"):
        (tmp_path / f"P1_B7_f1_{stain}.PNG").write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    rows, skipped = image_folder_index(str(tmp_path))
    assert rows["image_id"].tolist() == ["P1_B07_f1"] and rows.loc[0, "well"] == "B07"
    assert not missing_stains(rows.loc[0, "sources"]) and skipped == []


# -------------------------------------------------------- identity by path ----


def test_same_stem_different_extension_gives_two_rows(tmp_path):
    picture = np.zeros((8, 8, 3), np.uint8)
    (tmp_path / "good.tif").write_bytes(encode(picture, "TIFF"))
    (tmp_path / "good.jpg").write_bytes(encode(picture, "JPEG"))
    rows, _ = image_folder_index(str(tmp_path))
    assert sorted(rows["image_id"]) == ["good.jpg", "good.tif"]


def test_same_file_name_in_two_folders_gives_two_rows(tmp_path):
    for folder in ("PlateA_1", "PlateB_1"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "good.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
        (tmp_path / folder / "P1_A01_f1.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    rows, _ = image_folder_index(str(tmp_path))
    assert sorted(rows["image_id"]) == ["PlateA_1/P1_A01_f1", "PlateA_1/good.png",
                                        "PlateB_1/P1_A01_f1", "PlateB_1/good.png"]


def test_two_files_for_one_stain_of_one_field_are_an_error_naming_both(tmp_path):
    blank = encode(np.zeros((8, 8), np.uint8), "PNG")
    (tmp_path / "P1_A01_f1_red.png").write_bytes(blank)
    (tmp_path / "P1_A01_f01_red.png").write_bytes(blank)  # field 01 is field 1
    with pytest.raises(DataSourceError, match=r"P1_A01_f0?1_red\.png and .*P1_A01_f0?1_red\.png both hold red of P1_A01_f1"):
        image_folder_index(str(tmp_path))


def test_a_merged_file_and_stain_files_for_one_field_are_an_error(tmp_path):
    (tmp_path / "P1_A01_f1.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    (tmp_path / "P1_A01_f1_red.png").write_bytes(encode(np.zeros((8, 8), np.uint8), "PNG"))
    with pytest.raises(DataSourceError, match="both hold"):
        image_folder_index(str(tmp_path))


def test_channel_map_must_name_the_models_stains():
    with pytest.raises(DataSourceError, match="CHANNEL=STAIN"):
        parse_channel_map("1=dapi", RGBY)


# ------------------------------------------------------------ spec and bits ----


def test_presets_and_a_custom_spec(tmp_path):
    assert len(PRESETS["hpa-2018"].classes) == 28 and PRESETS["hpa-2018"].stain_names == RGBY
    path = tmp_path / "screen.yaml"
    path.write_text("classes: [Nucleus, Cytoplasm, Membrane]\nstains:\n  - {name: dna, bits: 12}\n  - protein\n")
    spec = load_spec(str(path))
    assert spec.classes == ("Nucleus", "Cytoplasm", "Membrane") and spec.stains == (Stain("dna", 12), Stain("protein"))
    path.write_text("classes: [A]\nstains: [{name: dna, bits: 20}]\n")
    with pytest.raises(SpecError, match="bits must be between 8 and 16"):
        load_spec(str(path))
    with pytest.raises(SpecError, match="neither a preset"):
        load_spec("hpa-2019")


def test_12_bit_data_in_16_bit_files_scales_like_8_bit_when_told_its_depth():
    counts = np.random.default_rng(0).integers(100, 4096, (16, 16), dtype=np.uint16)
    eight = np.rint(counts / 4095 * 255).astype(np.uint8)
    lzw = encode(counts, "TIFF", compression="lzw")
    as_12 = decode_image([lzw] * 3, [Stain("r", 12), Stain("g", 12), Stain("b", 12)])
    from_png = decode_image(encode(np.stack([eight] * 3, -1), "PNG"))
    np.testing.assert_allclose(as_12, from_png, atol=0.5 / 255 + 1e-6)
    assert decode_image([lzw] * 3).max() < 0.07  # read as 16-bit: a black picture


@pytest.mark.parametrize("compression", ["lzw", "zlib", "zstd", "jpeg"])
def test_compressed_tiffs_decode(compression):
    ramp = np.linspace(0, 250, 32, dtype=np.float32)
    pixels = np.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :], 128 + 0 * ramp[:, None]
                       + 0 * ramp[None, :]], -1).astype(np.uint8)  # smooth, as microscopy is; JPEG's case
    data = encode(pixels, "TIFF", compression=compression, photometric="rgb")
    decoded = decode_image(data)
    tolerance = 0.02 if compression == "jpeg" else 1e-6  # JPEG is lossy
    assert np.abs(decoded - pixels / 255).mean() < tolerance


def test_planar_tiff_pixel_count_is_width_times_height():
    planar = encode(np.zeros((3, 100, 100), np.uint16), "TIFF", photometric="rgb", planarconfig="separate")
    assert decode_image(planar, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(Exception, match="too_large|10,000 pixels"):
        decode_image(planar, max_pixels=9_999)


def test_large_fields_are_area_averaged():
    from protein_ray.imaging import resize_images

    field = np.zeros((2160, 2160, 1), np.float32)
    field[::2, ::2] = 1.0  # a fine checkerboard: area averaging keeps its mean, point sampling would not
    small = resize_images([field], 64)
    assert np.abs(small - 0.25).max() < 0.02  # (point sampling would give 0 or 1 everywhere)


# ------------------------------------------ one decode on every path, 4 stains ----


@pytest.fixture(scope="module")
def rgby_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    spec = Preprocessing(48, mean=(0.1,) * 4, std=(0.2,) * 4, stains=RGBY)
    card = ModelCard(backbone="test_resnet", preprocessing=spec)
    return str(save_checkpoint(tmp_path_factory.mktemp("rgby"), create_model("test_resnet", in_chans=4), card))


def test_same_stain_files_give_one_tensor_in_training_scoring_serve_and_predictor(rgby_checkpoint, imagexpress):
    from protein_ray.data import load_encoded_image
    from protein_ray.scoring.decode import decode_rows
    from protein_ray.train import BatchCollator
    from protein_ray.train_data import decode_for_training
    from protein_ray.uploads import Upload, prepare_uploads

    predictor = Predictor(rgby_checkpoint, device="cpu")
    spec = predictor.preprocessing
    sources = image_folder_index(imagexpress["out"], rgby_options())[0].loc[0, "sources"]
    files = [open(uri, "rb").read() for uri in sources]
    reference = predictor.preprocess([decode_image(files, spec.stains)])

    served = prepare_uploads([Upload(id=0, data=b"", stains=files)], spec, max_pixels=10**7)
    scored = decode_rows([{"row": 0, "sources": list(sources)}], {}, spec, max_pixels=10**7, measure_qc=False)["pixels"]
    shard_bytes = load_encoded_image(list(sources))  # training reads shards: stains merged into one file
    decoded = decode_for_training({"image": [shard_bytes], "labels": [[1]], "image_id": ["x"]}, spec, 10)
    trained = BatchCollator(spec, augment=False)(decoded)["image"].numpy()
    # Serve and bulk scoring send model pixels to the model, which normalizes them there.
    assert served.dtype == scored.dtype == np.uint8
    for other in (predictor.normalize(served), predictor.normalize(scored), trained):
        np.testing.assert_allclose(other, reference, atol=1e-6)
    assert reference.shape == (1, 4, 48, 48)
    probs = predictor.predict_bytes([files])[0].probabilities
    assert probs.shape == (10,) and np.isfinite(probs).all()


def test_a_merged_rgb_file_is_refused_by_a_four_stain_model(rgby_checkpoint):
    result = Predictor(rgby_checkpoint, device="cpu").predict_bytes([encode(np.zeros((8, 8, 3), np.uint8), "PNG")])[0]
    assert result.error.startswith("channels") and "yellow" in result.error


def test_plate_map_labels_attach_per_well(imagexpress):
    csv = f"{imagexpress['out']}/plate_map.csv"
    rows, _ = image_folder_index(imagexpress["out"], rgby_options())
    from protein_ray.folders import attach_labels

    labelled = attach_labels(rows, csv, num_classes=10)
    plate_map = pd.read_csv(csv, dtype=str, keep_default_na=False).set_index("well")["labels"]
    for well, labels in zip(labelled["well"], labelled["labels"]):
        assert " ".join(map(str, labels)) == plate_map[well]


def test_16_bit_planar_shard_round_trip_keeps_every_stain(imagexpress):
    from protein_ray.data import load_encoded_image

    sources = image_folder_index(imagexpress["out"], rgby_options())[0].loc[0, "sources"]
    merged = tifffile.imread(io.BytesIO(load_encoded_image(list(sources))))
    planes = [tifffile.imread(uri) for uri in sources]
    np.testing.assert_array_equal(merged, np.stack(planes))  # (C, H, W), lossless


# ------------------------------------------- real runs: train, then score exports ----


def predict_cli(*argv) -> int:
    from protein_ray import cli

    return cli.main(["predict", *map(str, argv)])


@pytest.mark.slow
@pytest.mark.ray
def test_four_stain_model_trains_on_an_imagexpress_export_and_scores_both_vendors(
        ray_session, tmp_path_factory, tmp_path, imagexpress, phenix):
    from conftest import smoke_config

    from protein_ray.checkpoint import read_model_card
    from protein_ray.train import run_training

    wells = [f"{row}{column:02d}" for row in "BCDEFG" for column in range(2, 8)]  # 36 inner wells
    export = write_imagexpress_export(tmp_path / "training-plate", wells=wells, fields=2, size=64, seed=7,
                                      workers=2, progress=False)
    config = smoke_config(tmp_path_factory, "rgby", f"data.path={export['out']}",
                          f"data.labels={export['plate_map_csv']}", "data.spec=hpa-rgby",
                          f"data.channel_map={VENDOR_CHANNELS}", "data.bit_depth=12", "data.image_size=48",
                          "optim.epochs=2",
                          "optim.batch_size=8", "optim.schedule=cosine", "run.num_workers=1")
    best = run_training(config)
    card = read_model_card(best)
    assert card.preprocessing.stain_names == RGBY and len(card.class_names) == 10
    assert len(card.preprocessing.mean) == 4 and all(0 < m < 1 for m in card.preprocessing.mean)  # measured
    assert all(stain.bits == 12 for stain in card.preprocessing.stains)  # scoring reads 16-bit files as 12-bit

    for export_summary, out in ((imagexpress, tmp_path / "ix-scores"), (phenix, tmp_path / "phenix-scores")):
        code = predict_cli("--checkpoint", best, "--input", export_summary["out"], "--output", out,
                           "--channel-map", VENDOR_CHANNELS, "--max-error-rate", 0.5)
        assert code == 0
        predictions = pd.read_parquet(out / "predictions.parquet")
        assert len(predictions) == 4  # one row per field: 2 wells x 2 sites
        assert set(predictions["well"]) == set(WELLS) and set(predictions["field"]) == {1, 2}
        assert set(predictions["plate"]) == {"P001"}
    failed = pd.read_parquet(tmp_path / "ix-scores" / "predictions.parquet").set_index("image_id")
    assert failed.loc["P001/P001_C05_f2", "error"] == "missing_stain"
    assert "green" in failed.loc["P001/P001_C05_f2", "error_detail"]
    assert failed["error"].notna().sum() == 1


@pytest.mark.slow
@pytest.mark.ray
def test_a_custom_spec_with_three_classes_trains_and_scores(ray_session, tmp_path_factory, tmp_path):
    from conftest import smoke_config

    from protein_ray.checkpoint import read_model_card
    from protein_ray.synthetic import write_kaggle_dataset
    from protein_ray.train import run_training

    root = tmp_path / "kaggle"
    write_kaggle_dataset(root, n_train=80, n_test=6, size=64, seed=2, workers=2, progress=False)
    train = pd.read_csv(root / "train.csv", dtype=str)
    # Three classes: nuclear (ids 1, 2, 4, 5, 9), cytoplasmic (0, 3, 6, 8), membrane (7).
    group = {1: 0, 2: 0, 4: 0, 5: 0, 9: 0, 0: 1, 3: 1, 6: 1, 8: 1, 7: 2}
    train["Label"] = [" ".join(sorted({str(group[int(i)]) for i in text.split()})) for text in train["Label"]]
    train.to_csv(root / "train.csv", index=False)
    spec = tmp_path / "compartments.yaml"
    spec.write_text("name: compartments\nclasses: [Nuclear, Cytoplasmic, Membrane]\nstains: [red, green, blue]\n")

    config = smoke_config(tmp_path_factory, "three", f"data.path={root}", f"data.spec={spec}",
                          "data.image_size=48", "optim.epochs=2", "optim.batch_size=8", "optim.schedule=cosine",
                          "run.num_workers=1")
    best = run_training(config)
    card = read_model_card(best)
    assert card.class_names == ["Nuclear", "Cytoplasmic", "Membrane"] and len(card.thresholds) == 3

    out = tmp_path / "scores"
    assert predict_cli("--checkpoint", best, "--input", root, "--output", out) == 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert [c for c in predictions.columns if c.startswith("prob_")] == ["prob_nuclear", "prob_cytoplasmic",
                                                                        "prob_membrane"]
    assert len(predictions) == 6 and predictions["error"].isna().all()
    labels = pd.read_csv(out / "submission.csv", dtype=str)["Label"]
    assert all(set(text.split()) <= {"0", "1", "2"} and text for text in labels)


@pytest.mark.ray
def test_bit_depth_12_scores_12_bit_lzw_tiffs_like_the_same_picture_as_8_bit_png(ray_session, tmp_path):
    from protein_ray.synthetic_cells import render_field

    torch.manual_seed(3)
    checkpoint = str(save_checkpoint(tmp_path / "rgb", create_model("test_resnet"),
                                     ModelCard(backbone="test_resnet", preprocessing=Preprocessing(64))))
    tiffs, pngs = tmp_path / "tiff12", tmp_path / "png8"
    tiffs.mkdir(), pngs.mkdir()
    for i in range(4):
        picture = render_field([i, 6], 96, np.random.default_rng(i))
        counts = np.rint(picture * 4095).astype(np.uint16)
        (tiffs / f"field{i}.tif").write_bytes(encode(counts, "TIFF", photometric="rgb", compression="lzw"))
        (pngs / f"field{i}.png").write_bytes(encode(np.rint(counts / 4095 * 255).astype(np.uint8), "PNG"))
    assert predict_cli("--checkpoint", checkpoint, "--input", tiffs, "--output", tmp_path / "a", "--bit-depth", 12) == 0
    assert predict_cli("--checkpoint", checkpoint, "--input", pngs, "--output", tmp_path / "b") == 0
    assert predict_cli("--checkpoint", checkpoint, "--input", tiffs, "--output", tmp_path / "c") == 0
    as_12, as_8, as_16 = (pd.read_parquet(tmp_path / out / "predictions.parquet").filter(like="prob_").to_numpy()
                          for out in ("a", "b", "c"))
    assert np.abs(as_12 - as_8).max() < 0.02
    assert np.abs(as_16 - as_8).max() > np.abs(as_12 - as_8).max()  # read as 16-bit, the picture is near black


@pytest.mark.parametrize("shape, dtype, photometric", [
    ((40, 40, 16), np.uint16, "minisblack"),  # 16 samples per pixel: 4x the RGBA-16 budget
    ((40, 40, 3), np.float64, "rgb"),  # 64-bit samples
])
def test_decoding_is_refused_before_allocation_when_samples_exceed_the_budget(shape, dtype, photometric):
    from protein_ray.imaging import ImageDecodeError

    data = encode(np.zeros(shape, dtype), "TIFF", photometric=photometric, planarconfig="contig")
    with pytest.raises(ImageDecodeError, match="decoding needs") as error:
        decode_image(data, max_pixels=40 * 40 * 2)  # room for the pixels, not for these samples
    assert error.value.reason == "too_large"
    assert decode_image(encode(np.zeros((40, 40, 4), np.uint16), "TIFF", photometric="rgb"),
                        max_pixels=40 * 40).shape == (40, 40, 3)  # RGBA at 16 bits fits exactly
