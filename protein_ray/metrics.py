"""Multi-label metrics for protein localisation, in plain numpy.

Inputs everywhere are ``(N, C)`` arrays: ``probs`` are per-class probabilities
in 0..1, ``targets`` are 0/1 (or bool) multi-hot labels, ``predictions`` are
0/1 (or bool) decisions. Nothing here imports sklearn or torch so the module
can run inside light-weight Ray workers and the serving process; the tests
check every function against scikit-learn (and the notebook metric against a
torch re-implementation).

Conventions shared with sklearn (``zero_division=0``): an F1 whose
denominator is zero -- no positives and nothing predicted -- counts as 0.
"""

from __future__ import annotations

import numpy as np

# 0.05, 0.10, ..., 0.95. Rounded so 0.5 is exactly 0.5 (linspace gives
# 0.49999999999999994), which keeps the tuned thresholds clean in JSON.
DEFAULT_THRESHOLD_GRID = np.round(np.linspace(0.05, 0.95, 19), 2)


# --------------------------------------------------------------------------
# Input handling


def _as_matrix(array, name: str) -> np.ndarray:
    """Return ``array`` as a 2-D numpy array, or explain why it is not one."""
    matrix = np.asarray(array)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C); got shape {matrix.shape}")
    return matrix


def _as_binary(array, name: str) -> np.ndarray:
    """0/1 or bool -> bool. Floats are read as ``> 0.5`` so 0.0/1.0 labels work."""
    matrix = _as_matrix(array, name)
    if matrix.dtype == bool:
        return matrix
    return matrix > 0.5


def _check_same_shape(first: np.ndarray, second: np.ndarray) -> None:
    if first.shape != second.shape:
        raise ValueError(f"shapes differ: {first.shape} vs {second.shape}")


def _binary_pair(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
    truth = _as_binary(targets, "targets")
    predicted = _as_binary(predictions, "predictions")
    _check_same_shape(truth, predicted)
    return truth, predicted


def _f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), with 0 where the denominator is 0.

    This is algebraically the harmonic mean of precision and recall, and it is
    the form sklearn uses, so undefined precision (nothing predicted) gives 0
    exactly like ``zero_division=0``.
    """
    tp = np.asarray(tp, dtype=float)
    denominator = 2 * tp + np.asarray(fp, dtype=float) + np.asarray(fn, dtype=float)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, 2 * tp / safe, 0.0)


def _confusion_counts(truth: np.ndarray, predicted: np.ndarray, axis: int):
    """True positives, false positives and false negatives summed along ``axis``."""
    tp = np.sum(truth & predicted, axis=axis)
    fp = np.sum(~truth & predicted, axis=axis)
    fn = np.sum(truth & ~predicted, axis=axis)
    return tp, fp, fn


# --------------------------------------------------------------------------
# F1 family (sklearn's f1_score with zero_division=0)


def f1_per_class(targets, predictions) -> np.ndarray:
    """F1 of each class, shape ``(C,)`` (sklearn ``average=None``)."""
    truth, predicted = _binary_pair(targets, predictions)
    return _f1_from_counts(*_confusion_counts(truth, predicted, axis=0))


def macro_f1(targets, predictions) -> float:
    """Unweighted mean of the per-class F1: rare classes count as much as common ones."""
    return float(np.mean(f1_per_class(targets, predictions)))


def micro_f1(targets, predictions) -> float:
    """F1 of all (row, class) decisions pooled: dominated by the common classes."""
    truth, predicted = _binary_pair(targets, predictions)
    tp, fp, fn = (np.sum(count) for count in _confusion_counts(truth, predicted, axis=0))
    return float(_f1_from_counts(tp, fp, fn))


def samples_f1(targets, predictions) -> float:
    """Mean over rows of each row's F1 (sklearn ``average="samples"``).

    A row with no true labels and no predicted labels scores 0, as in sklearn
    with ``zero_division=0``.
    """
    truth, predicted = _binary_pair(targets, predictions)
    if truth.shape[0] == 0:
        raise ValueError("samples_f1 needs at least one row")
    return float(np.mean(_f1_from_counts(*_confusion_counts(truth, predicted, axis=1))))


# --------------------------------------------------------------------------
# The seed notebook's metric


def _notebook_fscore(output: np.ndarray, label: np.ndarray, threshold: float, beta: float) -> float:
    """One batch of the notebook's ``F_score``, formula and epsilons kept verbatim."""
    prob = output > threshold
    label = label > threshold
    tp = np.sum(prob & label, axis=1).astype(float)
    fp = np.sum(prob & ~label, axis=1).astype(float)
    fn = np.sum(~prob & label, axis=1).astype(float)
    precision = np.mean(tp / (tp + fp + 1e-12))
    recall = np.mean(tp / (tp + fn + 1e-12))
    return float((1 + beta**2) * precision * recall / (beta**2 * precision + recall + 1e-12))


