import numpy as np
import pytest

from protein_ray.labels import (
    CLASS_NAMES,
    NUM_CLASSES,
    LabelError,
    format_label_string,
    from_multi_hot,
    multi_hot_matrix,
    names_for,
    parse_label_string,
    to_multi_hot,
)


def test_ten_classes_in_design_order():
    assert NUM_CLASSES == 10
    assert CLASS_NAMES[4] == "Nucleoplasm" and CLASS_NAMES[6] == "Cytosol" and CLASS_NAMES[9] == "Nuclear speckles"


@pytest.mark.parametrize("text, ids", [("6 4", [4, 6]), ("0", [0]), ("9 9 1", [1, 9]), ("", []), ("  2  ", [2])])
def test_kaggle_string_round_trip(text, ids):
    assert parse_label_string(text) == ids
    assert parse_label_string(format_label_string(ids)) == ids
    assert from_multi_hot(to_multi_hot(ids)) == ids


def test_every_real_label_set_round_trips():
    import csv
    from importlib.resources import files

    with (files("protein_ray") / "resources" / "label_set_counts.csv").open() as handle:
        for row in csv.DictReader(handle):
            ids = parse_label_string(row["label_set"])
            assert format_label_string(ids) == row["label_set"]


@pytest.mark.parametrize("text, fragment", [("10", "outside 0..9"), ("-1", "outside 0..9"), ("4 x", "'x' is not an integer"), ("2.5", "not an integer")])
def test_bad_label_names_the_row(text, fragment):
    with pytest.raises(LabelError) as error:
        parse_label_string(text, row="train.csv line 7")
    assert fragment in str(error.value) and "train.csv line 7" in str(error.value)


def test_multi_hot_matrix_treats_unknown_as_zero_row():
    matrix = multi_hot_matrix([[4, 6], None, []])
    assert matrix.shape == (3, 10)
    np.testing.assert_array_equal(matrix.sum(axis=1), [2, 0, 0])
    assert names_for([6, 4]) == ["Nucleoplasm", "Cytosol"]


def test_multi_hot_matrix_rejects_bad_ids_with_row():
    with pytest.raises(LabelError, match="row 1"):
        multi_hot_matrix([[1], [12]])
