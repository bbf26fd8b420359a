"""OME-Zarr (OME-NGFF) HCS plates as input: plate -> wells -> fields, one index row per field.

Resolving (on the driver) reads only metadata: the plate group's ``plate`` (its wells), each
well's ``well.images`` (its fields) and the first field's ``omero`` channels and array shape,
which decide which array channel holds each of the model's stains (``stain_channels``). A
field's row carries one ``sources`` entry, a ``FieldReference`` (``omezarr:{json}``), instead of
file URIs; its ``source`` is the field group's URI.

Reading (in the decode stage, or the training/shard loader) opens the field, picks the
multiscale level closest to, but not below, the model's input size (``choose_level``) and
returns the stains' integer pixels (H, W, C) in the model's order. The decode stage then scales
them with the same per-stain function as decoded files (``imaging.scale_stains``), so a field gives the
tensor its pixels give written as a TIFF.

Both NGFF 0.4 (zarr v2, ``.zattrs``) and 0.5 (zarr v3, ``zarr.json``, metadata under ``ome``)
are read. zarr is imported inside functions: the core install and the CLI do not need it;
so is ``imaging`` (torch): resolving an input must not pay for the model's imports.
s3:// plates go through ``storage``'s pyarrow S3 filesystem (the same endpoint, credential chain,
timeouts and retries as every other input), handed to zarr through fsspec's wrappers.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from protein_ray import storage
from protein_ray.defaults import MAX_PIXELS
from protein_ray.plates import canonical_well
from protein_ray.sources import DataSourceError, InputOptions

logger = logging.getLogger(__name__)

PREFIX = "omezarr:"
INSTALL_HINT = "pip install 'protein-ray[omezarr]'"
INDEX_THREADS = 8  # concurrent well-metadata reads: hides S3 latency on plates of hundreds of wells
NGFF_01_AXES = "tczyx"  # NGFF 0.1/0.2 name no axes: their images are always 5-D in this order


@dataclass(frozen=True)
class FieldReference:
    """Where one field's pixels are and which array channel holds each model stain."""

    uri: str  # the field's image group (holding the multiscales)
    channels: tuple[tuple[str, int | None], ...]  # (stain, 0-based channel index or None: the plate has none)
    labels: tuple[str, ...] = ()  # the plate's channel labels, to name what there is when a stain is missing
    size: int | None = None  # the model's input size when the index knows it (training); picks the level

    def encode(self) -> str:
        return PREFIX + json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> FieldReference:
        fields = json.loads(text[len(PREFIX):])
        channels = tuple((stain, channel) for stain, channel in fields.pop("channels"))
        return cls(channels=channels, **{**fields, "labels": tuple(fields["labels"])})

    @property
    def missing(self) -> list[str]:
        return [stain for stain, channel in self.channels if channel is None]


def is_reference(source: str) -> bool:
    return source.startswith(PREFIX)


def original(source: str) -> str:
    """The URI a user knows a source by: a field reference's field group, else itself."""
    return FieldReference.parse(source).uri if is_reference(source) else source


def require_zarr():
    try:
        import zarr
    except ImportError:
        raise DataSourceError(f"reading OME-Zarr plates needs the zarr library: {INSTALL_HINT}") from None
    return zarr


# ------------------------------------------------------------------- metadata --


def ome_attributes(attributes: dict) -> dict:
    """NGFF 0.5 keeps its metadata under ``ome``; 0.4 and earlier at the top level."""
    return attributes.get("ome", attributes)


def is_plate(uri: str) -> bool:
    """Whether ``uri`` is an HCS plate group. Read as JSON through ``storage``, so that a plate
    is recognised (and the install hint given) without zarr installed."""
    for name in (".zattrs", "zarr.json"):
        path = storage.join(uri, name)
        if not storage.exists(path):
            continue
        try:
            document = json.loads(storage.read_text(path))
        except ValueError:
            return False
        attributes = document.get("attributes", {}) if name == "zarr.json" else document
        return isinstance(attributes, dict) and "plate" in ome_attributes(attributes)
    return False


def zarr_store(uri: str):
    """A read-only zarr store for ``uri``: local files, or S3 through ``storage``'s filesystem."""
    require_zarr()
    from zarr.storage import FsspecStore, LocalStore

    if not storage.is_s3(uri):
        return LocalStore(storage.absolute(uri), read_only=True)
    from fsspec.implementations.arrow import ArrowFSWrapper
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    class ArrowS3(ArrowFSWrapper):
        fsid = "protein-ray-s3"  # the base class's id assumes HDFS (host, port); S3 has neither

    fs, path = storage.resolve(uri)
    return FsspecStore(AsyncFileSystemWrapper(ArrowS3(fs), asynchronous=True), read_only=True, path=path)