def batch_fscore(probs, targets, threshold: float = 0.5, batch_size: int | None = None, beta: float = 1.0) -> float:
    """The "Zero to GANs - Human Protein Classification" notebook's F-score.

    Kept so our numbers compare with the published ones. It is *not* a
    standard F1: per batch it averages each row's precision and each row's
    recall, then takes their F-beta; the validation score is the unweighted
    mean of the per-batch scores (a short last batch counts as much as a full
    one). ``batch_size=None`` treats the whole set as one batch, which removes
    that dependence on batching.

    Both ``probs`` and ``targets`` are binarised with ``> threshold``, as in
    the notebook. To score already-binary predictions (e.g. after per-class
    thresholds or the never-empty rule), pass them as 0/1 or bool in place of
    ``probs`` with any ``threshold`` in ``[0, 1)`` -- the default 0.5 works.
    """
    output = _as_matrix(probs, "probs").astype(float)
    label = _as_matrix(targets, "targets").astype(float)
    _check_same_shape(output, label)
    rows = output.shape[0]
    if rows == 0:
        raise ValueError("batch_fscore needs at least one row")
    step = rows if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size}")
    scores = [
        _notebook_fscore(output[start : start + step], label[start : start + step], threshold, beta)
        for start in range(0, rows, step)
    ]
    return float(np.mean(scores))


# --------------------------------------------------------------------------
# Average precision (sklearn's average_precision_score)


