"""protein_ray.metrics checked against scikit-learn and a torch copy of the notebook metric."""

from __future__ import annotations

import ast
import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from protein_ray import metrics
from protein_ray.labels import NUM_CLASSES

SEEDS = [0, 1, 2, 3, 4]


def random_case(seed: int, rows: int = 64, classes: int = NUM_CLASSES):
    """Targets with uneven prevalence and probs that are informative but noisy.

    Class 0 never occurs, so every case also covers "a class with no positives".
    """
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.05, 0.6, size=classes)
    prevalence[0] = 0.0
    targets = (rng.random((rows, classes)) < prevalence).astype(int)
    probs = np.clip(0.35 * targets + rng.random((rows, classes)) * 0.65, 0.0, 1.0)
    return probs, targets


def edge_cases():
    """(name, targets, predictions) pairs that exercise the zero-division rules."""
    rng = np.random.default_rng(7)
    targets = (rng.random((12, NUM_CLASSES)) < 0.3).astype(int)
    targets[:, 3] = 0
    return [
        ("class_without_positives", targets, (rng.random(targets.shape) < 0.3).astype(int)),
        ("no_predictions", targets, np.zeros_like(targets)),
        ("all_predicted", targets, np.ones_like(targets)),
        ("single_row", targets[:1], (rng.random((1, NUM_CLASSES)) < 0.5).astype(int)),
        ("all_empty", np.zeros_like(targets), np.zeros_like(targets)),
        ("perfect", targets, targets.copy()),
    ]


def random_pairs():
    pairs = []
    for seed in SEEDS:
        probs, targets = random_case(seed)
        pairs.append((f"seed{seed}", targets, (probs > 0.5).astype(int)))
    return pairs


F1_CASES = random_pairs() + edge_cases()
F1_IDS = [name for name, _, _ in F1_CASES]


# --------------------------------------------------------------------------
# F1 family


@pytest.mark.parametrize(("name", "targets", "predictions"), F1_CASES, ids=F1_IDS)
def test_f1_functions_match_sklearn(name, targets, predictions):
    expected = f1_score(targets, predictions, average=None, zero_division=0)
    np.testing.assert_allclose(metrics.f1_per_class(targets, predictions), expected, atol=1e-12)
    for average, ours in [
        ("macro", metrics.macro_f1),
        ("micro", metrics.micro_f1),
        ("samples", metrics.samples_f1),
    ]:
        reference = f1_score(targets, predictions, average=average, zero_division=0)
        assert ours(targets, predictions) == pytest.approx(reference, abs=1e-12), average


def test_f1_accepts_bool_and_float_inputs():
    probs, targets = random_case(11)
    predictions = probs > 0.5
    as_ints = metrics.f1_per_class(targets, predictions.astype(int))
    np.testing.assert_array_equal(metrics.f1_per_class(targets.astype(bool), predictions), as_ints)
    np.testing.assert_array_equal(metrics.f1_per_class(targets.astype(float), predictions.astype(float)), as_ints)


def test_f1_rejects_mismatched_or_flat_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.f1_per_class(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="2-D"):
        metrics.macro_f1(np.zeros(4), np.zeros(4))


# --------------------------------------------------------------------------
# The notebook's F-score


def notebook_f_score(output, label, threshold=0.5, beta=1):
    """The seed notebook's F_score, verbatim apart from the function name."""
    import torch  # noqa: F401  (used through tensor methods)

    prob = output > threshold
    label = label > threshold

    TP = (prob & label).sum(1).float()
    FP = (prob & (~label)).sum(1).float()
    FN = ((~prob) & label).sum(1).float()

    precision = torch.mean(TP / (TP + FP + 1e-12))
    recall = torch.mean(TP / (TP + FN + 1e-12))
    F2 = (1 + beta**2) * precision * recall / (beta**2 * precision + recall + 1e-12)
    return F2.mean(0)


