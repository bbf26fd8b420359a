"""Per-field image QC: the measures on real decoded fields, the plate-relative flags, and a
generated plate whose planted bad fields QC must find (and nothing else but truly clipped fields)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import encode
from PIL import Image
from scipy import ndimage

from protein_ray import qc, synthetic
from protein_ray.imaging import decode_image
from protein_ray.spec import Stain
from protein_ray.synthetic_cells import render_background, render_field

FOCUS, FOREGROUND = 0, 1


def decoded(image: np.ndarray) -> np.ndarray:
    """A float render as decode_image returns it after a round trip through an 8-bit PNG."""
    return decode_image(encode(np.rint(image * 255).astype(np.uint8), "PNG"))


def cell_field(seed: int = 3, size: int = 128, **kwargs) -> np.ndarray:
    return decoded(render_field([4, 6], size, np.random.default_rng(seed), **kwargs))


# ----------------------------------------------------------------------------- measures
def test_measure_names_follow_the_stains():
    assert qc.measure_names(["red", "Nucleoli fibrillar center"]) == [
        "qc_focus", "qc_foreground", "qc_saturated_red", "qc_saturated_nucleoli_fibrillar_center"]
    measures = qc.field_measures(cell_field())
    assert measures.dtype == np.float32 and measures.shape == (len(qc.measure_names("rgb")),)


@pytest.mark.parametrize("size", [128, 512])
def test_a_blurred_field_has_lower_focus_than_the_same_field_sharp(size):
    sharp = cell_field(size=size)
    after = qc.field_measures(ndimage.gaussian_filter(sharp, (size / 128, size / 128, 0)))[FOCUS]
    defocused = qc.field_measures(cell_field(size=size, defocus=5.0))[FOCUS]  # blurred before the camera's noise
    focus = qc.field_measures(sharp)[FOCUS]
    assert focus - after > 0.5 and focus - defocused > 0.5, (focus, after, defocused)


def test_sensor_noise_does_not_hide_blur():
    """Noise survives defocus: without its share of the Laplacian removed, a noisy blurred
    field would measure nearly as sharp as a noisy sharp one."""
    for seed in range(4):
        noise = np.random.default_rng(seed).normal(0, 0.03, (128, 128, 3)).astype(np.float32)
        sharp = render_field([4, 6], 128, np.random.default_rng(seed)) + noise
        blurred = render_field([4, 6], 128, np.random.default_rng(seed), defocus=5.0) + noise
        focus = [qc.field_measures(np.clip(image, 0, 1))[FOCUS] for image in (sharp, blurred)]
        assert focus[0] - focus[1] > 0.6, (seed, focus)


def test_a_bright_flat_particle_does_not_pose_as_blur():
    """A clipped particle over 15% of the field has no detail; focus divides by the field's
    5-95% range, not its variance, which such an object inflates."""
    drops = []
    for seed in range(6):
        field = render_field([4, 6], 128, np.random.default_rng(seed))
        spotted = field.copy()
        spotted[..., 1] = np.minimum(spotted[..., 1] + synthetic.saturated_particle(128), 1)
        drops.append(qc.field_measures(field)[FOCUS] - qc.field_measures(spotted)[FOCUS])
    assert np.mean(drops) < 0.2, drops  # the plate spread of focus is ~0.2-0.25


def test_focus_and_foreground_do_not_depend_on_brightness():
    field = cell_field()
    bright, dim = qc.field_measures(field), qc.field_measures(field * np.float32(0.25))
    np.testing.assert_allclose(dim[:2], bright[:2], atol=1e-3)


def test_foreground_is_near_zero_without_cells_and_clearly_above_with_them():
    for seed in range(3):
        empty = decoded(render_background(128, 3, np.random.default_rng(seed)))
        assert qc.field_measures(empty)[FOREGROUND] < 0.001
        assert qc.field_measures(cell_field(seed))[FOREGROUND] > 0.05


def test_foreground_of_a_real_nucleus_image_is_the_same_at_any_scaling(real_nucleus_tif):
    """Real 16-bit data whose values use 0.4% of the range: foreground must not need it stretched."""
    raw = qc.field_measures(decode_image(real_nucleus_tif, [Stain("dna")]))
    stretched = qc.field_measures(decode_image(real_nucleus_tif, [Stain("dna", scaling="percentile")]))
    assert 0.1 < raw[FOREGROUND] < 0.6
    assert raw[FOREGROUND] == pytest.approx(stretched[FOREGROUND], abs=0.02)


def test_saturated_fraction_is_exact_per_stain():
    image = np.full((40, 50, 3), 0.5, np.float32)
    image.reshape(-1, 3)[:200, 0] = 1.0  # 10% of stain 0
    image[0, :3, 1] = 1.0  # 3 pixels of stain 1 ...
    image[1, :, 1] = 0.9999  # ... and a row just below full scale, which is not clipped
    fractions = qc.field_measures(image)[2:]
    np.testing.assert_array_equal(fractions, np.float32([200 / 2000, 3 / 2000, 0]))
    assert not qc.field_measures(np.zeros((40, 50, 3), np.float32))[2:].any()


# ----------------------------------------------------------------------------- flags
def plate_frame(plate: str, n: int, focus: float = 0.0, foreground: float = 0.3) -> pd.DataFrame:
    """n ordinary fields: measures spread evenly (normal quantiles), nothing clipped."""
    quantiles = np.sort(np.random.default_rng(0).normal(size=n))  # fixed, so the test is exact
    return pd.DataFrame({"plate": plate, "qc_focus": focus + 0.2 * quantiles,
                         "qc_foreground": foreground * 10 ** (0.1 * quantiles[::-1]),
                         "qc_saturated_red": 0.0, "qc_saturated_green": 0.0})


def with_bad_fields() -> pd.DataFrame:
    frame = plate_frame("P1", 40)
    frame.loc[5, "qc_focus"] = -1.5  # blurred
    frame.loc[6, ["qc_focus", "qc_foreground"]] = (-3.0, 0.0)  # empty (its focus measures noise)
    frame.loc[7, "qc_saturated_green"] = 0.2  # saturated
    frame.loc[8, ["qc_focus", "qc_saturated_red"]] = (-1.5, 0.3)  # both
    frame.loc[9, "qc_saturated_red"] = 0.0005  # a few clipped pixels: fine
    frame.loc[10, ["qc_focus", "qc_foreground"]] = np.nan  # failed to decode
    return frame


def flagged(flags: pd.Series) -> dict:
    return {index: value for index, value in flags.items() if value}


def test_plate_thresholds_flag_exactly_the_outliers():
    flags = qc.flag_fields(with_bad_fields())
    assert flagged(flags) == {5: "blurred", 6: "empty", 7: "saturated", 8: "blurred;saturated"}


def test_absolute_thresholds_replace_the_plate_ones():
    frame = with_bad_fields()
    strict = qc.flag_fields(frame, qc.QcThresholds(min_focus=0.0, max_saturated=0.0001, min_foreground=0.25))
    measured = frame[frame["qc_focus"].notna()]
    empty = set(measured.index[measured["qc_foreground"] < 0.25])
    assert 6 in empty and len(empty) > 1
    assert {i for i, f in flagged(strict).items() if "empty" in f} == empty
    assert {i for i, f in flagged(strict).items() if "blurred" in f} == set(measured.index[measured["qc_focus"] < 0]) - empty
    assert {i for i, f in flagged(strict).items() if "saturated" in f} == {7, 8, 9}
    lenient = qc.flag_fields(frame, qc.QcThresholds(min_focus=-2.0, max_saturated=0.25))
    assert flagged(lenient) == {6: "empty", 8: "saturated"}


def test_failed_decodes_get_no_flag_and_the_index_is_kept():
    frame = with_bad_fields()
    frame.index = [f"img{i}" for i in range(len(frame))]
    flags = qc.flag_fields(frame)
    assert list(flags.index) == list(frame.index) and flags["img10"] == "" and flags["img5"] == "blurred"
    assert qc.flag_fields(frame.iloc[:0]).empty


def test_each_plate_gets_its_own_thresholds():
    """Plate B's optics give sharper fields: a focus that is normal on A is an outlier on B."""
    a, b = plate_frame("A", 30, focus=0.0, foreground=0.1), plate_frame("B", 30, focus=1.5, foreground=0.5)
    a.loc[0, "qc_focus"] = b.loc[0, "qc_focus"] = 0.2
    frame = pd.concat([a, b], ignore_index=True)
    assert flagged(qc.flag_fields(frame)) == {30: "blurred"}
    pooled = qc.flag_fields(frame.assign(plate="one"))
    assert flagged(pooled) == {}  # pooled, the two plates' spread hides it


