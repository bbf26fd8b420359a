"""Plate exports and image folders -> index rows, one per field image.

Layouts (``LAYOUTS``) describe how imagers name their files; ``--pattern`` takes
any other naming as a regular expression with named groups. Identity is by path:
a field's id carries its folder, a file that names no field is an image of its
own named by its relative path, two files for one slot are an error naming both,
and every file under the folder is accounted for (a row, or a skip and why).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pandas as pd

from protein_ray import shards, storage
from protein_ray.labels import parse_label_string
from protein_ray.plates import canonical_well
from protein_ray.sources import MISSING_STAIN, DataSourceError, InputOptions, read_csv

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
# <plate>_<well>_<field>[_<stain>].<ext>, e.g. P001_B07_f3.png or P001_B07_f3_green.tif
DEFAULT_PLATE_PATTERN = (
    r"(?P<plate>[A-Za-z0-9-]+)_(?P<well>[A-Pa-p]\d{1,2})_f?(?P<field>\d+)"
    r"(?:_(?P<stain>red|green|blue|yellow))?\.(?:png|tiff?|jpe?g)$"
)


@dataclass(frozen=True)
class FolderLayout:
    """How a plate export names its files: a regular expression with named groups
    ``plate``, ``well`` (or ``row`` + ``column``, 1-based numbers), ``field``,
    optionally ``plane``, and ``stain`` (a name) or ``channel`` (a number)."""

    name: str
    pattern: str
    plate_from_folder: bool = False  # the plate is the folder above the file's own (Harmony's Images/)


LAYOUTS = {
    "plate": FolderLayout("plate", DEFAULT_PLATE_PATTERN),
    # MetaXpress / ImageXpress: Plate1_B03_s2_w1.TIF (thumbnails ..._w1_thumb<hex>.tif are skipped)
    "imagexpress": FolderLayout(
        "imagexpress", r"^(?P<plate>.+)_(?P<well>[A-P]\d{1,2})_s(?P<field>\d+)_w(?P<channel>\d+)\.tiff?$"),
    # Opera Phenix / Operetta (Harmony): <plate>/Images/r02c03f04p01-ch2sk1fk1fl1.tiff
    "phenix": FolderLayout(
        "phenix", r"^r(?P<row>\d{1,2})c(?P<column>\d{1,2})f(?P<field>\d+)p(?P<plane>\d+)-ch(?P<channel>\d+)"
        r"sk\d+fk\d+fl\d+\.tiff?$", plate_from_folder=True),
}


THUMBNAIL = re.compile(r"_thumb[0-9a-f]*\.[a-z]+$", re.IGNORECASE)


def image_folder_index(folder: str, options: InputOptions = InputOptions()) -> tuple[pd.DataFrame, list[str]]:
    """Index a plate export (or any folder of images), recursively.

    Returns ``(index, skipped)``: one index row per field image, with ``sources``
    listing one merged file or the stain files in the model's stain order (a
    missing one as ``MISSING_STAIN``, reported when it is decoded); ``skipped``
    names each file that is no input image and why. Image files that the layout's
    pattern does not match are images of their own, named by their relative path.
    """
    files = storage.list_files(folder, recursive=True)
    layout = choose_layout(files, options)
    matcher = re.compile(layout.pattern, re.IGNORECASE)
    groups: dict[str, dict] = {}
    skipped = []
    for uri in files:
        relative = posixpath.relpath(uri, folder)
        reason = skip_reason(posixpath.basename(uri))
        if reason:
            skipped.append(f"{uri} ({reason})")
            continue
        match = matcher.search(posixpath.basename(uri))
        if match is None:
            add_file(groups, {"image_id": relative, "key": relative}, "merged", uri)
            continue
        stain = stain_of_match(match, options)
        if stain is None:
            skipped.append(f"{uri} (a stain or channel the model does not take)")
            continue
        add_file(groups, field_of_match(match, relative, layout), stain, uri)
    if not groups:
        raise DataSourceError(f"{folder}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)}, "
                              f"any case); skipped: {skipped[:5]}")
    rows = [index_row(group, options.stains) for group in groups.values()]
    return pd.DataFrame(rows).sort_values("image_id", ignore_index=True), skipped


def choose_layout(files: list[str], options: InputOptions) -> FolderLayout:
    if options.pattern:
        return FolderLayout("custom", options.pattern)
    if options.layout in LAYOUTS:
        return LAYOUTS[options.layout]
    if options.layout not in ("auto", "kaggle"):
        raise DataSourceError(f"--layout {options.layout!r}: expected auto, kaggle, {', '.join(LAYOUTS)}")
    names = [posixpath.basename(uri) for uri in files]
    matches = {name: sum(1 for n in names if re.search(layout.pattern, n, re.IGNORECASE))
               for name, layout in LAYOUTS.items()}
    best = max(matches, key=matches.get)
    return LAYOUTS[best if matches[best] else "plate"]


def skip_reason(name: str) -> str | None:
    """Why a file under a folder is not an input image, or None if it is one."""
    lower = name.lower()
    if name.startswith(".") or name in (shards.MANIFEST, storage.INCOMPLETE_MARKER):
        return "hidden or bookkeeping file"
    if not lower.endswith(IMAGE_SUFFIXES):
        return "not an image by name"
    if THUMBNAIL.search(name):
        return "thumbnail"
    return None


def stain_of_match(match: re.Match, options: InputOptions) -> str | None:
    """The model stain a matched file holds; "merged" for a file with all stains;
    None for a stain or channel the model does not take."""
    groups = match.groupdict()
    if groups.get("stain"):
        name = groups["stain"].lower()
        return name if name in options.stains else None
    if groups.get("channel"):
        return options.stain_of_channel(int(groups["channel"]))
    return "merged"


def field_of_match(match: re.Match, relative: str, layout: FolderLayout) -> dict:
    """Plate, well, field (and plane) of a matched file, and the key and id of its image."""
    groups = match.groupdict()
    folder = posixpath.dirname(relative)
    plate = posixpath.basename(posixpath.dirname(folder)) if layout.plate_from_folder else groups.get("plate")
    if groups.get("well"):
        well = f"{groups['well'][0].upper()}{int(groups['well'][1:]):02d}"
    else:
        well = f"{chr(ord('A') + int(groups['row']) - 1)}{int(groups['column']):02d}"
    field_number = int(groups["field"])
    name = f"{plate}_{well}_f{field_number}" + (f"_p{int(groups['plane'])}" if groups.get("plane") else "")
    image_id = posixpath.join(folder, name) if folder else name
    return {"image_id": image_id, "key": image_id, "plate": plate or None, "well": well, "field": field_number}


def add_file(groups: dict[str, dict], image: dict, stain: str, uri: str) -> None:
    """File ``uri`` holds ``stain`` of ``image``; two files for one slot are an error naming both."""
    slots = groups.setdefault(image["key"], {**image, "stains": {}})["stains"]
    # A merged file holds every stain: it clashes with any other file of the image.
    taken = next(iter(slots.values()), None) if stain == "merged" else slots.get(stain) or slots.get("merged")
    if taken is not None:
        raise DataSourceError(f"{taken} and {uri} both hold {stain if stain != 'merged' else 'the image'} of "
                              f"{image['image_id']}: rename or remove one, or pass a --pattern that tells them apart")
    slots[stain] = uri


def index_row(group: dict, stains: tuple[str, ...]) -> dict:
    found = group.pop("stains")
    group.pop("key")
    sources = [found["merged"]] if "merged" in found else [found.get(s, MISSING_STAIN.format(s)) for s in stains]
    return {"plate": None, "well": None, "field": None, **group, "labels": None, "sources": sources}


def attach_labels(rows: pd.DataFrame, csv_uri: str, num_classes: int) -> pd.DataFrame:
    """Labels for plate images from a CSV with columns plate, well, labels (per well)
    or plate, well, field, labels (per field). Images without a row stay unlabelled."""
    table = read_csv(csv_uri, ("plate", "well", "labels"))
    keys = ["plate", "well", "field"] if "field" in table.columns else ["plate", "well"]
    wells = [canonical_well(well) for well in table["well"]]
    if None in wells:
        line = wells.index(None)
        raise DataSourceError(f"{csv_uri}: line {line + 2}: {table['well'][line]!r} is not a well name like B07")
    table["well"] = wells
    if "field" in keys:
        table["field"] = table["field"].astype(int)
    if table.duplicated(keys).any():
        raise DataSourceError(f"{csv_uri}: more than one row for {table.loc[table.duplicated(keys), keys].iloc[0].tolist()}")
    table["labels"] = [parse_label_string(text, row=f"{csv_uri} line {i + 2}", num_classes=num_classes)
                       for i, text in enumerate(table["labels"])]
    merged = rows.drop(columns=["labels"]).merge(table[[*keys, "labels"]], on=keys, how="left")
    merged["labels"] = [labels if isinstance(labels, list) else None for labels in merged["labels"]]
    return merged

