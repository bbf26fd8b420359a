"""Synthetic plates written the way high-content imagers export them (4 stains, 12-bit, LZW TIFF).

Two vendors' folder forms, for tests and examples of reading real plates:

* ImageXpress / MetaXpress: ``<out>/<plate>/<plate>_<well>_s<site>_w<N>.TIF`` with an 8-bit
  thumbnail ``..._w<N>_thumb<8 hex>.tif`` beside each image and a ``<plate>.HTD`` plate file.
* Opera Phenix / Operetta (Harmony): ``<out>/<plate>/Images/r<RR>c<CC>f<FF>p01-ch<N>sk1fk1fl1.tiff``
  with an ``Index.idx.xml`` that names the plate and the channels.

Channel numbers are the same in both: 1 = nucleus (DAPI, blue), 2 = protein of interest
(green), 3 = microtubules (red), 4 = endoplasmic reticulum (yellow). Pixels are 12-bit camera
counts (offset ~100, at most 4095) in uint16. ``plate_map.csv`` gives each well's label set
(all its fields show it) and ``ground_truth.csv`` each field's. Field (plate, well, site) draws
from ``SeedSequence([seed, EXPORT, plate, row, column, site])``: the same seed gives the same
plate in both forms, whatever the other wells, the worker count or the order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import tifffile

from protein_ray.labels import format_label_string
from protein_ray.synthetic import (
    EXPORT,
    EXPORT_LABELS,
    GENERATOR_VERSION,
    _generate,
    _Job,
    _write_csv,
    sample_label_sets,
    well_names,
)
from protein_ray.synthetic_cells import render_stains

# Vendor channel number -> (index in render_stains' output, stain, what it shows, dye).
CHANNELS = {
    1: (2, "blue", "nucleus", "DAPI"),
    2: (1, "green", "protein of interest", "Alexa 488"),
    3: (0, "red", "microtubules", "Alexa 568"),
    4: (3, "yellow", "endoplasmic reticulum", "Alexa 647"),
}
CAMERA_OFFSET = 100  # counts a dark pixel reads (sCMOS/CCD bias)
FULL_SCALE = 4095  # 12-bit data
THUMB_FACTOR = 4  # thumbnails are 1/4 of the side


# ----------------------------------------------------------------------------- pixels
def camera_counts(image: np.ndarray) -> np.ndarray:
    """0..1 render -> 12-bit camera counts (uint16): offset plus signal, clipped at 4095."""
    counts = np.rint(CAMERA_OFFSET + image * (FULL_SCALE - CAMERA_OFFSET))
    return np.clip(counts, 0, FULL_SCALE).astype(np.uint16)


def _thumbnail(counts: np.ndarray) -> np.ndarray:
    """A block-averaged 8-bit preview, stretched between the 0.1 and 99.9 percentiles."""
    side = counts.shape[0] // THUMB_FACTOR * THUMB_FACTOR
    blocks = counts[:side, :side].reshape(side // THUMB_FACTOR, THUMB_FACTOR, -1, THUMB_FACTOR).mean((1, 3))
    low, high = np.percentile(blocks, [0.1, 99.9])
    return np.rint(np.clip((blocks - low) / max(high - low, 1), 0, 1) * 255).astype(np.uint8)


def _channel_planes(job: _Job, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Render the field once; the 12-bit plane of every channel the job keeps."""
    counts = camera_counts(render_stains(job.labels, job.size, rng))
    return {n: np.ascontiguousarray(counts[..., index]) for n, (index, *_) in CHANNELS.items()
            if n not in job.drop}


def _write_tiff(path: str, plane: np.ndarray, **tags) -> None:
    tifffile.imwrite(path, plane, compression="lzw", photometric="minisblack", metadata=None, **tags)


def _write_imagexpress_field(job: _Job, rng: np.random.Generator) -> None:
    """``..._w<N>.TIF`` per channel (MetaMorph-style description) plus its ``_thumb<hex>.tif``."""
    for n, plane in _channel_planes(job, rng).items():
        path = job.stem.format(channel=n)
        description = (f'<MetaData><prop id="_IllumSetting_" type="string" value="{CHANNELS[n][3]}"/>'
                       f'<prop id="camera-bit-depth" type="int" value="12"/></MetaData>')
        _write_tiff(path, plane, description=description)
        guid = hashlib.sha256(f"{job.entropy}{n}".encode()).hexdigest()[:8].upper()  # real ones: a GUID
        thumb = f"{path.removesuffix('.TIF')}_thumb{guid}.tif"
        tifffile.imwrite(thumb, _thumbnail(plane), photometric="minisblack", metadata=None)


def _write_phenix_field(job: _Job, rng: np.random.Generator) -> None:
    """``...-ch<N>sk1fk1fl1.tiff`` per channel."""
    for n, plane in _channel_planes(job, rng).items():
        _write_tiff(job.stem.format(channel=n), plane)


# ----------------------------------------------------------------------------- plate files
def _row_column(well: str) -> tuple[int, int]:
    """``B03`` -> (2, 3), 1-based."""
    return ord(well[0]) - ord("A") + 1, int(well[1:])


