"""OME-Zarr (OME-NGFF) HCS plates as input: plates written with the ome-zarr library's own
writer, resolved into one row per field, read at the level that fits the model, mapped to the
model's stains by channel label, and scored end to end from local disk and from S3."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

pytest.importorskip("ome_zarr", reason="the omezarr extra (pip install 'protein-ray[omezarr]')")

from protein_ray import omezarr, storage  # noqa: E402
from protein_ray.defaults import MAX_PIXELS  # noqa: E402
from protein_ray.imaging import Preprocessing, decode_image, scale_stains, to_pixels  # noqa: E402
from protein_ray.inputs import resolve_input, resolve_inputs  # noqa: E402
from protein_ray.scoring.decode import decode_rows, fetch_encoded, work_items  # noqa: E402
from protein_ray.sources import DataSourceError, InputOptions, parse_channel_map  # noqa: E402
from protein_ray.spec import Stain  # noqa: E402

RGBY = ("red", "green", "blue", "yellow")
ROWS, COLUMNS, FIELDS, SIZE = ("A", "B"), ("1", "2", "3"), 2, 256
LEVEL_PATHS = ("s0", "s1", "s2")  # what ome_zarr's writer names the levels of scale_factors [2, 4]
STAINS_12_BIT = tuple(Stain(name, bits=12) for name in RGBY)


def field_pixels(seed: int, channels: int, size: int = SIZE) -> np.ndarray:
    """(C, H, W) uint16 12-bit data with structure: each channel its own smooth picture plus
    noise, so a channel mix-up or a wrong level cannot pass for the right one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    planes = [(2000 + 1500 * np.sin(6 * (c + 1) * x + 4 * y + seed)) + rng.normal(0, 200, (size, size))
              for c in range(channels)]
    return np.clip(planes, 0, 4095).astype(np.uint16)


def channel(label: str) -> dict:
    return {"label": label, "color": "FFFFFF", "window": {"start": 0, "end": 4095, "min": 0, "max": 65535}}


def write_plate(path: Path, labels: list[str], name: str | None = "P001", seed: int = 0, fmt=None) -> dict:
    """An HCS plate by ome_zarr's writer: 2 rows x 3 columns, 2 fields per well, 3 levels
    (256, 128, 64 px). Returns each field's full-resolution pixels (C, H, W) by (well, field)."""
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    version = {} if fmt is None or fmt.version != "0.4" else {"zarr_format": 2}
    root = zarr.open_group(str(path), mode="w", **version)
    wells = [f"{row}/{column}" for row in ROWS for column in COLUMNS]
    write_plate_metadata(root, list(ROWS), list(COLUMNS), wells, name=name, field_count=FIELDS, fmt=fmt)
    written = {}
    for number, well in enumerate(wells):
        group = root.require_group(well)
        write_well_metadata(group, [str(f) for f in range(FIELDS)], fmt=fmt)
        for field in range(FIELDS):
            pixels = field_pixels(seed * 100 + number * FIELDS + field, len(labels))
            write_image(pixels, group.require_group(str(field)), axes="cyx", scale_factors=[2, 4], fmt=fmt,
                        omero={"channels": [channel(label) for label in labels]})
            written[(well.replace("/", "0"), field + 1)] = pixels
    return written


def level_pixels(plate: Path, well: str, field: int, level: int) -> np.ndarray:
    """A level's (C, H, W) pixels read with zarr alone: the ground truth for what we read."""
    import zarr

    row, column = well[0], str(int(well[1:]))
    return np.asarray(zarr.open_array(str(plate / row / column / str(field - 1) / LEVEL_PATHS[level]), mode="r"))


@pytest.fixture(scope="module")
def rgby_plate(tmp_path_factory) -> Path:
    """4 channels, labelled in an order other than the model's, one in capitals."""
    path = tmp_path_factory.mktemp("omezarr") / "P001.ome.zarr"
    write_plate(path, ["yellow", "Blue", "RED", "green"])
    return path


