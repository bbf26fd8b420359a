"""Shards and readers on a real local Ray instance, local disk and a real S3 server."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from protein_ray import storage
from protein_ray.data import FOOTER_ACTORS_ENV, dataset_of, footer_actors, stratified_split, write_shards
from protein_ray.folders import image_folder_index
from protein_ray.inputs import kaggle_index, resolve_input
from protein_ray.labels import LabelError
from protein_ray.shards import ShardFormatError
from protein_ray.sources import DataSourceError, InputOptions
from protein_ray.storage import INCOMPLETE_MARKER

pytestmark = pytest.mark.ray

LABEL_SETS = ["4", "6 4", "0", "7 6", "2", "9 4", "1", "3 6", "8", "5 2"]


def read_shards(uri: str, split: str | None = None):
    """A Ray Dataset of a shard root's rows, the way every command reads them."""
    return dataset_of(resolve_input(uri, InputOptions(split=split)))


def png_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_kaggle_root(root, n_train=20, n_test=6):
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    train = pd.DataFrame({"Image": [f"img{i:03d}" for i in range(n_train)],
                          "Label": [LABEL_SETS[i % len(LABEL_SETS)] for i in range(n_train)]})
    for i, image_id in enumerate(train.Image):
        (root / "train" / f"{image_id}.png").write_bytes(png_bytes(i))
    test = pd.DataFrame({"Image": [f"tst{i:03d}" for i in range(n_test)], "Label": ""})
    for i, image_id in enumerate(test.Image):
        (root / "test" / f"{image_id}.png").write_bytes(png_bytes(1000 + i))
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "submission.csv", index=False)
    return root


def assert_round_trip(root, shard_uri):
    rows = read_shards(shard_uri, "train").to_pandas().set_index("image_id")
    index = kaggle_index(str(root), "train").set_index("image_id")
    assert len(rows) == len(index)
    for image_id, expected in index.iterrows():
        assert rows.loc[image_id, "image"] == (root / "train" / f"{image_id}.png").read_bytes()
        assert list(rows.loc[image_id, "labels"]) == expected["labels"]
        assert rows.loc[image_id, "source"] == expected["sources"][0]
    test_rows = read_shards(shard_uri, "test").to_pandas()
    assert len(test_rows) == 6 and test_rows["labels"].isna().all()


def test_kaggle_shards_round_trip_locally(ray_session, tmp_path):
    root = make_kaggle_root(tmp_path / "kaggle")
    summary = write_shards(str(root), str(tmp_path / "shards"), rows_per_file=8)
    assert summary.splits == {"train": 20, "test": 6}
    assert_round_trip(root, str(tmp_path / "shards"))
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 20, "test": 6}
    assert manifest["class_frequency"]["train"]["Nucleoplasm"] == pytest.approx(6 / 20)
    assert len(list((tmp_path / "shards" / "train").glob("*.parquet"))) >= 3  # 20 rows, 8 per file
    assert not (tmp_path / "shards" / INCOMPLETE_MARKER).exists()


def footer_readers_planned(dataset) -> int:
    """The size of the footer-reading actor pool Ray Data planned for a Parquet read
    (Ray 2.60 internals: the ListFiles operator's indexer)."""
    operator = dataset._logical_plan.dag
    while not hasattr(operator, "file_indexer"):
        operator = operator.input_dependencies[0]
    return operator.file_indexer._num_actors


def test_a_shard_read_plans_one_footer_reader_per_ten_files_unless_the_user_sets_it(ray_session, tmp_path,
                                                                                    monkeypatch):
    root = make_kaggle_root(tmp_path / "kaggle")
    write_shards(str(root), str(tmp_path / "shards"), rows_per_file=8)  # 3 train files
    assert footer_readers_planned(read_shards(str(tmp_path / "shards"), "train")) == 1  # Ray's default is 32
    assert [footer_actors(n) for n in (1, 10, 11, 320, 5000)] == ["1", "1", "2", "32", "32"]
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "4")
    assert footer_readers_planned(read_shards(str(tmp_path / "shards"), "train")) == 4


