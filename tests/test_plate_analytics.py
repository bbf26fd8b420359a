"""A screen read end to end: a synthetic plate with control wells and planted bad
fields, scored with its plate map by a smoke-trained model.

The model is the smoke preset trained for 10 epochs (~45 s): the session's 3-epoch
model separates no class well enough for Z′ (all below 0). Measured with it on this
plate's layout (8 fields per well): Z′ 0.66 for Cytosol, the class it learns best,
against 0.20 for Plasma membrane and 0.42 for Nucleoplasm (6 fields per well)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import smoke_config

from protein_ray.plates import class_keys

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def screen(ray_session, tmp_path_factory):
    from protein_ray.scoring.job import score
    from protein_ray.scoring.options import PredictOptions
    from protein_ray.synthetic import write_plate_dataset
    from protein_ray.train import run_training

    checkpoint = run_training(smoke_config(tmp_path_factory, "screen", "optim.epochs=10"))
    out = tmp_path_factory.mktemp("screen")
    plate = write_plate_dataset(out / "plate", wells=96, fields=8, size=128, seed=4, controls=True, target="Cytosol",
                                plant_qc=True, progress=False)
    summary = score(PredictOptions(checkpoint=checkpoint, inputs=[plate["out"]], output=str(out / "scores"),
                                   plate_map=str(out / "plate" / plate["plate_map_csv"]), embeddings=True,
                                   chunk_size=64))
    truth = pd.read_csv(out / "plate" / "ground_truth.csv", dtype=str, keep_default_na=False)
    return {"summary": summary, "plate": plate, "out": out / "scores", "truth": truth}


def test_planted_bad_fields_are_flagged_kept_and_left_out_of_their_wells(screen):
    predictions = pd.read_parquet(screen["out"] / "predictions.parquet")
    truth = screen["truth"].set_index("image_id")["planted_qc"]
    flags = predictions.set_index(predictions["image_id"].str.split("/").str[-1])["qc_flags"]
    planted = truth[truth != ""]
    assert len(planted) == 3 and predictions["error"].isna().all()
    assert flags[planted.index].tolist() == planted.tolist(), flags[planted.index]
    # The generator clips a few bright nuclei: at most 2% of the normal fields may read as saturated.
    others = flags.drop(planted.index)
    assert others.isin(["", "saturated"]).all() and (others == "saturated").mean() <= 0.02, others[others != ""]
    counted = flags.str.split(";").explode().value_counts().drop("", errors="ignore").sort_index().to_dict()
    assert screen["summary"]["qc_flagged"] == counted

    # The flagged field keeps its prediction row, and its well's statistics come from the other field.
    wells = pd.read_csv(screen["out"] / "wells.csv").set_index("well")
    prob = f"prob_{class_keys(['Nucleoplasm'])[0]}"
    for image_id in planted.index:
        well = image_id.split("_")[1]
        assert not np.isnan(predictions.set_index(flags.index).loc[image_id, prob])
        assert wells.loc[well, ["images_scored", "images_flagged"]].tolist() == [8, 1]
        others = predictions[(predictions["well"] == well) & (predictions["qc_flags"] == "")]
        assert len(others) == 7 and wells.loc[well, f"mean_{prob}"] == pytest.approx(others[prob].mean(), rel=1e-5)


def test_controls_give_z_prime_robust_z_and_profiles(screen):
    target = screen["plate"]["target"]
    plates = pd.read_csv(screen["out"] / "plates.csv").set_index("class")
    print("Z′ per class:", plates["z_prime"].round(2).to_dict())
    assert plates.loc[target, ["n_negative", "n_positive"]].tolist() == [16, 16]
    assert plates.loc[target, "z_prime"] > 0.5, plates.loc[target]
    assert plates.drop(index=target)["n_positive"].eq(0).all()  # the positives stand for their target only

    wells = pd.read_csv(screen["out"] / "wells.csv")
    key = class_keys([target])[0]
    by_role = wells.groupby("role")[f"robust_z_{key}"].median()
    assert abs(by_role["negative"]) < 0.5 and by_role["positive"] > 3, by_role
    assert set(wells["compound"].dropna()) >= {"DMSO"}

    profiles = pd.read_parquet(screen["out"] / "profiles.parquet")
    assert len(profiles) == 96 and profiles.filter(like="emb_").shape[1] > 8
    assert profiles.set_index("Metadata_Well").loc["A01", "Metadata_role"] == "negative"


def test_the_report_names_the_plate_and_every_flagged_field(screen):
    report = (screen["out"] / "report.html").read_text()
    assert screen["summary"]["outputs"]["report_html"].endswith("report.html")
    assert "P001" in report and "Z′" in report or "Z&#x27;" in report or "Z'" in report
    for image_id in screen["truth"].query("planted_qc != ''")["image_id"]:
        assert image_id in report
    assert report.count("data:image/png;base64,") >= 10  # thumbnails of the top wells' fields, read again
    summary = json.loads((screen["out"] / "summary.json").read_text())
    assert summary["qc_flagged"] == screen["summary"]["qc_flagged"]