@pytest.fixture(scope="module")
def rgb_plate(tmp_path_factory) -> Path:
    """3 channels named red, green, blue: what the session's RGB smoke model takes."""
    path = tmp_path_factory.mktemp("omezarr") / "rgb.zarr"
    write_plate(path, ["red", "green", "blue"], name="P002", seed=1)
    return path


def rgby_options(**extra) -> InputOptions:
    return InputOptions(stains=RGBY, **extra)


# ------------------------------------------------------------------ the index --


def test_one_row_per_field_with_plate_well_and_field(rgby_plate):
    rows = resolve_input(str(rgby_plate), rgby_options()).rows
    assert len(rows) == len(ROWS) * len(COLUMNS) * FIELDS
    assert set(rows["plate"]) == {"P001"}
    assert sorted(set(rows["well"])) == ["A01", "A02", "A03", "B01", "B02", "B03"]
    assert rows.groupby("well")["field"].apply(sorted).map(list).tolist() == [[1, 2]] * 6
    first = rows.iloc[0]
    assert first["image_id"] == "P001_A01_f1"  # as plate folders name a field
    assert first["source"] == str(rgby_plate / "A" / "1" / "0")  # the field group a user can open
    assert rows["image_id"].is_unique and rows["labels"].isna().all()


def test_an_ngff_04_zarr_v2_plate_reads_like_an_05_plate(tmp_path):
    from ome_zarr.format import FormatV04

    written = write_plate(tmp_path / "v04.zarr", list(RGBY), name=None, fmt=FormatV04())
    assert (tmp_path / "v04.zarr" / ".zattrs").exists()
    rows = resolve_input(str(tmp_path / "v04.zarr"), rgby_options()).rows
    assert len(rows) == 12 and set(rows["plate"]) == {"v04"}  # no name: the folder's, less .zarr
    planes = omezarr.read_field(rows["sources"][0][0])
    np.testing.assert_array_equal(np.moveaxis(planes, -1, 0), written[("A01", 1)])


def test_channel_labels_map_to_stains_by_name_regardless_of_order(rgby_plate):
    rows = resolve_input(str(rgby_plate), rgby_options()).rows
    planes = omezarr.read_field(rows["sources"][0][0])  # (H, W, stains): red, green, blue, yellow
    stored = level_pixels(rgby_plate, "A01", 1, 0)  # channels: yellow, Blue, RED, green
    for position, stored_channel in enumerate((2, 3, 1, 0)):
        np.testing.assert_array_equal(planes[..., position], stored[stored_channel])


def test_a_channel_map_overrides_labels_and_unlabelled_plates_go_by_order(rgby_plate, tmp_path):
    mapped = rgby_options(channel_map=parse_channel_map("1=red,2=green,3=blue,4=yellow", RGBY))
    planes = omezarr.read_field(resolve_input(str(rgby_plate), mapped).rows["sources"][0][0])
    np.testing.assert_array_equal(np.moveaxis(planes, -1, 0), level_pixels(rgby_plate, "A01", 1, 0))

    write_plate(tmp_path / "dapi.zarr", ["Tubulin", "GFP", "DAPI", "ER"], seed=3)
    planes = omezarr.read_field(resolve_input(str(tmp_path / "dapi.zarr"), rgby_options()).rows["sources"][0][0])
    np.testing.assert_array_equal(np.moveaxis(planes, -1, 0), level_pixels(tmp_path / "dapi.zarr", "A01", 1, 0))


@pytest.mark.parametrize("image_size, level", [(None, 0), (300, 0), (256, 0), (200, 0), (128, 1), (100, 1),
                                               (64, 2), (32, 2)])
def test_the_level_read_is_the_smallest_not_below_the_input_size(rgby_plate, image_size, level):
    rows = resolve_input(str(rgby_plate), rgby_options()).rows
    planes = fetch_encoded(work_items(rows.iloc[:1])[0], {}, image_size)  # the decode stage's fetch
    np.testing.assert_array_equal(np.moveaxis(planes, -1, 0), level_pixels(rgby_plate, "A01", 1, level)[[2, 3, 1, 0]])