def _plate_wells(wells: int | Sequence[str]) -> tuple[int, list[str]]:
    """The plate format (96 or 384) and the wells imaged (all of them, or the ones listed)."""
    if isinstance(wells, int):
        return wells, well_names(wells)
    names, known = list(wells), well_names(384)
    unknown = [well for well in names if well not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"wells must be 96, 384 or distinct well names A01..P24, not {wells!r}")
    return (96 if set(names) <= set(well_names(96)) else 384), names


def _write_htd(folder: Path, plate: str, plate_format: int, wells: list[str], fields: int) -> None:
    """``<plate>.HTD``, MetaXpress's plate file: plate shape, wells and sites imaged, wavelength names."""
    rows, columns = (8, 12) if plate_format == 96 else (16, 24)
    x_sites = int(np.ceil(np.sqrt(fields)))
    y_sites = -(-fields // x_sites)
    flag = {True: "TRUE", False: "FALSE"}.get
    lines = ['"HTSInfoFile", Version 1.0', f'"Description", "protein-ray synthetic plate {plate}"',
             '"TimePoints", 1', '"ZSeries", FALSE', f'"XWells", {columns}', f'"YWells", {rows}']
    for r in range(rows):
        selected = [flag(f"{chr(ord('A') + r)}{c + 1:02d}" in wells) for c in range(columns)]
        lines.append(f'"WellsSelection{r + 1}", ' + ", ".join(selected))
    lines += ['"Sites", TRUE', f'"XSites", {x_sites}', f'"YSites", {y_sites}']
    for r in range(y_sites):
        lines.append(f'"SiteSelection{r + 1}", ' + ", ".join(flag(r * x_sites + c < fields) for c in range(x_sites)))
    lines += ['"Waves", TRUE', f'"NWavelengths", {len(CHANNELS)}']
    for n, (_, stain, shows, dye) in CHANNELS.items():
        lines += [f'"WaveName{n}", "{dye}"', f'"WaveCollect{n}", 1', f'"WaveDescription{n}", "{shows} ({stain})"']
    lines += [f'"UniquePlateIdentifier", "{plate}"', '"EndFile"']
    (folder / f"{plate}.HTD").write_text("\r\n".join(lines) + "\r\n", encoding="ascii")


def _write_index_xml(folder: Path, plate: str, plate_format: int, wells: list[str], fields: int) -> None:
    """A small Harmony-like ``Index.idx.xml``: the plate, its wells, the channels and every image."""
    root = ElementTree.Element("EvaluationInputData", Version="2")
    ElementTree.SubElement(root, "InstrumentType").text = "Phenix"
    xml_plate = ElementTree.SubElement(ElementTree.SubElement(root, "Plates"), "Plate")
    rows, columns = (8, 12) if plate_format == 96 else (16, 24)
    for tag, text in (("PlateID", plate), ("Name", plate), ("PlateTypeName", f"{plate_format}well"),
                      ("PlateRows", rows), ("PlateColumns", columns)):
        ElementTree.SubElement(xml_plate, tag).text = str(text)
    channels = ElementTree.SubElement(ElementTree.SubElement(root, "Maps"), "Map")
    for n, (_, stain, shows, dye) in CHANNELS.items():
        entry = ElementTree.SubElement(channels, "Entry", ChannelID=str(n))
        ElementTree.SubElement(entry, "ChannelName").text = dye
        ElementTree.SubElement(entry, "ChannelDescription").text = f"{shows} ({stain})"
    images = ElementTree.SubElement(root, "Images")
    for well in wells:
        row, column = _row_column(well)
        ElementTree.SubElement(xml_plate, "Well", id=f"{row:02d}{column:02d}")
        for field in range(1, fields + 1):
            for n, (_, _, _, dye) in CHANNELS.items():
                image = ElementTree.SubElement(images, "Image", Version="1")
                tags = (("id", f"{row:02d}{column:02d}K1F{field}P1R{n}"), ("URL", _phenix_name(well, field, n)),
                        ("Row", row), ("Col", column), ("FieldID", field), ("PlaneID", 1),
                        ("ChannelID", n), ("ChannelName", dye))
                for tag, text in tags:
                    ElementTree.SubElement(image, tag).text = str(text)
    ElementTree.indent(root)
    ElementTree.ElementTree(root).write(folder / "Index.idx.xml", encoding="utf-8", xml_declaration=True)


def _phenix_name(well: str, field: int, channel: int | str) -> str:
    row, column = _row_column(well)
    return f"r{row:02d}c{column:02d}f{field:02d}p01-ch{channel}sk1fk1fl1.tiff"


# ----------------------------------------------------------------------------- the shared core
@dataclass(frozen=True)
class _Vendor:
    """What differs between export forms."""

    name: str
    path_of: Callable[[str, str, int], str]  # (plate, well, site) -> image path under out, with {channel}
    write_field: Callable[[_Job, np.random.Generator], None]  # renders one field, writes its files
    write_plate_files: Callable[[Path, str, int, list[str], int], None]  # (image folder, plate, format, wells, fields)


IMAGEXPRESS = _Vendor("imagexpress", lambda plate, well, site: f"{plate}/{plate}_{well}_s{site}_w{{channel}}.TIF",
                      _write_imagexpress_field, _write_htd)
PHENIX = _Vendor("phenix", lambda plate, well, site: f"{plate}/Images/{_phenix_name(well, site, '{channel}')}",
                 _write_phenix_field, _write_index_xml)


def _checked_drop(drop_stain, wells: list[str], fields: int) -> tuple[str, int, int] | None:
    if drop_stain is None:
        return None
    well, field, channel = drop_stain = tuple(drop_stain)
    if well not in wells or not 1 <= field <= fields or channel not in CHANNELS:
        raise ValueError(f"drop_stain must be (imaged well, site 1..{fields}, channel 1..4), not {drop_stain!r}")
    return drop_stain


def _write_export(out: str | Path, vendor: _Vendor, plates: int, wells: int | Sequence[str], fields: int,
                  size: int, seed: int, drop_stain, workers: int | None, progress: bool) -> dict:
    """Plate folders of one vendor's form: label sets, ground truth, one job per field, plate files."""
    if plates < 1 or fields < 1 or size < 16:
        raise ValueError("plates and fields must be >= 1 and size >= 16")
    plate_format, names = _plate_wells(wells)
    drop_stain = _checked_drop(drop_stain, names, fields)
    plate_names = [f"P{p + 1:03d}" for p in range(plates)]
    args = dict(kind=vendor.name, plates=plates, wells=wells if isinstance(wells, int) else names, fields=fields,
                size=size, seed=seed, drop_stain=list(drop_stain) if drop_stain else None, version=GENERATOR_VERSION)

    def build(tmp: Path) -> tuple[list[_Job], dict]:
        jobs, well_rows, truth, missing = [], [], [], []
        for p, plate in enumerate(plate_names):
            for well in names:
                row, column = _row_column(well)
                labels = sample_label_sets(1, np.random.default_rng([seed, EXPORT_LABELS, p, row, column]))[0]
                well_rows.append((plate, well, format_label_string(labels)))
                for field in range(1, fields + 1):
                    truth.append((plate, well, field, format_label_string(labels)))
                    drop = (drop_stain[2],) if drop_stain and drop_stain[:2] == (well, field) else ()
                    path = vendor.path_of(plate, well, field)
                    missing += [path.format(channel=n) for n in drop]
                    jobs.append(_Job((seed, EXPORT, p, row, column, field), tuple(labels), size, str(tmp / path),
                                     vendor.name, vendor.write_field, drop))
            (tmp / path).parent.mkdir(parents=True)
            vendor.write_plate_files((tmp / path).parent, plate, plate_format, names, fields)
        _write_csv(tmp / "plate_map.csv", ("plate", "well", "labels"), well_rows)
        _write_csv(tmp / "ground_truth.csv", ("plate", "well", "field", "labels"), truth)
        channels = {str(n): f"{shows} ({stain}, {dye})" for n, (_, stain, shows, dye) in CHANNELS.items()}
        return jobs, dict(args, plate_map_csv="plate_map.csv", ground_truth_csv="ground_truth.csv",
                          plate_names=plate_names, plate_format=plate_format, channels=channels,
                          bit_depth=12, camera_offset=CAMERA_OFFSET, missing_files=missing)

    return _generate(Path(out).absolute(), args, workers, progress, build)


# ----------------------------------------------------------------------------- the vendors
def write_imagexpress_export(out: str | Path, plates: int = 1, wells: int | Sequence[str] = 96, fields: int = 4,
                             size: int = 1080, seed: int = 0, drop_stain: tuple[str, int, int] | None = None,
                             workers: int | None = None, progress: bool = True) -> dict:
    """Write plates as ImageXpress/MetaXpress exports them (see the module docstring).

    ``wells``: 96, 384 or a list of well names (``["B03", "C05"]``). ``drop_stain=(well, site,
    channel)``, e.g. ``("B03", 1, 2)``, leaves that field's channel-2 image and its thumbnail out of
    every plate (the ``.HTD`` still lists the wavelength), for tests of a field with a missing stain;
    the summary's ``missing_files`` names them.
    """
    return _write_export(out, IMAGEXPRESS, plates, wells, fields, size, seed, drop_stain, workers, progress)


def write_phenix_export(out: str | Path, plates: int = 1, wells: int | Sequence[str] = 96, fields: int = 4,
                        size: int = 1080, seed: int = 0, drop_stain: tuple[str, int, int] | None = None,
                        workers: int | None = None, progress: bool = True) -> dict:
    """Write plates as an Opera Phenix/Operetta Harmony export (see the module docstring).

    Arguments as in :func:`write_imagexpress_export`; a dropped stain's file is missing while
    ``Index.idx.xml`` still lists it, as when a file is lost after the export.
    """
    return _write_export(out, PHENIX, plates, wells, fields, size, seed, drop_stain, workers, progress)