def open_group(uri: str):
    return require_zarr().open_group(store=zarr_store(uri), mode="r")


def axis_names(multiscale: dict, ndim: int) -> list[str]:
    """Axis names of a multiscale's arrays: NGFF 0.4+ dicts, 0.3 strings, 0.1/0.2 none."""
    axes = multiscale.get("axes")
    if not axes:
        return list(NGFF_01_AXES[-ndim:])
    return [axis["name"] if isinstance(axis, dict) else str(axis) for axis in axes]


def image_levels(image) -> tuple[list, list[str]]:
    """A field's resolution levels (zarr arrays, largest first) and their axis names."""
    multiscale = ome_attributes(dict(image.attrs))["multiscales"][0]
    levels = [image[dataset["path"]] for dataset in multiscale["datasets"]]
    return levels, axis_names(multiscale, levels[0].ndim)


def plane_shape(shape: tuple[int, ...], axes: list[str]) -> tuple[int, int]:
    return int(shape[axes.index("y")]), int(shape[axes.index("x")])


def channel_labels(image) -> list[str]:
    channels = ome_attributes(dict(image.attrs)).get("omero", {}).get("channels", [])
    return [str(channel.get("label", "")) for channel in channels]


# ---------------------------------------------------------------- the index --


def stain_channels(labels: list[str], count: int, options: InputOptions) -> tuple[tuple[str, int | None], ...]:
    """Which array channel (0-based) holds each model stain; None where the plate has none.

    ``--channel-map`` decides when given (1-based numbers). Otherwise, when any channel label
    names a model stain (case-insensitive), labels decide and a stain without a label is
    missing: a plate that names its channels is not guessed at by order. Otherwise by order."""
    lowered = [label.strip().lower() for label in labels]
    if options.channel_map:
        wanted = {stain: number - 1 for number, stain in options.channel_map}
    elif any(stain.lower() in lowered for stain in options.stains):
        wanted = {stain: lowered.index(stain.lower()) for stain in options.stains if stain.lower() in lowered}
    else:
        wanted = {stain: position for position, stain in enumerate(options.stains)}
    return tuple((stain, wanted[stain] if 0 <= wanted.get(stain, -1) < count else None) for stain in options.stains)


def well_fields(root, well_path: str) -> list[str]:
    """The paths of a well's fields, in the order its metadata lists them."""
    try:
        well = ome_attributes(dict(root[well_path].attrs))["well"]
    except (KeyError, FileNotFoundError) as error:
        raise DataSourceError(f"the plate lists well {well_path!r}, which has no well metadata ({error})") from None
    return [str(image["path"]) for image in well["images"]]


def well_name(plate: dict, well: dict) -> str:
    """``B07``: the well's row and column names (NGFF 0.4+ indices, else its ``B/7`` path)."""
    if "rowIndex" in well and "columnIndex" in well:
        row, column = plate["rows"][well["rowIndex"]]["name"], plate["columns"][well["columnIndex"]]["name"]
    else:
        row, _, column = well["path"].partition("/")
    return canonical_well(f"{row}{column}") or f"{row}{column}"


def plate_name(plate: dict, uri: str) -> str:
    """The plate's own name, else its folder's without ``.zarr`` / ``.ome.zarr``."""
    if plate.get("name"):
        return str(plate["name"])
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def plate_channels(root, wells: list[dict], fields: list[list[str]], uri: str, options: InputOptions):
    """The stain -> channel map and channel labels, from the plate's first field (an HCS plate
    is acquired with one channel set-up; a field that differs fails when it is read)."""
    first = next((f"{well['path']}/{paths[0]}" for well, paths in zip(wells, fields) if paths), None)
    if first is None:
        raise DataSourceError(f"{uri}: the plate's wells list no fields")
    image = root[first]
    levels, axes = image_levels(image)
    count = int(levels[0].shape[axes.index("c")]) if "c" in axes else 1
    labels = channel_labels(image)
    channels = stain_channels(labels, count, options)
    missing = [stain for stain, channel in channels if channel is None]
    if missing:
        logger.warning("%s: no channel for stain(s) %s (channels: %s); its fields will be error rows",
                       uri, ", ".join(missing), ", ".join(labels) or f"{count} unlabelled")
    return channels, tuple(labels)