def test_a_plate_found_without_zarr_installed_says_how_to_install_it(rgby_plate, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr now raises ImportError
    with pytest.raises(DataSourceError, match=r"pip install 'protein-ray\[omezarr\]'"):
        resolve_input(str(rgby_plate), rgby_options())


# ------------------------------------------------------------------- pixels --


def test_a_field_gives_the_tensor_its_pixels_give_as_a_tiff(rgby_plate, tmp_path):
    """The one decode path: the field's level-1 pixels (read with zarr alone, put in the
    model's stain order) written as a TIFF and decoded by imaging.decode_image give the
    same image, QC measures and tensor as the field read from the plate."""
    stored = level_pixels(rgby_plate, "B02", 2, 1)[[2, 3, 1, 0]]  # (C, H, W), red green blue yellow
    tiff = tmp_path / "field.tif"
    tifffile.imwrite(tiff, stored, photometric="minisblack", planarconfig="separate")
    spec = Preprocessing(image_size=100, mean=(0.1,) * 4, std=(0.2,) * 4, stains=STAINS_12_BIT)
    rows = resolve_input(str(rgby_plate), rgby_options()).rows.set_index("image_id")
    work = [{"row": 0, "sources": list(rows.loc["P001_B02_f2", "sources"])}, {"row": 1, "sources": [str(tiff)]}]
    block = decode_rows(work, {}, spec, MAX_PIXELS, measure_qc=True)
    assert list(block["error"]) == ["", ""]
    np.testing.assert_array_equal(block["pixels"][0], block["pixels"][1])
    np.testing.assert_array_equal(block["qc"][0], block["qc"][1])
    decoded = decode_image(tiff.read_bytes(), STAINS_12_BIT)
    np.testing.assert_array_equal(scale_stains(fetch_encoded(work[0], {}, 100), STAINS_12_BIT), decoded)
    assert decoded.max() > 0.9  # 12-bit data on the 12-bit scale, not divided by 65535


def test_a_time_series_z_stack_is_read_at_its_first_timepoint_max_projected(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    stack = np.random.default_rng(5).integers(0, 4096, (2, 3, 4, 64, 64), dtype=np.uint16)  # t, c, z, y, x
    write_image(stack, zarr.open_group(str(tmp_path / "field.zarr"), mode="w"), axes="tczyx", scale_factors=[2])
    reference = omezarr.FieldReference(str(tmp_path / "field.zarr"), (("red", 2), ("green", 0), ("blue", 1)))
    planes = omezarr.read_field(reference.encode())
    np.testing.assert_array_equal(np.moveaxis(planes, -1, 0), stack[0, [2, 0, 1]].max(axis=1))


def test_a_plate_without_a_stain_gives_error_rows_naming_it_and_the_others_score(rgby_plate, rgb_plate):
    index = resolve_inputs([str(rgby_plate), str(rgb_plate)], rgby_options())
    assert len(index.rows) == 24
    spec = Preprocessing(image_size=64, mean=(0.1,) * 4, std=(0.2,) * 4, stains=STAINS_12_BIT)
    block = decode_rows(work_items(index.rows), {}, spec, MAX_PIXELS, measure_qc=False)
    errors = pd.Series(block["error"], index=index.rows["plate"])
    assert (errors["P001"] == "").all()
    assert (errors["P002"] == "missing_stain").all()
    details = pd.Series(block["detail"], index=index.rows["plate"])["P002"]
    assert all("yellow" in detail and "red, green, blue" in detail for detail in details)
    assert block["pixels"][errors.to_numpy() == ""].std(axis=(1, 2, 3)).min() > 0  # pixels, not the zeros of a failure


# ------------------------------------------------------------------ training --


@pytest.mark.ray
def test_training_reads_a_plate_with_a_labels_csv_at_its_input_size(ray_session, rgby_plate, tmp_path):
    from protein_ray.config import load_config
    from protein_ray.data import dataset_of
    from protein_ray.spec import load_spec
    from protein_ray.train_data import decode_for_training, input_options, labelled_index

    labels = tmp_path / "labels.csv"
    pd.DataFrame({"plate": ["P001"] * 5, "well": ["A1", "A02", "A03", "B01", "b2"],
                  "labels": ["0", "4 6", "2", "7", "9"]}).to_csv(labels, index=False)
    config = load_config(None, [f"data.path={rgby_plate}", f"data.labels={labels}", "data.spec=hpa-rgby",
                                "data.image_size=64"])
    index = labelled_index(str(rgby_plate), input_options(config, load_spec("hpa-rgby")))
    assert len(index.rows) == 10  # B03 has no labels row: left out
    assert index.rows.set_index("image_id").loc["P001_A02_f2", "labels"] == [4, 6]
    rows = dataset_of(index).take_all()
    assert {row["source"] for row in rows} == set(index.rows["source"])
    spec = Preprocessing(64, mean=(0.0,) * 4, std=(1.0,) * 4, stains=STAINS_12_BIT)
    batch = {key: [row[key] for row in rows] for key in ("image", "labels", "image_id")}
    decoded = decode_for_training(batch, spec, num_classes=10)
    assert decoded["ok"].all() and decoded["image"].shape == (10, 4, 64, 64)
    first = rows[0]["image_id"]
    planes = fetch_encoded(work_items(index.rows.set_index("image_id").loc[[first]].reset_index())[0], {}, 64)
    expected = np.moveaxis(scale_stains(planes, STAINS_12_BIT), -1, 0)
    assert decoded["image"].dtype == np.uint16  # 12-bit stains keep more than 8 bits between stages
    np.testing.assert_array_equal(decoded["image"][0], to_pixels(expected, np.uint16))  # level 2 (64 px): no resize


# --------------------------------------------------------- protein-ray predict --


def run_predict(checkpoint: str, plate: str, output: str) -> pd.DataFrame:
    from protein_ray import cli

    code = cli.main(["predict", "--checkpoint", checkpoint, "--input", plate, "--output", output,
                     "--bit-depth", "12"])
    assert code == 0
    return pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(output, "predictions.parquet"))))