def notebook_validation_score(probs, targets, batch_size, threshold=0.5, beta=1):
    """What the notebook's validation loop reports: mean of per-batch scores."""
    torch = pytest.importorskip("torch")
    output = torch.tensor(probs, dtype=torch.float32)
    label = torch.tensor(targets, dtype=torch.float32)
    size = batch_size or len(output)
    scores = [notebook_f_score(o, l, threshold, beta) for o, l in zip(output.split(size), label.split(size))]
    return float(torch.stack(scores).mean())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch_size", [None, 1, 7, 16, 64, 100])
@pytest.mark.parametrize(("threshold", "beta"), [(0.5, 1.0), (0.3, 1.0), (0.5, 2.0)])
def test_batch_fscore_matches_notebook(seed, batch_size, threshold, beta):
    probs, targets = random_case(seed)
    ours = metrics.batch_fscore(probs, targets, threshold=threshold, batch_size=batch_size, beta=beta)
    reference = notebook_validation_score(probs, targets, batch_size, threshold, beta)
    assert ours == pytest.approx(reference, rel=1e-5, abs=1e-6)  # torch runs in float32


@pytest.mark.parametrize(("name", "targets", "predictions"), edge_cases(), ids=[c[0] for c in edge_cases()])
def test_batch_fscore_edge_cases_match_notebook(name, targets, predictions):
    ours = metrics.batch_fscore(predictions, targets)
    assert ours == pytest.approx(notebook_validation_score(predictions, targets, None), rel=1e-5, abs=1e-6)


def test_batch_fscore_whole_set_versus_batches():
    probs, targets = random_case(3, rows=50)
    whole = metrics.batch_fscore(probs, targets)
    # A batch at least as large as the set is the whole set.
    assert metrics.batch_fscore(probs, targets, batch_size=50) == whole
    assert metrics.batch_fscore(probs, targets, batch_size=500) == whole
    # Batched = unweighted mean of the batches scored alone (the short last one included).
    chunks = [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 50)]
    per_batch = [metrics.batch_fscore(probs[s], targets[s]) for s in chunks]
    assert metrics.batch_fscore(probs, targets, batch_size=16) == pytest.approx(np.mean(per_batch), abs=1e-12)
    # ... which is not the whole-set score in general.
    assert metrics.batch_fscore(probs, targets, batch_size=16) != pytest.approx(whole, abs=1e-9)


def test_batch_fscore_scores_binary_predictions_at_default_threshold():
    probs, targets = random_case(5)
    predictions = probs > 0.5
    assert metrics.batch_fscore(predictions, targets) == metrics.batch_fscore(probs, targets)
    assert metrics.batch_fscore(predictions.astype(float), targets) == metrics.batch_fscore(probs, targets)


def test_batch_fscore_rejects_bad_batch_size():
    probs, targets = random_case(0)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.batch_fscore(probs, targets, batch_size=0)


# --------------------------------------------------------------------------
# Average precision


def ap_cases():
    cases = []
    for seed in SEEDS:
        probs, targets = random_case(seed)
        cases.append((f"seed{seed}", probs, targets))
        # One decimal: many ties, which sklearn treats as one threshold each.
        cases.append((f"ties{seed}", np.round(probs, 1), targets))
    probs, targets = random_case(9)
    cases.append(("all_tied", np.full_like(probs, 0.5), targets))
    cases.append(("single_row", probs[:1], np.ones_like(targets[:1])))
    return cases


@pytest.mark.parametrize(("name", "probs", "targets"), ap_cases(), ids=[c[0] for c in ap_cases()])
def test_average_precision_matches_sklearn(name, probs, targets):
    ours = metrics.average_precision_per_class(targets, probs)
    has_positives = targets.sum(axis=0) > 0
    assert np.isnan(ours[~has_positives]).all()
    expected = [average_precision_score(targets[:, c], probs[:, c]) for c in np.flatnonzero(has_positives)]
    np.testing.assert_allclose(ours[has_positives], expected, atol=1e-12)
    assert metrics.mean_average_precision(targets, probs) == pytest.approx(np.mean(expected), abs=1e-12)