def test_a_training_read_takes_shard_files_in_a_new_order_each_time_and_image_files_shuffled(ray_session, tmp_path,
                                                                                             monkeypatch):
    import ray.data

    root = make_kaggle_root(tmp_path / "kaggle")
    write_shards(str(root), str(tmp_path / "shards"), rows_per_file=2)  # 10 train files
    listed = [f"img{i:03d}" for i in range(20)]  # train.csv's order, and the shard files'
    # Ray Data yields blocks as its tasks finish; in the files' order, any change of order is the shuffle's.
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    shard_rows = dataset_of(resolve_input(str(tmp_path / "shards"), InputOptions(split="train")), shuffle=True)
    first, second = ([row["image_id"] for row in shard_rows.iter_rows()] for _ in range(2))
    assert sorted(first) == sorted(second) == listed
    assert listed != first != second  # one order of 10 files twice by chance: 1 in 10!
    file_rows = dataset_of(resolve_input(str(root), InputOptions(split="train")), shuffle=True)
    read = [row["image_id"] for row in file_rows.iter_rows()]
    assert sorted(read) == listed and read != listed


@pytest.mark.s3
def test_kaggle_shards_round_trip_on_s3(ray_session, tmp_path, s3_bucket):
    root = make_kaggle_root(tmp_path / "kaggle")
    # Source on S3 too: upload the Kaggle root, shard S3 -> S3.
    for path in root.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{s3_bucket}/kaggle/{path.relative_to(root)}", path.read_bytes())
    write_shards(f"{s3_bucket}/kaggle", f"{s3_bucket}/shards", rows_per_file=8)
    rows = read_shards(f"{s3_bucket}/shards", "train").to_pandas().set_index("image_id")
    assert len(rows) == 20
    for image_id in rows.index:
        assert rows.loc[image_id, "image"] == (root / "train" / f"{image_id}.png").read_bytes()
        assert rows.loc[image_id, "source"] == f"{s3_bucket}/kaggle/train/{image_id}.png"
    assert storage.exists(f"{s3_bucket}/shards/manifest.json")
    assert not storage.exists(f"{s3_bucket}/shards/{INCOMPLETE_MARKER}")


def write_stain(path, plane):
    if path.suffix == ".tif":
        tifffile.imwrite(path, plane)
    else:
        Image.fromarray(plane).save(path)


def test_separate_16bit_plate_stains_merge_into_shards(ray_session, tmp_path, real_nucleus_tif):
    plate = tmp_path / "plate" / "P001"
    plate.mkdir(parents=True)
    nucleus = tifffile.imread(io.BytesIO(real_nucleus_tif))[:64, :64]
    rng = np.random.default_rng(0)
    expected = {}
    for well, field in [("A01", 1), ("A01", 2), ("B07", 1)]:
        red, green = (rng.integers(0, 65535, (64, 64), dtype=np.uint16) for _ in range(2))
        for stain, plane in zip(("red", "green", "blue"), (red, green, nucleus)):
            write_stain(plate / f"P001_{well}_f{field}_{stain}.tif", plane)
        expected[f"P001/P001_{well}_f{field}"] = np.stack([red, green, nucleus], axis=-1)
    (plate / "notes.txt").write_text("acquisition notes")
    write_shards(str(tmp_path / "plate"), str(tmp_path / "shards"))
    rows = read_shards(str(tmp_path / "shards")).to_pandas().set_index("image_id")
    assert sorted(rows.index) == sorted(expected)
    for image_id, pixels in expected.items():
        merged = tifffile.imread(io.BytesIO(rows.loc[image_id, "image"]))
        np.testing.assert_array_equal(merged, pixels)  # lossless 16-bit merge
        assert rows.loc[image_id, "plate"] == "P001"
    assert rows.loc["P001/P001_B07_f1", "well"] == "B07" and rows.loc["P001/P001_A01_f2", "field"] == 2
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["skipped_non_images"] == [f"{plate / 'notes.txt'} (not an image by name)"]


def test_plate_index_parses_names_and_groups_stains(tmp_path):
    for name in ["P002_C3_f1.png", "P002_C03_f2.png", "loose_picture.png"]:
        (tmp_path / name).write_bytes(png_bytes(1))
    index, skipped = image_folder_index(str(tmp_path))
    rows = index.set_index("image_id")
    assert set(rows.index) == {"P002_C03_f1", "P002_C03_f2", "loose_picture.png"}
    assert rows.loc["P002_C03_f1", "well"] == "C03" and pd.isna(rows.loc["loose_picture.png", "plate"])
    assert skipped == []