def check_predictions(predictions: pd.DataFrame, plate: str) -> None:
    assert len(predictions) == 12 and predictions["error"].isna().all()
    assert set(predictions["plate"]) == {"P002"} and set(predictions["field"]) == {1, 2}
    assert sorted(set(predictions["well"])) == ["A01", "A02", "A03", "B01", "B02", "B03"]
    assert predictions["source"].str.startswith(plate).all()
    probabilities = predictions.filter(like="prob_").to_numpy()
    assert np.isfinite(probabilities).all() and probabilities.std(axis=0).max() > 0


@pytest.mark.ray
def test_predict_scores_a_local_plate(smoke_checkpoint, rgb_plate, tmp_path):
    check_predictions(run_predict(smoke_checkpoint, str(rgb_plate), str(tmp_path / "scores")), str(rgb_plate))


def upload(folder: Path, bucket_uri: str) -> str:
    """The plate's files, as they are, to ``bucket_uri/<folder name>``."""
    import boto3

    bucket = bucket_uri.removeprefix("s3://")
    client = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{folder.name}/{path.relative_to(folder).as_posix()}",
                          Body=path.read_bytes())
    return f"{bucket_uri}/{folder.name}"


@pytest.mark.ray
@pytest.mark.s3
def test_predict_scores_a_plate_on_s3(smoke_checkpoint, rgb_plate, s3_bucket):
    plate = upload(rgb_plate, s3_bucket)
    assert json.loads(storage.read_text(f"{plate}/zarr.json"))["attributes"]["ome"]["plate"]
    predictions = run_predict(smoke_checkpoint, plate, f"{s3_bucket}/scores")
    check_predictions(predictions, plate)