def test_mean_average_precision_without_positives_is_nan():
    probs, _ = random_case(0)
    assert np.isnan(metrics.mean_average_precision(np.zeros_like(probs), probs))


# --------------------------------------------------------------------------
# Thresholds


@pytest.mark.parametrize("seed", SEEDS)
def test_tuned_thresholds_beat_half_and_come_from_grid(seed):
    probs, targets = random_case(seed)
    thresholds = metrics.tune_thresholds(probs, targets)
    grid = metrics.DEFAULT_THRESHOLD_GRID
    assert thresholds.shape == (NUM_CLASSES,)
    assert all(np.isclose(grid, t).any() for t in thresholds)
    tuned = metrics.f1_per_class(targets, metrics.apply_thresholds(probs, thresholds, never_empty=False))
    at_half = metrics.f1_per_class(targets, probs >= 0.5)
    assert (tuned >= at_half - 1e-12).all()
    # And it is the best the grid allows, per class (checked with sklearn).
    per_threshold = [f1_score(targets, probs >= t, average=None, zero_division=0) for t in grid]
    np.testing.assert_allclose(tuned, np.max(per_threshold, axis=0), atol=1e-12)


def test_tune_thresholds_defaults_grid_is_clean():
    grid = metrics.DEFAULT_THRESHOLD_GRID
    np.testing.assert_allclose(grid, np.linspace(0.05, 0.95, 19), atol=1e-12)
    assert 0.5 in grid.tolist()


def test_tune_thresholds_breaks_ties_towards_half_and_skips_empty_classes():
    targets = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    probs = np.array(
        [
            [0.9, 0.2, 0.12],  # class 0 separable: every grid value in (0.1, 0.9] is perfect
            [0.1, 0.7, 0.13],  # class 1 has no positives
            [0.9, 0.1, 0.01],  # class 2 perfect only for thresholds in (0.01, 0.12]
            [0.1, 0.3, 0.02],
        ]
    )
    thresholds = metrics.tune_thresholds(probs, targets)
    assert thresholds[0] == 0.5
    assert thresholds[1] == 0.5
    assert thresholds[2] == pytest.approx(0.1)  # the perfect value closest to 0.5


def test_tune_thresholds_accepts_custom_grid():
    probs, targets = random_case(2)
    grid = [0.2, 0.4, 0.6]
    thresholds = metrics.tune_thresholds(probs, targets, grid=grid)
    has_positives = targets.sum(axis=0) > 0
    assert set(thresholds[has_positives]).issubset(grid)
    assert (thresholds[~has_positives] == 0.5).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_apply_thresholds_never_empty(seed):
    probs, _ = random_case(seed)
    probs = probs * 0.8  # push many rows below every threshold
    thresholds = np.full(NUM_CLASSES, 0.6)
    plain = metrics.apply_thresholds(probs, thresholds, never_empty=False)
    np.testing.assert_array_equal(plain, probs >= thresholds)
    filled = metrics.apply_thresholds(probs, thresholds)
    assert filled.dtype == bool
    assert filled.any(axis=1).all()
    had_labels = plain.any(axis=1)
    assert (~had_labels).any(), "the case should contain empty rows"
    np.testing.assert_array_equal(filled[had_labels], plain[had_labels])
    empty_rows = np.flatnonzero(~had_labels)
    assert (filled[empty_rows].sum(axis=1) == 1).all()
    np.testing.assert_array_equal(np.argmax(filled[empty_rows], axis=1), np.argmax(probs[empty_rows], axis=1))