def test_fields_without_a_plate_form_one_group():
    frame = with_bad_fields()
    frame["plate"] = [None, np.nan] * 20
    assert flagged(qc.flag_fields(frame)) == {5: "blurred", 6: "empty", 7: "saturated", 8: "blurred;saturated"}
    assert flagged(qc.flag_fields(frame.drop(columns="plate"))) == flagged(qc.flag_fields(frame))


def test_a_small_plate_uses_fixed_spreads():
    frame = plate_frame("tiny", 5)
    frame.loc[0, "qc_focus"] = frame["qc_focus"].median() - 1.0  # 4 fixed spreads below: blurred
    frame.loc[1, "qc_focus"] = frame["qc_focus"].median() - 0.5  # 2: not
    frame.loc[2, "qc_saturated_green"] = 0.04  # below the floor
    assert flagged(qc.flag_fields(frame)) == {0: "blurred"}


def test_clipping_everywhere_is_not_an_outlier_and_one_pixel_is_not_saturation():
    frame = plate_frame("P", 30)
    frame["qc_saturated_red"] = 0.001  # a percentile-scaled stain: ~0.1% at 1.0 in every field
    frame.loc[3, "qc_saturated_green"] = 1 / 512**2
    assert flagged(qc.flag_fields(frame)) == {}


