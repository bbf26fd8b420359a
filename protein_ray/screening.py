"""Screen statistics over the per-well table: robust z-scores, Z′, edge effects, profiles.

What plate-based screening tools report (cellHTS, pycytominer), per plate because
plates differ from day to day:

- robust z of a well: ``(x - median_neg) / (1.4826 * MAD_neg)`` over the plate's
  negative control wells (1.4826 makes the MAD a standard deviation for normal
  data). Undefined (NaN) when the plate has no negative wells or their MAD is 0.
- Z′ of a class: ``1 - 3 (σp + σn) / |μp - μn|`` between positive and negative
  control wells (sample standard deviations); above 0.5 is an excellent assay,
  0 to 0.5 usable, below 0 the controls overlap. Robust Z′ uses median and
  1.4826·MAD instead, so one bad control well does not sink a plate.
- edge effect: mean of edge wells minus mean of inner wells of the same role
  (evaporation and temperature gradients make outer wells differ).
- profiles: the median embedding of a well's good fields, in pycytominer's wide
  layout (``Metadata_*`` columns, then one column per feature).

Every statistic uses a well's mean probability over its good fields (scored and
not QC-flagged), the ``mean_prob_<class>`` columns of ``plates.well_table``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from protein_ray.plate_map import targets_of
from protein_ray.plates import class_keys, is_edge_well, plate_format

MAD_TO_SD = 1.4826
PLATE_COLUMNS = ("plate", "class", "n_negative", "n_positive", "z_prime", "robust_z_prime",
                 "edge_role", "edge_mean", "inner_mean", "edge_effect")


def robust_sd(values: np.ndarray) -> float:
    return float(MAD_TO_SD * np.median(np.abs(values - np.median(values))))


def robust_z(values: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Robust z-scores of ``values`` against the ``negatives`` (NaN where undefined)."""
    negatives = negatives[~np.isnan(negatives)]
    spread = robust_sd(negatives) if len(negatives) else 0.0
    if spread == 0:
        return np.full(len(values), np.nan)
    return (values - np.median(negatives)) / spread


def z_prime(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Z′ factor (Zhang et al. 1999); NaN with fewer than two wells of a role."""
    positives, negatives = positives[~np.isnan(positives)], negatives[~np.isnan(negatives)]
    if len(positives) < 2 or len(negatives) < 2 or positives.mean() == negatives.mean():
        return float("nan")
    spread = positives.std(ddof=1) + negatives.std(ddof=1)
    return float(1 - 3 * spread / abs(positives.mean() - negatives.mean()))


def robust_z_prime(positives: np.ndarray, negatives: np.ndarray) -> float:
    positives, negatives = positives[~np.isnan(positives)], negatives[~np.isnan(negatives)]
    if len(positives) < 2 or len(negatives) < 2 or np.median(positives) == np.median(negatives):
        return float("nan")
    spread = robust_sd(positives) + robust_sd(negatives)
    return float(1 - 3 * spread / abs(np.median(positives) - np.median(negatives)))


def add_robust_z(wells: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """``robust_z_<class>`` columns, per plate against its negative wells (needs ``role``)."""
    wells = wells.copy()
    for key in class_keys(classes):
        wells[f"robust_z_{key}"] = np.nan
    if "role" not in wells:
        return wells
    for _, plate in wells.groupby("plate", sort=False):
        negative = plate["role"].eq("negative").to_numpy()
        for key in class_keys(classes):
            values = plate[f"mean_prob_{key}"].to_numpy(dtype=float)
            wells.loc[plate.index, f"robust_z_{key}"] = robust_z(values, values[negative])
    return wells


def plate_table(wells: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per plate and class: control counts, Z′, robust Z′ and the edge effect."""
    rows = []
    for plate, plate_wells in wells.groupby("plate", sort=True):
        shape = plate_format(plate_wells["well"])
        edge = np.array([is_edge_well(well, shape) for well in plate_wells["well"]])
        roles = plate_wells["role"] if "role" in plate_wells else pd.Series("sample", index=plate_wells.index)
        negative = roles.eq("negative").to_numpy()
        edge_role = "sample" if roles.eq("sample").any() else "negative"
        same_role = roles.eq(edge_role).to_numpy()
        for name, key in zip(classes, class_keys(classes)):
            values = plate_wells[f"mean_prob_{key}"].to_numpy(dtype=float)
            positive = positive_for(plate_wells, roles, name)
            edge_mean, inner_mean = nan_mean(values[same_role & edge]), nan_mean(values[same_role & ~edge])
            rows.append({
                "plate": plate, "class": name, "n_negative": int(negative.sum()), "n_positive": int(positive.sum()),
                "z_prime": z_prime(values[positive], values[negative]),
                "robust_z_prime": robust_z_prime(values[positive], values[negative]),
                "edge_role": edge_role, "edge_mean": edge_mean, "inner_mean": inner_mean,
                "edge_effect": edge_mean - inner_mean,
            })
    return pd.DataFrame(rows, columns=list(PLATE_COLUMNS))


def positive_for(wells: pd.DataFrame, roles: pd.Series, class_name: str) -> np.ndarray:
    """Positive control wells that stand for ``class_name``: those whose ``target``
    names it, or every positive well when the plate map gives no targets."""
    positive = roles.eq("positive").to_numpy()
    if "target" not in wells:
        return positive
    return positive & np.array([not targets_of(text) or class_name in targets_of(text) for text in wells["target"]])


def nan_mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def well_profiles(predictions: pd.DataFrame, good: np.ndarray, wells: pd.DataFrame) -> pd.DataFrame:
    """Median embedding of each well's good fields, pycytominer-style: ``Metadata_Plate``,
    ``Metadata_Well``, the plate map's columns as ``Metadata_<name>``, ``Metadata_Fields``,
    then ``emb_0000``... Wells without a good field are left out."""
    plated = predictions[good & predictions["plate"].notna().to_numpy() & predictions["well"].notna().to_numpy()]
    if plated.empty:
        return pd.DataFrame()
    embeddings = np.stack(plated["embedding"].to_numpy())
    features = pd.DataFrame(embeddings, columns=[f"emb_{i:04d}" for i in range(embeddings.shape[1])])
    features["plate"], features["well"] = plated["plate"].to_numpy(), plated["well"].to_numpy()
    grouped = features.groupby(["plate", "well"], sort=True)
    profiles = grouped.median().join(grouped.size().rename("fields")).reset_index()
    metadata = [c for c in wells.columns if not is_statistic(c)]
    profiles = profiles.merge(wells[metadata], on=["plate", "well"], how="left")
    names = {c: f"Metadata_{c.capitalize() if c in ('plate', 'well', 'fields') else c}"
             for c in [*metadata, "fields"]}
    ordered = [*names, *features.columns.drop(["plate", "well"])]
    return profiles[ordered].rename(columns=names)


def is_statistic(column: str) -> bool:
    """Columns of ``well_table`` and this module, as opposed to the plate map's own."""
    return column.startswith(("images_", "mean_prob_", "median_prob_", "frac_pos_", "robust_z_"))