def plate_index(uri: str, options: InputOptions = InputOptions()) -> pd.DataFrame:
    """One row per field of the plate at ``uri``: image_id ``<plate>_<well>_f<field>`` (as plate
    folders name theirs; field 1-based in the well's order), plate, well, field, ``source`` (the
    field group) and ``sources`` (its ``FieldReference``)."""
    root = open_group(uri)
    plate = ome_attributes(dict(root.attrs))["plate"]
    name, wells = plate_name(plate, uri), list(plate["wells"])
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        fields = list(pool.map(lambda well: well_fields(root, well["path"]), wells))
    channels, labels = plate_channels(root, wells, fields, uri, options)
    rows = []
    for well, paths in zip(wells, fields):
        well_id = well_name(plate, well)
        for number, path in enumerate(paths, start=1):
            field_uri = storage.join(uri, *well["path"].split("/"), path)
            reference = FieldReference(field_uri, channels, labels, options.image_size)
            rows.append({"image_id": f"{name}_{well_id}_f{number}", "plate": name, "well": well_id,
                         "field": number, "labels": None, "source": field_uri, "sources": [reference.encode()]})
    if not rows:
        raise DataSourceError(f"{uri}: the plate's wells list no fields")
    return pd.DataFrame(rows).sort_values(["well", "field"], ignore_index=True)


# ------------------------------------------------------------------- pixels --


def choose_level(shapes: list[tuple[int, int]], image_size: int | None) -> int:
    """The level closest to, but not below, ``image_size`` on its shorter side: the fewest
    pixels to read without upsampling. Level 0 (full resolution) when no size is asked for
    or every level is smaller."""
    if not image_size:
        return 0
    fitting = [level for level, shape in enumerate(shapes) if min(shape) >= image_size]
    return min(fitting, key=lambda level: shapes[level][0] * shapes[level][1]) if fitting else 0


def read_plane(array, axes: list[str], channel: int) -> np.ndarray:
    """One channel of a field as (H, W): the first timepoint, and the maximum over z.

    A time series is classified at its first timepoint (the model sees still images). A z-stack
    (widefield or confocal planes through the cells) is max-projected: each structure is
    brightest in its own focal plane, and the projection keeps all of them, as the single
    in-focus images the models are trained on show them; one middle plane would lose the rest."""
    index = tuple(channel if axis == "c" else slice(None) if axis in ("z", "y", "x") else 0 for axis in axes)
    plane = np.asarray(array[index])
    return plane.max(axis=0) if plane.ndim == 3 else plane


def missing_stain_error(reference: FieldReference):
    from protein_ray.imaging import ImageDecodeError

    have = ", ".join(reference.labels) or "unlabelled channels"
    return ImageDecodeError("missing_stain", f"{reference.uri}: the plate has no channel for stain "
                            f"{' or '.join(reference.missing)} (channels: {have}); map them with --channel-map")


def read_field(text: str, image_size: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A field's integer pixels (H, W, C) in the model's stain order, from the level that fits
    ``image_size`` (else the reference's size, else full resolution)."""
    from protein_ray.imaging import ImageDecodeError

    reference = FieldReference.parse(text)
    if reference.missing:
        raise missing_stain_error(reference)
    levels, axes = image_levels(open_group(reference.uri))
    shapes = [plane_shape(level.shape, axes) for level in levels]
    chosen = choose_level(shapes, image_size or reference.size)
    height, width = shapes[chosen]
    if height * width > max_pixels:
        raise ImageDecodeError("too_large", f"field has {height * width:,} pixels; the limit is {max_pixels:,}")
    count = levels[chosen].shape[axes.index("c")] if "c" in axes else 1
    wanted = [channel for _, channel in reference.channels]
    if max(wanted) >= count:
        raise ImageDecodeError("channels", f"{reference.uri}: has {count} channel(s); the plate's first field "
                               f"had channel {max(wanted) + 1}")
    return np.stack([read_plane(levels[chosen], axes, channel) for channel in wanted], axis=-1)


def fetch_field(text: str, image_size: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray | Exception:
    """``read_field``, or the error that stopped it (a row's error, never the job's)."""
    from protein_ray.imaging import ImageDecodeError

    try:
        return read_field(text, image_size, max_pixels)
    except (ImageDecodeError, DataSourceError) as error:
        return error
    except Exception as error:  # zarr, codecs, storage: the field is unreadable
        uri = FieldReference.parse(text).uri
        return storage.StorageError(f"{uri}: cannot read the OME-Zarr field ({type(error).__name__}: {error})")