def test_apply_thresholds_scalar_and_bad_shape():
    probs, _ = random_case(1)
    np.testing.assert_array_equal(metrics.apply_thresholds(probs, 0.5, never_empty=False), probs >= 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        metrics.apply_thresholds(probs, np.full(NUM_CLASSES + 1, 0.5))


# --------------------------------------------------------------------------
# Label-prior baseline


@pytest.mark.parametrize("seed", SEEDS)
def test_label_prior_baseline_is_best_fixed_prediction(seed):
    rng = np.random.default_rng(seed)
    classes = 5
    targets = (rng.random((30, classes)) < rng.uniform(0.0, 0.7, size=classes)).astype(int)
    best = max(
        f1_score(targets, np.tile(fixed, (len(targets), 1)), average="macro", zero_division=0)
        for fixed in itertools.product([0, 1], repeat=classes)
    )
    assert metrics.label_prior_baseline_f1(targets) == pytest.approx(best, abs=1e-12)


def test_label_prior_baseline_per_class_is_always_on():
    _, targets = random_case(4, rows=200)
    always_on = f1_score(targets, np.ones_like(targets), average=None, zero_division=0)
    assert metrics.label_prior_baseline_f1(targets) == pytest.approx(always_on.mean(), abs=1e-12)


# --------------------------------------------------------------------------
# evaluate


EXPECTED_KEYS = {
    "macro_f1@0.5",
    "micro_f1@0.5",
    "samples_f1@0.5",
    "batch_fscore@0.5",
    "f1_per_class@0.5",
    "empty_rows@0.5",
    "macro_f1",
    "micro_f1",
    "samples_f1",
    "batch_fscore",
    "f1_per_class",
    "mAP",
    "label_prior_macro_f1",
    "thresholds",
}


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_evaluate_reports_every_metric_consistently(seed):
    probs, targets = random_case(seed)
    report = metrics.evaluate(probs, targets, batch_size=16)
    assert set(report) == EXPECTED_KEYS
    json.dumps(report, allow_nan=False)

    at_half = probs > 0.5
    assert report["macro_f1@0.5"] == pytest.approx(f1_score(targets, at_half, average="macro", zero_division=0))
    assert report["samples_f1@0.5"] == pytest.approx(f1_score(targets, at_half, average="samples", zero_division=0))
    assert report["batch_fscore@0.5"] == pytest.approx(metrics.batch_fscore(probs, targets, batch_size=16))
    assert report["empty_rows@0.5"] == pytest.approx(np.mean(~at_half.any(axis=1)))

    thresholds = metrics.tune_thresholds(probs, targets)
    assert report["thresholds"] == thresholds.tolist()
    tuned = metrics.apply_thresholds(probs, thresholds)
    assert report["f1_per_class"] == pytest.approx(f1_score(targets, tuned, average=None, zero_division=0).tolist())
    assert report["micro_f1"] == pytest.approx(f1_score(targets, tuned, average="micro", zero_division=0))
    assert report["batch_fscore"] == pytest.approx(metrics.batch_fscore(tuned, targets, batch_size=16))
    assert report["mAP"] == pytest.approx(metrics.mean_average_precision(targets, probs))
    assert report["label_prior_macro_f1"] == pytest.approx(metrics.label_prior_baseline_f1(targets))


def test_evaluate_uses_given_thresholds_and_never_empty_flag():
    probs, targets = random_case(2)
    thresholds = np.full(NUM_CLASSES, 0.9)
    with_rule = metrics.evaluate(probs, targets, thresholds=thresholds)
    without_rule = metrics.evaluate(probs, targets, thresholds=thresholds, never_empty=False)
    assert with_rule["thresholds"] == [0.9] * NUM_CLASSES
    plain = probs >= 0.9
    assert without_rule["macro_f1"] == pytest.approx(f1_score(targets, plain, average="macro", zero_division=0))
    filled = metrics.apply_thresholds(probs, thresholds)
    assert with_rule["samples_f1"] == pytest.approx(f1_score(targets, filled, average="samples", zero_division=0))


def test_evaluate_without_any_positives_is_still_json():
    probs, _ = random_case(0, rows=8)
    report = metrics.evaluate(probs, np.zeros_like(probs))
    assert report["mAP"] is None
    assert report["thresholds"] == [0.5] * NUM_CLASSES
    json.dumps(report, allow_nan=False)


def test_module_imports_only_numpy():
    """metrics runs in light workers: no sklearn or torch, not even lazily."""
    tree = ast.parse(open(metrics.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "numpy"}