# ----------------------------------------------------------------------------- a generated plate
@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("qc") / "plate"
    synthetic.write_plate_dataset(out, wells=96, fields=2, size=128, seed=0, controls=True, plant_qc=True,
                                  workers=2, progress=False)
    truth = pd.read_csv(out / "ground_truth.csv", keep_default_na=False)
    return out, truth


def test_qc_finds_the_planted_fields_of_a_generated_plate(plate):
    out, truth = plate
    measures = pd.DataFrame([qc.field_measures(decode_image((out / row.plate / f"{row.image_id}.png").read_bytes()))
                             for row in truth.itertuples()], columns=qc.measure_names(["red", "green", "blue"]))
    flags = qc.flag_fields(measures.assign(plate=truth["plate"]))
    planted = truth["planted_qc"] != ""
    assert sorted(truth.loc[planted, "planted_qc"]) == ["blurred", "empty", "saturated"]
    assert (flags[planted] == truth.loc[planted, "planted_qc"]).all(), flags[planted]
    # Synthetic fields clip bright nuclei and dots; a few clip more than the floor. Those are
    # flagged, rightly: check in the files that they are clipped, and that they are few.
    others = flags[~planted & (flags != "")]
    assert set(others) <= {"saturated"} and len(others) <= 0.02 * len(truth), others  # seed 0: 3 of 192
    for row in truth.loc[others.index].itertuples():
        pixels = np.asarray(Image.open(out / row.plate / f"{row.image_id}.png"))
        assert (pixels == 255).mean((0, 1)).max() > qc.SATURATED_FLOOR
