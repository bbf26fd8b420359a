"""Screen statistics with known answers: plate maps, robust z, Z′, edge effects, profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from protein_ray.plate_map import attach_plate_map, read_plate_map
from protein_ray.plates import canonical_well, is_edge_well, well_table
from protein_ray.screening import add_robust_z, plate_table, robust_z, robust_z_prime, well_profiles, z_prime
from protein_ray.sources import DataSourceError

CLASSES = ["Nucleoplasm", "Nucleoli"]


# ------------------------------------------------------------- known answers --


def test_z_prime_and_its_robust_form_by_hand():
    positives, negatives = np.array([0.8, 0.9, 1.0]), np.array([0.0, 0.1, 0.2])
    # means 0.9 and 0.1, sample SDs 0.1 and 0.1: 1 - 3 * 0.2 / 0.8
    assert z_prime(positives, negatives) == pytest.approx(0.25)
    # medians 0.9 and 0.1, MADs 0.1 and 0.1: 1 - 3 * (1.4826 * 0.2) / 0.8
    assert robust_z_prime(positives, negatives) == pytest.approx(1 - 3 * 0.29652 / 0.8)
    # one wild negative well sinks Z′ but not robust Z′
    clean, wild = np.array([0.0, 0.1, 0.1, 0.1, 0.2]), np.array([0.0, 0.1, 0.1, 0.1, 0.9])
    assert z_prime(positives, wild) < z_prime(positives, clean) - 1
    assert robust_z_prime(positives, wild) == robust_z_prime(positives, clean)
    assert np.isnan(z_prime(positives, np.array([0.1])))  # one well has no spread


def test_robust_z_against_negative_wells_by_hand():
    negatives = np.array([0.0, 0.1, 0.2])  # median 0.1, MAD 0.1 -> SD 0.14826
    assert robust_z(np.array([0.5, 0.1, 0.0]), negatives) == pytest.approx([0.4 / 0.14826, 0.0, -0.1 / 0.14826])
    assert np.isnan(robust_z(np.array([0.5]), np.array([0.2, 0.2, 0.2]))).all()  # MAD 0: undefined
    assert np.isnan(robust_z(np.array([0.5]), np.array([]))).all()


def screen_wells() -> pd.DataFrame:
    """A 96-well plate: negatives in column 1 (nucleoplasm 0.0-0.2), positives for
    nucleoli in column 12, samples elsewhere; the outer-ring samples are brighter."""
    rows = []
    for r in "ABCDEFGH":
        for c in range(1, 13):
            well = f"{r}{c:02d}"
            role = "negative" if c == 1 else "positive" if c == 12 else "sample"
            edge = r in "AH" or c in (1, 12)
            nucleoplasm = {"negative": 0.1 + 0.1 * ((ord(r) - 65) % 3 - 1), "positive": 0.2}.get(role, 0.6 if edge else 0.4)
            nucleoli = {"negative": 0.1, "positive": 0.9}.get(role, 0.3)
            rows.append({"plate": "P1", "well": well, "role": role, "target": "Nucleoli" if role == "positive" else "",
                         "mean_prob_nucleoplasm": nucleoplasm, "mean_prob_nucleoli": nucleoli})
    return pd.DataFrame(rows)


def test_plate_table_z_prime_targets_and_edge_effect():
    table = plate_table(screen_wells(), CLASSES).set_index("class")
    assert table.loc["Nucleoli", ["n_negative", "n_positive"]].tolist() == [8, 8]
    # Constant controls: no spread, Z′ = 1; the edge samples are 0.2 higher than the inner ones.
    assert table.loc["Nucleoli", "z_prime"] == pytest.approx(1.0)
    assert table.loc["Nucleoplasm", "edge_effect"] == pytest.approx(0.2)
    assert table.loc["Nucleoplasm", ["edge_mean", "inner_mean"]].tolist() == pytest.approx([0.6, 0.4])
    assert table.loc["Nucleoli", "edge_effect"] == pytest.approx(0.0)
    # The positives target nucleoli only, so they do not count for nucleoplasm.
    assert table.loc["Nucleoplasm", "n_positive"] == 0 and np.isnan(table.loc["Nucleoplasm", "z_prime"])


def test_robust_z_is_per_plate():
    first = screen_wells()
    second = first.assign(plate="P2", mean_prob_nucleoplasm=first["mean_prob_nucleoplasm"] + 0.3)
    wells = add_robust_z(pd.concat([first, second], ignore_index=True), CLASSES)
    by_plate = wells.set_index(["plate", "well"])["robust_z_nucleoplasm"]
    # negatives of each plate: 0.0/0.1/0.2 (+0.3): median 0.1 (+0.3), MAD 0.1
    assert by_plate["P1", "B05"] == pytest.approx((0.4 - 0.1) / 0.14826)
    assert by_plate["P2", "B05"] == pytest.approx(by_plate["P1", "B05"])
    assert wells["robust_z_nucleoli"].isna().all()  # constant negatives: MAD 0


def test_well_table_leaves_flagged_fields_out_of_the_aggregates():
    predictions = pd.DataFrame({
        "plate": ["P1"] * 4, "well": ["B07"] * 4, "error": [None, None, None, "truncated"],
        "qc_flags": ["", "", "blurred", ""], "labels": ["0", "1", "0 1", None],
        "prob_nucleoplasm": [0.2, 0.4, 0.99, np.nan], "prob_nucleoli": [0.8, 0.6, 0.0, np.nan]})
    well = well_table(predictions, CLASSES).iloc[0]
    assert well[["images_scored", "images_failed", "images_flagged"]].tolist() == [3, 1, 1]
    assert well["mean_prob_nucleoplasm"] == pytest.approx(0.3) and well["median_prob_nucleoli"] == pytest.approx(0.7)
    assert well["frac_pos_nucleoplasm"] == pytest.approx(0.5)


def test_profiles_are_median_embeddings_of_good_fields_in_pycytominer_layout():
    predictions = pd.DataFrame({
        "plate": ["P1", "P1", "P1", "P1"], "well": ["A01", "A01", "A01", "B02"],
        "embedding": [np.array([1.0, 2.0]), np.array([3.0, 6.0]), np.array([100.0, 100.0]), np.array([5.0, 5.0])]})
    good = np.array([True, True, False, True])
    wells = pd.DataFrame({"plate": ["P1", "P1"], "well": ["A01", "B02"], "role": ["negative", "sample"],
                          "compound": ["DMSO", "x"], "mean_prob_nucleoli": [0.1, 0.2]})
    profiles = well_profiles(predictions, good, wells).set_index("Metadata_Well")
    assert list(profiles.columns) == ["Metadata_Plate", "Metadata_role", "Metadata_compound", "Metadata_Fields",
                                      "emb_0000", "emb_0001"]
    assert profiles.loc["A01", ["emb_0000", "emb_0001", "Metadata_Fields"]].tolist() == [2.0, 4.0, 2]
    assert profiles.loc["B02", "Metadata_compound"] == "x"


# ------------------------------------------------------------------ plate maps --


def test_wells_are_spelt_one_way_and_edges_found():
    assert [canonical_well(w) for w in ("B7", "b07", " H12 ", "P24", "Q1", "A0", "7B")] == [
        "B07", "B07", "H12", "P24", None, None, None]
    assert [is_edge_well(w, (8, 12)) for w in ("A05", "H05", "D01", "D12", "B02", "G11")] == [
        True, True, True, True, False, False]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "plate_map.csv"
    path.write_text(text)
    return str(path)


def test_plate_map_is_read_with_free_columns_and_joined_to_wells(tmp_path, caplog):
    uri = write(tmp_path, "plate,well,role,compound,target\nP1,A1,negative,DMSO,\nP1,B7,Positive,ctl,Nucleoli\n")
    plate_map = read_plate_map(uri, CLASSES)
    assert plate_map[["well", "role"]].values.tolist() == [["A01", "negative"], ["B07", "positive"]]
    wells = pd.DataFrame({"plate": ["P1", "P1", "P2"], "well": ["A01", "B07", "A01"], "images_scored": [2, 2, 2]})
    joined = attach_plate_map(wells, plate_map)
    assert list(joined.columns) == ["plate", "well", "role", "compound", "target", "images_scored"]
    assert joined["role"].tolist()[:2] == ["negative", "positive"] and pd.isna(joined["role"].iloc[2])
    assert "not in it" in caplog.text and "P2" in caplog.text


@pytest.mark.parametrize("text, message", [
    ("plate,well\nP1,A01\n", "missing column(s) ['role']"),
    ("plate,well,role\nP1,A01,control\n", "line 2: role 'control' is not one of negative, positive, sample, empty"),
    ("plate,well,role\nP1,A01,sample\nP1,Z99,sample\n", "line 3: 'Z99' is not a well name"),
    ("plate,well,role\nP1,A1,sample\nP1,A01,negative\n", "2 lines name the same well"),
    ("plate,well,role,target\nP1,A01,positive,Golgi\n", "target(s) ['Golgi'] are not classes"),
])
def test_a_bad_plate_map_is_refused_with_the_line_at_fault(tmp_path, text, message):
    with pytest.raises(DataSourceError, match=None) as error:
        read_plate_map(write(tmp_path, text), CLASSES)
    assert message in str(error.value)
