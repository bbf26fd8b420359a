"""Per-field image quality: cheap measures in the decode stage, flags against each plate.

A screen images thousands of fields; a few are out of focus, over-exposed or show no
cells, and their predictions should not count like the others. ``field_measures``
runs on every decoded field (float32 (H, W, C) on 0..1, full resolution, before the
model's resize) and ``flag_fields`` compares each field with the other fields of
its plate, which share optics, exposure and staining, so no absolute threshold has
to fit every microscope.

The measures (one row per field, columns from ``measure_names``):

* ``qc_focus`` -- log10 of the Laplacian energy of the signal over the square of the
  5-95 percentile range, on a grey (mean of the stains) image block-averaged to
  ~128 px a side. Defocus removes fine detail first, so the Laplacian falls against
  the field's contrast; the range (not the variance) makes it independent of
  brightness and gain and of how much of the field a bright flat object covers (a
  saturated particle raised the variance enough to pose as blur); the log spreads a
  plate's values evenly. Sensor noise survives defocus and would pose as detail: at
  full resolution it dominated the Laplacian of synthetic fields and hid a 3.5 px
  blur entirely. Two things remove it: the block average (noise falls with the
  block size, cells do not) and subtracting the noise's own Laplacian energy
  (20 sigma**2 for white noise, sigma from the MAD of neighbour differences). At
  ~128 px a blur of several pixels at 512 (organelle scale: what changes the model's
  answer) still spans a pixel, and the block sums cost one pass over the field.
* ``qc_foreground`` -- the fraction of the same grey image clearly above background:
  brighter than its 10th percentile by 6 noise sigmas and by half the background
  level (a margin for uneven illumination). No absolute level enters, so 12-bit
  data read as 16-bit gives the same fraction as when scaled to its range. The 10th
  percentile is background unless cells fill 90% of the field; the fraction is then
  an underestimate, still far from the ~0 of an empty field.
* ``qc_saturated_<stain>`` -- per stain, the exact fraction of full-resolution
  pixels at full scale (>= 1 - 1e-6 after scaling): clipped pixels lose the
  intensity the model reads, and one stain can clip while the others are fine.

Flags (``FLAGS``), each against the field's plate (median and 1.4826 * MAD of its fields):

* ``blurred``: focus more than ``mad_k`` robust SDs below the plate median.
* ``empty``: foreground (log scale) more than ``mad_k`` robust SDs below the median,
  with the bound clipped to [0.1%, 1%] of the field: below 0.1% a field is empty
  whatever its plate (a plate of empty wells is still empty), above 1% it holds
  cells, however sparse next to its plate. An empty field is never also
  ``blurred``: with no cells there is no structure, so its focus measures noise and
  says nothing about the optics (refocusing would not help).
* ``saturated``: a stain's fraction above its plate median + ``mad_k`` robust SDs and
  above 5% of the field. Most fields clip nothing, so the MAD is ~0 and the floor
  decides; it is high because clipping in a small part of a field is common and
  harmless to the pattern (synthetic plates clip bright nuclei and dots in a
  quarter of their fields, at 0.5-12% of a stain), while a particle or an
  over-exposed stain clips far more. Pass ``max_saturated`` for a stricter screen.

The spreads have floors (a plate of near-identical fields must not flag tiny
differences), and a plate with fewer than ``MIN_FIELDS`` measured fields does not
estimate them: a fixed spread, about what a synthetic 96-well plate shows, replaces
the MAD around that plate's median.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from protein_ray.plates import snake_case

FLAGS = ("blurred", "saturated", "empty")
FULL_SCALE = np.float32(1.0 - 1e-6)  # a pixel at or above this is clipped
WORK_SIDE = 128  # focus and foreground work on a grey image block-averaged to about this side
BACKGROUND_PERCENTILE = 10
RANGE_PERCENTILES = (5, 95)  # focus divides by the square of this range of the grey image
FOREGROUND_NOISE_SIGMAS = 6.0  # Gaussian noise passes 6 sigmas in ~1e-9 of pixels
FOREGROUND_BACKGROUND_MARGIN = 0.5  # and 50% above the background level
NOISE_LAPLACIAN_GAIN = 20.0  # var(4-neighbour Laplacian) of white noise of variance 1
MIN_FIELDS = 8  # fewer measured fields in a plate: fixed spreads instead of the MAD
ROBUST_SD = 1.4826  # MAD -> SD for Gaussian data
FOREGROUND_LOG_OFFSET = 1e-3  # log10(foreground + this): 0 stays finite
EMPTY_BOUNDS = (0.001, 0.01)  # the plate-derived "empty" bound is clipped into this range
SATURATED_FLOOR = 0.05  # a stain must clip in more than this fraction of the field
# Smallest spread the plate rule uses, and the fixed spread of small plates (focus and
# foreground in log10 units; synthetic 96-well plates show 0.2-0.25 for both).
MIN_SPREAD = {"focus": 0.05, "foreground": 0.05, "saturated": 0.0}
FALLBACK_SPREAD = {"focus": 0.25, "foreground": 0.2, "saturated": 0.01}


# ----------------------------------------------------------------------------- measures
def measure_names(stain_names: Sequence[str]) -> list[str]:
    """Column names, in the order ``field_measures`` returns them."""
    return ["qc_focus", "qc_foreground"] + [f"qc_saturated_{snake_case(name)}" for name in stain_names]


def field_measures(image: np.ndarray) -> np.ndarray:
    """float32 (H, W, C) on 0..1 -> float32 [focus, foreground, saturated_0, ..., saturated_{C-1}]."""
    if image.ndim != 3 or min(image.shape) == 0:
        raise ValueError(f"expected a non-empty (H, W, C) image, got shape {image.shape}")
    grey = _grey(image)
    noise = _noise_sigma(grey)
    low, background, high = _order_statistics(grey, (RANGE_PERCENTILES[0], BACKGROUND_PERCENTILE, RANGE_PERCENTILES[1]))
    focus = _focus(grey, noise, high - low)
    return np.array([focus, _foreground(grey, noise, background), *_saturated(image)], np.float32)


def _order_statistics(values: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    """The values at these percentiles by rank (one partial sort: cheaper than ``np.percentile``)."""
    flat = values.reshape(-1)
    ranks = [min(len(flat) - 1, int(p / 100 * len(flat))) for p in percentiles]
    ordered = np.partition(flat, ranks)
    return [float(ordered[rank]) for rank in ranks]


def _saturated(image: np.ndarray) -> list[float]:
    height, width, channels = image.shape
    # Most fields clip nothing: one max (a fast contiguous reduction) settles those.
    if image.max() < FULL_SCALE:
        return [0.0] * channels
    # Flat indices of clipped pixels modulo C are their stains: one contiguous pass, no per-stain strides.
    clipped = np.flatnonzero(image.reshape(-1) >= FULL_SCALE) % channels
    return (np.bincount(clipped, minlength=channels) / (height * width)).tolist()


def _grey(image: np.ndarray) -> np.ndarray:
    """Mean of the stains over f x f blocks (f = side // WORK_SIDE): one pass over the pixels."""
    height, width, channels = image.shape
    f = max(1, min(height, width) // WORK_SIDE)
    h, w = height // f, width // f
    # Sum the f rows of each block, then the f columns and the stains, which lie together in
    # memory; a product with a ones vector sums those short runs several times faster than .sum(-1).
    rows = image[:h * f, :w * f].reshape(h, f, w * f * channels).sum(1, dtype=np.float32)
    return rows.reshape(h, w, f * channels) @ np.full(f * channels, 1 / (f * f * channels), np.float32)


def _noise_sigma(grey: np.ndarray) -> float:
    """Pixel noise from the MAD of horizontal neighbour differences (mostly flat, so mostly noise)."""
    if grey.shape[1] < 2:
        return 0.0
    # Differences are symmetric about 0, so their median absolute value is their MAD (one median, not two).
    (mad,) = _order_statistics(np.abs(np.diff(grey, axis=1)), (50,))
    return float(ROBUST_SD * mad / np.sqrt(2))  # a difference of two pixels has twice their variance


def _laplacian(grey: np.ndarray) -> np.ndarray:
    return 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]


def _focus(grey: np.ndarray, noise: float, spread: float) -> float:
    """log10(Laplacian energy of the signal / spread**2); ``spread``: the grey image's 5-95 percentile range."""
    if min(grey.shape) < 3:
        return float("nan")
    energy = float(_laplacian(grey).var())
    # Keep a sliver of the energy when noise explains all of it: the log stays finite and low.
    signal = max(energy - NOISE_LAPLACIAN_GAIN * noise**2, 1e-3 * energy)
    return float(np.log10((signal + 1e-12) / (spread**2 + 1e-12)))


def _foreground(grey: np.ndarray, noise: float, background: float) -> float:
    margin = max(FOREGROUND_NOISE_SIGMAS * noise, FOREGROUND_BACKGROUND_MARGIN * background)
    return float(np.count_nonzero(grey > background + margin) / grey.size)


# ----------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class QcThresholds:
    mad_k: float = 3.0  # a field is an outlier beyond this many robust SDs (1.4826*MAD) of its plate
    min_focus: float | None = None  # absolute thresholds replace the plate-derived ones when given
    max_saturated: float | None = None
    min_foreground: float | None = None


def flag_fields(measures: pd.DataFrame, thresholds: QcThresholds = QcThresholds()) -> pd.Series:
    """"" for a good field, else ";"-joined flags from ``FLAGS``, aligned to ``measures``.

    ``measures`` has a ``plate`` column (None/NaN rows form one group) and the measure
    columns; rows with NaN measures (failed decodes) get no flag.
    """
    saturated_columns = [c for c in measures.columns if c.startswith("qc_saturated_")]
    missing = {"qc_focus", "qc_foreground"} - set(measures.columns)
    if missing:
        raise KeyError(f"flag_fields needs the columns {sorted(missing)}")
    table = measures.reset_index(drop=True)  # positions, whatever the caller's index
    measured = table[["qc_focus", "qc_foreground", *saturated_columns]].notna().all(axis=1)
    plates = table["plate"] if "plate" in table.columns else pd.Series(None, index=table.index, dtype=object)
    flags = np.full(len(table), "", dtype=object)
    for rows in table[measured].groupby(plates[measured], dropna=False, sort=False).indices.values():
        positions = np.flatnonzero(measured)[rows]
        flags[positions] = _plate_flags(table.iloc[positions], saturated_columns, thresholds)
    return pd.Series(flags, index=measures.index, dtype=object)


def _plate_flags(rows: pd.DataFrame, saturated_columns: list[str], thresholds: QcThresholds) -> list[str]:
    """Flags for the measured fields of one plate, each measure against this plate's bounds."""
    k, few = thresholds.mad_k, len(rows) < MIN_FIELDS
    focus = rows["qc_focus"].to_numpy(float)
    foreground = rows["qc_foreground"].to_numpy(float)
    focus_bound = thresholds.min_focus
    if focus_bound is None:
        focus_bound = _low_bound(focus, "focus", k, few)
    empty_bound = thresholds.min_foreground
    if empty_bound is None:
        log_bound = _low_bound(np.log10(foreground + FOREGROUND_LOG_OFFSET), "foreground", k, few)
        empty_bound = float(np.clip(10**log_bound - FOREGROUND_LOG_OFFSET, *EMPTY_BOUNDS))
    empty = foreground < empty_bound
    blurred = (focus < focus_bound) & ~empty  # no cells: the focus value measures noise only
    saturated = np.zeros(len(rows), bool)
    for column in saturated_columns:
        fraction = rows[column].to_numpy(float)
        bound = thresholds.max_saturated
        if bound is None:
            bound = max(_high_bound(fraction, "saturated", k, few), SATURATED_FLOOR)
        saturated |= fraction > bound
    found = {"blurred": blurred, "saturated": saturated, "empty": empty}
    return [";".join(flag for flag in FLAGS if found[flag][i]) for i in range(len(rows))]


def _spread(values: np.ndarray, measure: str, few: bool) -> float:
    """The plate's robust SD, never below the measure's floor; a fixed one for small plates."""
    if few:
        return FALLBACK_SPREAD[measure]
    mad = float(np.median(np.abs(values - np.median(values))))
    return max(ROBUST_SD * mad, MIN_SPREAD[measure])


def _low_bound(values: np.ndarray, measure: str, k: float, few: bool) -> float:
    return float(np.median(values)) - k * _spread(values, measure, few)


def _high_bound(values: np.ndarray, measure: str, k: float, few: bool) -> float:
    return float(np.median(values)) + k * _spread(values, measure, few)
