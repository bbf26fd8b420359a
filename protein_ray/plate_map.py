"""Plate maps: which wells are controls and which are samples.

A plate map is a CSV with one row per well: ``plate, well, role`` and any free
columns (compound, concentration, gene, target...), which are carried into the
per-well table. Roles are those of a screen's layout:

- ``negative``: the baseline (e.g. DMSO); robust z-scores are measured against these;
- ``positive``: a known phenotype; with ``target`` naming its class(es) (``;``
  separated), a positive well counts for Z′ of those classes only;
- ``sample``: what is screened;
- ``empty``: no cells on purpose (kept out of the statistics).
"""

from __future__ import annotations

import logging

import pandas as pd

from protein_ray.plates import canonical_well
from protein_ray.sources import DataSourceError, read_csv

logger = logging.getLogger(__name__)

ROLES = ("negative", "positive", "sample", "empty")
KEYS = ("plate", "well")


def read_plate_map(uri: str, classes: list[str] | None = None) -> pd.DataFrame:
    """The plate map at ``uri`` (local or s3://), checked: known roles, real well
    names (``B7`` is ``B07``), one row per well, targets among ``classes``."""
    table = read_csv(uri, (*KEYS, "role"))
    table["role"] = table["role"].str.strip().str.lower()
    wells = [canonical_well(well) for well in table["well"]]
    bad = [(i + 2, text) for i, (text, well) in enumerate(zip(table["well"], wells)) if well is None]
    if bad:
        raise DataSourceError(f"{uri}: line {bad[0][0]}: {bad[0][1]!r} is not a well name like B07 "
                              f"({len(bad)} such line(s))")
    table["well"] = wells
    unknown = table.index[~table["role"].isin(ROLES)]
    if len(unknown):
        line = unknown[0]
        raise DataSourceError(f"{uri}: line {line + 2}: role {table.at[line, 'role']!r} is not one of "
                              f"{', '.join(ROLES)} ({len(unknown)} such line(s))")
    repeated = table.duplicated(list(KEYS), keep=False)
    if repeated.any():
        first = table.loc[repeated, list(KEYS)].iloc[0].tolist()
        raise DataSourceError(f"{uri}: {int(repeated.sum())} lines name the same well more than once, e.g. {first}")
    if "target" in table and classes is not None:
        check_targets(uri, table["target"], classes)
    return table


def check_targets(uri: str, targets: pd.Series, classes: list[str]) -> None:
    named = {name.strip() for text in targets for name in str(text).split(";") if name.strip()}
    unknown = sorted(named - set(classes))
    if unknown:
        raise DataSourceError(f"{uri}: target(s) {unknown} are not classes of this model: {', '.join(classes)}")


def targets_of(text) -> set[str]:
    """The classes a positive well stands for (empty: every class)."""
    return {name.strip() for name in str(text or "").split(";") if name.strip()}


def attach_plate_map(wells: pd.DataFrame, plate_map: pd.DataFrame | None) -> pd.DataFrame:
    """The per-well table with the plate map's columns after plate and well. Wells
    the map does not name get no role (and a warning: a mistyped plate name is a
    common cause); map rows with no scored well are left out."""
    if plate_map is None:
        return wells
    merged = wells.merge(plate_map, on=list(KEYS), how="left")
    unmapped = merged["role"].isna()
    if unmapped.any():
        plates = sorted(map(str, merged.loc[unmapped, "plate"].unique()))
        logger.warning("plate map: %d well(s) of plate(s) %s are not in it; they have no role",
                       int(unmapped.sum()), ", ".join(plates[:5]))
    extra = [column for column in plate_map.columns if column not in KEYS]
    return merged[[*KEYS, *extra, *[c for c in wells.columns if c not in KEYS]]]
