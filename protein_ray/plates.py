"""Plates and wells: per-well aggregation of predictions and plate heatmaps.

The bulk scoring job (``protein_ray.scoring``) writes one prediction row per field
image; a screen is read per well. This module turns prediction rows into the
per-well table of DESIGN.md section 2 (plate, well, images scored and failed,
mean probability and fraction of positive fields per class) and draws one plate
heatmap per class, laid out like the physical plate (8x12 or 16x24 wells).
Column names follow the model's classes (``prob_<class>``, ``mean_prob_<class>``...).
"""

from __future__ import annotations

import functools
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
NO_DATA_RGB = (204, 204, 204)  # wells without a scored field, in the PNGs and the report
HEATMAP_CELL_PX = (28, 18)  # per well: 96-well plates, 384-well plates (about as wide)
HEATMAP_FONT_PX = 11
PANEL_GRID_TOP = 3 * HEATMAP_FONT_PX  # a panel's title and column numbers sit above its wells


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


@functools.cache
def viridis_rgb() -> np.ndarray:
    """matplotlib's 256 viridis colours as (256, 3) uint8, looked up once (the table only: no plotting)."""
    import matplotlib

    return np.round(matplotlib.colormaps["viridis"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def viridis_index(values) -> np.ndarray:
    """Entries of ``viridis_rgb`` for ``values`` on 0..1, clipped and binned as matplotlib does (NaN -> 0)."""
    return np.clip(np.nan_to_num(np.asarray(values, dtype=float)) * 256, 0, 255).astype(int)


def well_mosaic(grid: np.ndarray, cell: int) -> np.ndarray:
    """(rows * cell, columns * cell, 3) uint8: each well a square of its viridis colour
    (``NO_DATA_RGB`` where NaN) with a 1-px white gap to its neighbours."""
    colours = viridis_rgb()[viridis_index(grid)]
    colours[np.isnan(grid)] = NO_DATA_RGB
    mosaic = colours.repeat(cell, axis=0).repeat(cell, axis=1)
    mosaic[cell - 1::cell] = 255
    mosaic[:, cell - 1::cell] = 255
    return mosaic


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size)


@functools.cache
def _grid_labels(rows: int, columns: int, cell: int):
    """A plate panel's white frame with its row letters and column numbers, drawn once per
    plate format (cached: paste it, do not draw on it); a screen's heatmaps would
    otherwise draw the same 40 labels on every panel."""
    from PIL import Image, ImageDraw

    font, left, top = _font(HEATMAP_FONT_PX), 2 * HEATMAP_FONT_PX, PANEL_GRID_TOP
    frame = Image.new("RGB", (left + columns * cell, top + rows * cell + 4), "white")
    draw = ImageDraw.Draw(frame)
    for column in range(columns):
        draw.text((left + column * cell + cell // 2, top - 2), str(column + 1), fill="black", font=font, anchor="md")
    for row in range(rows):
        draw.text((left - 4, top + row * cell + cell // 2), chr(ord("A") + row), fill="black", font=font, anchor="rm")
    return frame


def plate_panel(grid: np.ndarray, title: str, cell: int):
    """A PIL image of one plate's grid as the physical plate: row A at the top, column 1
    on the left, labelled, under ``title``."""
    from PIL import Image, ImageDraw

    title_font, left = _font(HEATMAP_FONT_PX + 1), 2 * HEATMAP_FONT_PX
    labels = _grid_labels(*grid.shape, cell)
    panel = Image.new("RGB", (max(labels.width, int(title_font.getlength(title)) + left) + 4, labels.height), "white")
    panel.paste(labels, (0, 0))
    panel.paste(Image.fromarray(well_mosaic(grid, cell)), (left, PANEL_GRID_TOP))
    ImageDraw.Draw(panel).text((left, 2), title, fill="black", font=title_font)
    return panel


@functools.cache
def colour_bar(height: int):
    """The 0..1 viridis scale (1 at the top) with ticks, and the grey of wells with no scored
    field (cached, as every picture of a plate format has the same: paste it, do not draw on it)."""
    from PIL import Image, ImageDraw

    font, bar_width, pad = _font(HEATMAP_FONT_PX), 14, HEATMAP_FONT_PX // 2  # pad: room for the top tick's label
    bar_height = height - 2 * HEATMAP_FONT_PX - pad
    bar = Image.new("RGB", (bar_width + 4 * HEATMAP_FONT_PX, height), "white")
    ramp = viridis_rgb()[viridis_index(np.linspace(1, 0, bar_height))]
    bar.paste(Image.fromarray(np.repeat(ramp[:, None], bar_width, axis=1)), (0, pad))
    draw = ImageDraw.Draw(bar)
    for tick in (0.0, 0.5, 1.0):
        draw.text((bar_width + 4, pad + round((1 - tick) * (bar_height - 1))), f"{tick:g}", fill="black", font=font,
                  anchor="lm")
    draw.rectangle((0, height - HEATMAP_FONT_PX, bar_width - 1, height - 1), fill=NO_DATA_RGB)
    draw.text((bar_width + 4, height - HEATMAP_FONT_PX // 2), "none", fill="black", font=font, anchor="lm")
    return bar


def _beside_colour_bar(picture, top: int, height: int):
    from PIL import Image

    bar = colour_bar(height)
    out = Image.new("RGB", (picture.width + bar.width + 12, max(picture.height, top + height + 4)), "white")
    out.paste(picture, (0, 0))
    out.paste(bar, (picture.width + 12, top))
    return out


def overview_picture(panels: list, title: str, grid_height: int):
    """The plate's class panels, five to a row, under ``title``, with one colour bar."""
    from PIL import Image, ImageDraw

    columns = min(5, len(panels))
    tile_width, tile_height = max(p.width for p in panels) + 8, max(p.height for p in panels) + 8
    heading = 2 * HEATMAP_FONT_PX
    sheet = Image.new("RGB", (columns * tile_width, heading + -(-len(panels) // columns) * tile_height), "white")
    for position, panel in enumerate(panels):
        sheet.paste(panel, ((position % columns) * tile_width, heading + (position // columns) * tile_height))
    ImageDraw.Draw(sheet).text((4, 4), title, fill="black", font=_font(HEATMAP_FONT_PX + 2))
    return _beside_colour_bar(sheet, heading + PANEL_GRID_TOP, grid_height)


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    # zlib's fastest level: a screen's heatmaps are hundreds of pictures of flat colour.
    # Measured on 2026-12-05 (88 pictures of 8 plates): 1.6 -> 1.0 s, 0.82 -> 1.03 MB.
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_heatmaps(wells: pd.DataFrame, folder: str, classes: Sequence[str]) -> list[str]:
    """``folder/<plate>/<class>.png`` per plate and class (fraction of positive
    fields per well) plus ``folder/<plate>/all_classes.png``; returns the URIs.
    Grey wells had no scored field. Drawn with Pillow, a few milliseconds a picture
    (matplotlib took ~2 s per plate of 10 classes, on top of its import)."""
    if wells.empty:
        return []
    written = []
    for plate, plate_wells in wells.groupby("plate", sort=True):
        shape = plate_format(plate_wells["well"])
        cell = HEATMAP_CELL_PX[shape[0] > 8]
        grid_height = shape[0] * cell
        plate_folder = storage.join(folder, re.sub(r"[^A-Za-z0-9._-]+", "_", str(plate)) or "plate")
        panels = []
        for key, name in zip(class_keys(classes), classes):
            grid = plate_grid(plate_wells, f"frac_pos_{key}", shape)
            single = plate_panel(grid, f"{plate}: {name} (fraction of positive fields)", cell)
            uri = storage.join(plate_folder, f"{key}.png")
            storage.write_bytes(uri, _png(_beside_colour_bar(single, PANEL_GRID_TOP, grid_height)))
            written.append(uri)
            panels.append(plate_panel(grid, name, cell))
        overview = overview_picture(panels, f"plate {plate}: fraction of positive fields per well", grid_height)
        uri = storage.join(plate_folder, "all_classes.png")
        storage.write_bytes(uri, _png(overview))
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
