"""The default 10 localisation classes and conversions between the three forms of labels.

Labels travel as Kaggle strings (``"6 4"``), as lists of class ids (``[4, 6]``)
and as multi-hot float vectors (what the loss sees). Everything converts here so
that validation happens in one place. Other label sets (``protein_ray.spec``) pass
their class count as ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Mitochondria",
    "Nuclear bodies",
    "Nucleoli",
    "Golgi apparatus",
    "Nucleoplasm",
    "Nucleoli fibrillar center",
    "Cytosol",
    "Plasma membrane",
    "Centrosome",
    "Nuclear speckles",
)
NUM_CLASSES = len(CLASS_NAMES)


class LabelError(ValueError):
    """A label that is not a valid class id; the message names where it came from."""


def _where(row: object | None) -> str:
    return f" (row {row})" if row is not None else ""


def parse_label_string(text: str | None, row: object | None = None, num_classes: int = NUM_CLASSES) -> list[int]:
    """``"6 4"`` -> ``[4, 6]``. Empty or missing text means no labels.

    ``row`` (a row number or image id) is only used to make errors findable.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return []
    ids = []
    for token in str(text).split():
        try:
            class_id = int(token)
        except ValueError:
            raise LabelError(f"label {token!r} is not an integer class id{_where(row)}") from None
        ids.append(class_id)
    return validate_ids(ids, row, num_classes)


def validate_ids(ids: Iterable[int], row: object | None = None, num_classes: int = NUM_CLASSES) -> list[int]:
    """Check every id is in 0..num_classes-1; return them sorted and de-duplicated."""
    checked = set()
    for class_id in ids:
        if isinstance(class_id, (bool, np.bool_)) or not isinstance(class_id, (int, np.integer)):
            raise LabelError(f"label {class_id!r} is not an integer class id{_where(row)}")
        if not 0 <= class_id < num_classes:
            raise LabelError(f"label {class_id} is outside 0..{num_classes - 1}{_where(row)}")
        checked.add(int(class_id))
    return sorted(checked)


def format_label_string(ids: Iterable[int], num_classes: int = NUM_CLASSES) -> str:
    """``[4, 6]`` -> ``"4 6"`` (Kaggle's space-separated form)."""
    return " ".join(str(i) for i in validate_ids(ids, num_classes=num_classes))


def to_multi_hot(ids: Iterable[int]) -> np.ndarray:
    vector = np.zeros(NUM_CLASSES, dtype=np.float32)
    vector[validate_ids(ids)] = 1.0
    return vector


def multi_hot_matrix(label_lists: Sequence[Iterable[int] | None], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """One multi-hot row per image; ``None`` (unknown labels) gives a zero row."""
    matrix = np.zeros((len(label_lists), num_classes), dtype=np.float32)
    for row, ids in enumerate(label_lists):
        if ids is not None:
            matrix[row, validate_ids(ids, row, num_classes)] = 1.0
    return matrix


def from_multi_hot(vector: Sequence[float]) -> list[int]:
    return [i for i, value in enumerate(vector) if value > 0.5]


def names_for(ids: Iterable[int]) -> list[str]:
    return [CLASS_NAMES[i] for i in validate_ids(ids)]
