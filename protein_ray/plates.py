"""Plates and wells: per-well aggregation of predictions and plate heatmaps.

The bulk scoring job (``protein_ray.scoring``) writes one prediction row per field
image; a screen is read per well. This module turns prediction rows into the
per-well table of DESIGN.md section 2 (plate, well, images scored and failed,
mean probability and fraction of positive fields per class) and draws one plate
heatmap per class, laid out like the physical plate (8x12 or 16x24 wells).
Column names follow the model's classes (``prob_<class>``, ``mean_prob_<class>``...).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from protein_ray import storage
from protein_ray.labels import multi_hot_matrix, parse_label_string

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

WELL_PATTERN = re.compile(r"^([A-Pa-p])(\d{1,2})$")
# (rows, columns) of the standard plate formats, smallest first.
PLATE_FORMATS = ((8, 12), (16, 24))


def snake_case(name: str) -> str:
    """``"Nucleoli fibrillar center"`` -> ``"nucleoli_fibrillar_center"`` (column names)."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def class_keys(classes: Sequence[str]) -> list[str]:
    return [snake_case(name) for name in classes]


def prob_columns(classes: Sequence[str]) -> list[str]:
    """The per-class probability columns of the predictions, in class order."""
    return [f"prob_{key}" for key in class_keys(classes)]


def parse_well(well: str) -> tuple[int, int] | None:
    """``"B07"`` -> ``(1, 6)`` (zero-based row, column); ``None`` if it is not a well name."""
    match = WELL_PATTERN.match(str(well))
    if match is None or int(match[2]) < 1:
        return None
    return ord(match[1].upper()) - ord("A"), int(match[2]) - 1


def canonical_well(well: str) -> str | None:
    """``"b7"`` -> ``"B07"``: the one spelling of a well name (None if it is not one)."""
    position = parse_well(str(well).strip())
    return None if position is None else f"{chr(ord('A') + position[0])}{position[1] + 1:02d}"


def is_edge_well(well: str, shape: tuple[int, int]) -> bool:
    """Whether ``well`` lies on the outer ring of a plate of ``shape`` (rows, columns)."""
    row, column = parse_well(well)
    return row in (0, shape[0] - 1) or column in (0, shape[1] - 1)


def plate_format(wells) -> tuple[int, int]:
    """The smallest standard plate that holds all ``wells`` (96: 8x12, 384: 16x24)."""
    positions = [p for p in map(parse_well, wells) if p is not None]
    rows = max((r for r, _ in positions), default=0) + 1
    columns = max((c for _, c in positions), default=0) + 1
    for shape in PLATE_FORMATS:
        if rows <= shape[0] and columns <= shape[1]:
            return shape
    return rows, columns  # larger than 384: draw what is there


# ------------------------------------------------------------ aggregation ----


def positive_matrix(predictions: pd.DataFrame, num_classes: int) -> np.ndarray:
    """(N, C) bool: the classes in each row's ``labels`` string (none for failed rows)."""
    label_lists = [None if not isinstance(text, str) else parse_label_string(text, num_classes=num_classes)
                   for text in predictions["labels"]]
    return multi_hot_matrix(label_lists, num_classes) > 0.5


def good_fields(predictions: pd.DataFrame) -> np.ndarray:
    """Rows that count in well aggregates: scored, and not flagged by image QC
    (a flagged field keeps its prediction row; it just does not speak for its well)."""
    scored = predictions["error"].isna().to_numpy()
    if "qc_flags" in predictions:
        scored = scored & predictions["qc_flags"].fillna("").eq("").to_numpy()
    return scored


def well_table(predictions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per-well table: plate, well, images_scored, images_failed, images_flagged, then
    ``mean_prob_<class>``, ``median_prob_<class>`` and ``frac_pos_<class>`` over the
    well's good fields (scored and not QC-flagged).

    Rows without a plate or well (plain image folders, Kaggle) are left out.
    A well with no good field keeps its row, with empty means.
    """
    import pandas as pd  # here, not at the top: the CLI imports this module and must start fast
    plated = predictions[predictions["plate"].notna() & predictions["well"].notna()]
    keys = class_keys(classes)
    stats = [f"{stat}_{k}" for stat in ("mean_prob", "median_prob", "frac_pos") for k in keys]
    columns = ["plate", "well", "images_scored", "images_failed", "images_flagged", *stats]
    if plated.empty:
        return pd.DataFrame(columns=columns)
    scored = plated["error"].isna().to_numpy()
    good = good_fields(plated)
    frame = pd.DataFrame({"plate": plated["plate"].to_numpy(), "well": plated["well"].to_numpy(),
                          "images_scored": scored.astype(int), "images_failed": (~scored).astype(int),
                          "images_flagged": (scored & ~good).astype(int)})
    positive = positive_matrix(plated, len(classes)).astype(float)
    positive[~good] = np.nan  # a failed or flagged field is not a negative field
    for c, (key, prob_column) in enumerate(zip(keys, prob_columns(classes))):
        probs = plated[prob_column].to_numpy(dtype=float)
        frame[f"prob_{key}"] = np.where(good, probs, np.nan)
        frame[f"frac_pos_{key}"] = positive[:, c]
    grouped = frame.groupby(["plate", "well"], sort=True)
    counts = grouped[["images_scored", "images_failed", "images_flagged"]].sum()
    # pandas skips NaN: statistics over good fields only
    means = grouped[[f"prob_{k}" for k in keys]].mean().rename(columns=lambda c: f"mean_{c}")
    medians = grouped[[f"prob_{k}" for k in keys]].median().rename(columns=lambda c: f"median_{c}")
    fractions = grouped[[f"frac_pos_{k}" for k in keys]].mean()
    return counts.join(means).join(medians).join(fractions).reset_index()[columns]


# --------------------------------------------------------------- heatmaps ----


def plate_grid(wells: pd.DataFrame, column: str, shape: tuple[int, int]) -> np.ndarray:
    """One plate's wells as a (rows, columns) array of ``column``; NaN where no well."""
    grid = np.full(shape, np.nan)
    for well, value in zip(wells["well"], wells[column]):
        position = parse_well(well)
        if position is not None and position[0] < shape[0] and position[1] < shape[1]:
            grid[position] = value
    return grid


def _draw_grid(axis, grid: np.ndarray, title: str, cmap):
    image = axis.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    rows, columns = grid.shape
    axis.set_xticks(range(columns), [str(c + 1) for c in range(columns)], fontsize=7)
    axis.set_yticks(range(rows), [chr(ord("A") + r) for r in range(rows)], fontsize=7)
    axis.tick_params(length=0)
    axis.set_title(title, fontsize=9)
    return image


def _png(figure, crop: bool = True) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if crop else None)
    return buffer.getvalue()