def test_stratified_split_is_deterministic_and_keeps_rare_classes():
    rng = np.random.default_rng(0)
    ids = [f"x{i}" for i in range(400)]
    labels = [[int(c) for c in rng.choice(10, size=rng.integers(1, 3), replace=False, p=np.r_[[0.2] * 4, [0.05] * 4, [0.05] * 2] / np.r_[[0.2] * 4, [0.05] * 4, [0.05] * 2].sum())] for _ in ids]
    train_a, val_a = stratified_split(ids, labels, 0.25, seed=3)
    train_b, val_b = stratified_split(list(reversed(ids)), list(reversed(labels)), 0.25, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert set(train_a).isdisjoint(val_a) and len(train_a) + len(val_a) == 400
    by_id = dict(zip(ids, labels))
    for cls in range(10):
        total = sum(cls in by_id[i] for i in ids)
        in_val = sum(cls in by_id[i] for i in val_a)
        assert abs(in_val - total * 0.25) <= max(2, 0.1 * total)


# ----------------------------------------------------------------- bad input ---


def test_missing_image_names_the_csv_row(tmp_path):
    root = make_kaggle_root(tmp_path / "k")
    (root / "train" / "img005.png").unlink()
    with pytest.raises(DataSourceError, match=r"train.csv line 7 \(image img005\): no image file"):
        kaggle_index(str(root))


def test_csv_without_label_column(tmp_path):
    root = make_kaggle_root(tmp_path / "k")
    pd.read_csv(root / "train.csv").rename(columns={"Label": "Target"}).to_csv(root / "train.csv", index=False)
    with pytest.raises(DataSourceError, match=r"missing column\(s\) \['Label'\]"):
        kaggle_index(str(root))


def test_bad_label_in_csv_names_the_row(tmp_path):
    root = make_kaggle_root(tmp_path / "k")
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[3, "Label"] = "4 12"
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(LabelError, match=r"outside 0..9 \(row train.csv line 5 \(image img003\)\)"):
        kaggle_index(str(root))


def test_non_image_file_fails_shard_and_leaves_it_marked_incomplete(ray_session, tmp_path):
    root = make_kaggle_root(tmp_path / "k")
    (root / "train" / "img004.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(Exception, match="img004.png: not a readable image"):
        write_shards(str(root), str(tmp_path / "shards"))
    assert (tmp_path / "shards" / INCOMPLETE_MARKER).exists()
    assert not (tmp_path / "shards" / "manifest.json").exists()
    with pytest.raises(ShardFormatError, match="did not finish"):
        read_shards(str(tmp_path / "shards"))


def test_empty_source_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no image files found"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "shards"))
    assert not (tmp_path / "shards").exists()


def test_existing_shards_are_not_overwritten_silently(ray_session, tmp_path):
    root = make_kaggle_root(tmp_path / "k", n_train=4, n_test=1)
    write_shards(str(root), str(tmp_path / "shards"))
    with pytest.raises(DataSourceError, match="--overwrite"):
        write_shards(str(root), str(tmp_path / "shards"))


@pytest.mark.s3
def test_unreachable_s3_endpoint_is_a_clear_error(monkeypatch, s3_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint http://127.0.0.1:9"):
        write_shards("s3://nowhere/kaggle", "s3://nowhere/shards")


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    """job.json, summary.json, predictions and history.jsonl are rewritten in place
    by reruns; a write that dies half-way must not leave a file no one can parse."""
    target = str(tmp_path / "summary.json")
    storage.write_text(target, '{"images": 10}')
    with pytest.raises(TypeError):
        storage.write_bytes(target, object())  # dies while writing
    assert storage.read_text(target) == '{"images": 10}'
    storage.write_text(target, '{"images": 12}')
    assert storage.read_text(target) == '{"images": 12}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no partial copy left behind


def test_an_image_listed_twice_in_train_csv_is_an_error(tmp_path):
    """It would land in both the training and the validation split."""
    root = make_kaggle_root(tmp_path / "k")
    table = pd.read_csv(root / "train.csv", dtype=str)
    pd.concat([table, table.iloc[[3]]]).to_csv(root / "train.csv", index=False)
    with pytest.raises(DataSourceError, match="lists image 'img003' more than once"):
        kaggle_index(str(root))