def _average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise AP of one class: sum over distinct thresholds of dRecall * Precision.

    Tied scores form one threshold (all tied rows enter together), which is
    what sklearn does; no interpolation. NaN when the class has no positives,
    because recall is then undefined.
    """
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_truth = truth[order]
    # Last index of each run of equal scores = one distinct threshold.
    threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_truth.size - 1]
    true_positives = np.cumsum(sorted_truth)[threshold_ends]
    predicted_positives = threshold_ends + 1
    precision = true_positives / predicted_positives
    recall = true_positives / positives
    recall_gain = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_gain * precision))


def average_precision_per_class(targets, probs) -> np.ndarray:
    """AP of each class, shape ``(C,)``; NaN for a class with no positives."""
    truth = _as_binary(targets, "targets")
    scores = _as_matrix(probs, "probs").astype(float)
    _check_same_shape(truth, scores)
    return np.array([_average_precision(truth[:, c], scores[:, c]) for c in range(truth.shape[1])])


def mean_average_precision(targets, probs) -> float:
    """Macro mAP over the classes that have at least one positive; NaN if none do.

    Classes without positives are left out rather than counted as 0 (sklearn's
    choice) because their AP says nothing about the model.
    """
    per_class = average_precision_per_class(targets, probs)
    scored = per_class[~np.isnan(per_class)]
    return float(np.mean(scored)) if scored.size else float("nan")


# --------------------------------------------------------------------------
# Thresholds


def tune_thresholds(probs, targets, grid=DEFAULT_THRESHOLD_GRID) -> np.ndarray:
    """Per-class threshold (from ``grid``) that maximises that class's F1 here.

    Ties go to the grid value closest to 0.5 (then the lower one), so a flat
    F1 curve does not drag a threshold to an extreme it was never shown to
    need. A class with no positives gets 0.5: every threshold scores 0 on it.
    Decisions use ``probs >= threshold``, as in :func:`apply_thresholds`.
    Tuning on the data you report on flatters the tuned scores; tune on
    validation and apply to test where that matters.
    """
    scores = _as_matrix(probs, "probs").astype(float)
    truth = _as_binary(targets, "targets")
    _check_same_shape(scores, truth)
    grid = np.asarray(grid, dtype=float).ravel()
    if grid.size == 0:
        raise ValueError("grid must contain at least one threshold")
    f1_by_threshold = np.stack([f1_per_class(truth, scores >= t) for t in grid])  # (G, C)
    distance_from_half = np.round(np.abs(grid - 0.5), 9)
    thresholds = np.full(truth.shape[1], 0.5)
    for c in np.flatnonzero(truth.any(axis=0)):
        column = f1_by_threshold[:, c]
        best = np.flatnonzero(column >= column.max() - 1e-12)
        thresholds[c] = grid[best[np.argmin(distance_from_half[best])]]
    return thresholds


def apply_thresholds(probs, thresholds, never_empty: bool = True) -> np.ndarray:
    """Bool ``(N, C)`` decisions ``probs >= thresholds`` (scalar or per-class).

    With ``never_empty`` a row with no positive class gets its most probable
    class: every image in the dataset has at least one location, so an empty
    answer is always wrong and the top class is the best single guess.
    """
    scores = _as_matrix(probs, "probs").astype(float)
    cutoffs = np.asarray(thresholds, dtype=float)
    if cutoffs.ndim > 1 or (cutoffs.ndim == 1 and cutoffs.shape[0] != scores.shape[1]):
        raise ValueError(f"thresholds must be a scalar or shape ({scores.shape[1]},); got {cutoffs.shape}")
    predictions = scores >= cutoffs
    if never_empty and scores.shape[1] > 0:
        empty = ~predictions.any(axis=1)
        predictions[empty, np.argmax(scores[empty], axis=1)] = True
    return predictions


# --------------------------------------------------------------------------
# Baseline


def label_prior_baseline_f1(targets) -> float:
    """Macro F1 of the best predictor that ignores the image.

    Such a predictor outputs one fixed set of classes for every row. Macro F1
    splits into independent per-class terms, and for a class with prevalence
    ``p`` "always on" scores ``2p / (1 + p)`` while "always off" scores 0, so
    the best fixed set is *all* classes and its macro F1 is the mean of
    ``2p / (1 + p)``. A trained model must beat this to have learnt anything
    from the pixels.
    """
    truth = _as_binary(targets, "targets")
    if truth.shape[0] == 0:
        raise ValueError("label_prior_baseline_f1 needs at least one row")
    prevalence = truth.mean(axis=0)
    return float(np.mean(2 * prevalence / (1 + prevalence)))


# --------------------------------------------------------------------------
# Everything at once


def _json_float(value: float) -> float | None:
    """NaN is not valid JSON; report it as null."""
    return None if np.isnan(value) else float(value)


def _f1_summary(targets: np.ndarray, predictions: np.ndarray, suffix: str, batch_size: int | None) -> dict:
    return {
        f"macro_f1{suffix}": macro_f1(targets, predictions),
        f"micro_f1{suffix}": micro_f1(targets, predictions),
        f"samples_f1{suffix}": samples_f1(targets, predictions),
        f"batch_fscore{suffix}": batch_fscore(predictions, targets, threshold=0.5, batch_size=batch_size),
        f"f1_per_class{suffix}": f1_per_class(targets, predictions).tolist(),
    }


def evaluate(probs, targets, thresholds=None, never_empty: bool = True, batch_size: int | None = None) -> dict:
    """All metrics as a flat, JSON-friendly dict.

    Two views of the same probabilities:

    * ``...@0.5`` -- the notebook's view: ``probs > 0.5``, no never-empty
      rule, so ``batch_fscore@0.5`` is the number the published notebooks
      report. ``empty_rows@0.5`` is the fraction of rows this leaves without
      any label.
    * unsuffixed (``macro_f1``, ``micro_f1``, ``samples_f1``, ``batch_fscore``,
      ``f1_per_class``) -- what a submission would contain: per-class
      ``thresholds`` (tuned here with :func:`tune_thresholds` when None) and
      the never-empty rule when ``never_empty``.

    Plus ``mAP`` (threshold-free; null if no class has positives),
    ``label_prior_macro_f1`` (:func:`label_prior_baseline_f1`, the best macro
    F1 of a model that ignores the image) and the ``thresholds`` used.
    """
    scores = _as_matrix(probs, "probs").astype(float)
    truth = _as_binary(targets, "targets")
    _check_same_shape(scores, truth)
    if thresholds is None:
        thresholds = tune_thresholds(scores, truth)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=float), (scores.shape[1],))

    at_half = scores > 0.5
    tuned = apply_thresholds(scores, thresholds, never_empty=never_empty)
    report = _f1_summary(truth, at_half, "@0.5", batch_size)
    report["empty_rows@0.5"] = float(np.mean(~at_half.any(axis=1)))
    report.update(_f1_summary(truth, tuned, "", batch_size))
    report["mAP"] = _json_float(mean_average_precision(truth, scores))
    report["label_prior_macro_f1"] = label_prior_baseline_f1(truth)
    report["thresholds"] = [float(t) for t in thresholds]
    return report