def write_heatmaps(wells: pd.DataFrame, folder: str, classes: Sequence[str]) -> list[str]:
    """``folder/<plate>/<class>.png`` per plate and class (fraction of positive
    fields per well) plus ``folder/<plate>/all_classes.png``; returns the URIs.
    Grey wells had no scored field."""
    if wells.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: no scored field
    written = []
    for plate, plate_wells in wells.groupby("plate", sort=True):
        shape = plate_format(plate_wells["well"])
        plate_folder = storage.join(folder, re.sub(r"[^A-Za-z0-9._-]+", "_", str(plate)) or "plate")
        columns = min(5, len(classes))
        rows = -(-len(classes) // columns)
        overview, axes = plt.subplots(rows, columns, figsize=(4 * columns, (3.25 if shape[0] <= 8 else 4.5) * rows),
                                      squeeze=False)
        for axis in axes.flat[len(classes):]:
            axis.set_visible(False)
        # One figure serves every class of the plate: laid out once, then only its pixels
        # and title change, so each PNG costs one render (a figure per class, cropped
        # with bbox_inches="tight", cost two renders and a layout each: ~4 s per plate).
        def single_title(name: str) -> str:
            return f"{plate}: {name} (fraction of positive fields)"

        figure, single = plt.subplots(figsize=(7, 4.2) if shape[0] <= 8 else (11, 6.5))
        image = _draw_grid(single, np.full(shape, np.nan), single_title(classes[0]), cmap)
        figure.colorbar(image, ax=single, shrink=0.8)
        figure.tight_layout()
        for key, name, axis in zip(class_keys(classes), classes, axes.flat):
            grid = plate_grid(plate_wells, f"frac_pos_{key}", shape)
            image.set_data(np.ma.masked_invalid(grid))
            single.set_title(single_title(name), fontsize=9)
            uri = storage.join(plate_folder, f"{key}.png")
            storage.write_bytes(uri, _png(figure, crop=False))
            written.append(uri)
            _draw_grid(axis, grid, name, cmap)
        plt.close(figure)
        overview.suptitle(f"plate {plate}: fraction of positive fields per well")
        uri = storage.join(plate_folder, "all_classes.png")
        storage.write_bytes(uri, _png(overview))
        plt.close(overview)
        written.append(uri)
    return written


# --------------------------------------------------- planted vs predicted ----


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties 1/2)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compare_with_planted(wells: pd.DataFrame, planted: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """How well per-well results follow a known composition, one row per class.

    ``planted`` has columns plate, well, labels (Kaggle strings), like the
    ``wells.csv`` of a synthetic plate. Columns: class, wells_planted,
    mean_prob_planted / mean_prob_other (the class's mean probability in wells
    with and without it), auc (how well the per-well mean probability separates
    them: 0.5 is chance, 1 perfect) and frac_pos_planted / frac_pos_other.
    """
    import pandas as pd
    merged = wells.merge(planted[["plate", "well", "labels"]], on=["plate", "well"], how="inner")
    num_classes = len(classes)
    truth = multi_hot_matrix([parse_label_string(text, num_classes=num_classes) for text in merged["labels"]],
                             num_classes) > 0.5
    rows = []
    for c, (key, name) in enumerate(zip(class_keys(classes), classes)):
        prob = merged[f"mean_prob_{key}"].to_numpy(dtype=float)
        frac = merged[f"frac_pos_{key}"].to_numpy(dtype=float)
        known = ~np.isnan(prob)
        has = truth[:, c]
        rows.append({
            "class": name,
            "wells_planted": int(has[known].sum()),
            "wells_other": int((~has[known]).sum()),
            "mean_prob_planted": float(np.mean(prob[known & has])) if (known & has).any() else float("nan"),
            "mean_prob_other": float(np.mean(prob[known & ~has])) if (known & ~has).any() else float("nan"),
            "frac_pos_planted": float(np.mean(frac[known & has])) if (known & has).any() else float("nan"),
            "frac_pos_other": float(np.mean(frac[known & ~has])) if (known & ~has).any() else float("nan"),
            "auc": _auc(prob[known], has[known]),
        })
    return pd.DataFrame(rows)
