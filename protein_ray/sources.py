"""What every input reader shares: how to read inputs, and how they fail.

``InputOptions`` says which split, folder layout, stains (and which file channel
is which) and class count to read with; ``DataSourceError`` names the file or CSV
row at fault. The readers are ``protein_ray.inputs`` (shards, Kaggle roots; the
resolver) and ``protein_ray.folders`` (plate exports and image folders).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd

from protein_ray import storage
from protein_ray.labels import NUM_CLASSES
from protein_ray.spec import RGB

# Stands in ``sources`` for a stain file that is not there; decoding reports it.
MISSING_STAIN = "<missing {} stain>"


class DataSourceError(ValueError):
    """Input data that cannot be used; the message names the file or CSV row."""


@dataclass(frozen=True)
class InputOptions:
    """How to read inputs: which split, which folder layout, which stains the model
    takes (and which file channel is which), how many classes labels may name."""

    split: str | None = None
    layout: str = "auto"  # auto, kaggle, plate, imagexpress, phenix
    pattern: str | None = None  # a regular expression as in FolderLayout; overrides the layout's
    stains: tuple[str, ...] = tuple(stain.name for stain in RGB)  # the model's stains, in order
    channel_map: tuple[tuple[int, str], ...] = ()  # file channel number -> stain name; default: by order
    num_classes: int = NUM_CLASSES
    labels_csv: str | None = None  # plate folders for training: plate, well[, field], labels
    # The model's input size, when the index should carry it: it picks an OME-Zarr field's
    # resolution level (training sets it; the scoring decode stage passes its own).
    image_size: int | None = None

    def stain_of_channel(self, channel: int) -> str | None:
        mapped = dict(self.channel_map)
        if mapped:
            return mapped.get(channel)
        return self.stains[channel - 1] if 1 <= channel <= len(self.stains) else None


def parse_channel_map(text: str | None, stains: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """``"1=blue,2=green,3=red"`` -> ((1, "blue"), ...), checked against the model's stains."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        number, sep, stain = item.partition("=")
        if not sep or not number.strip().isdigit() or stain.strip() not in stains:
            raise DataSourceError(f"--channel-map {text!r}: each item is CHANNEL=STAIN with STAIN one of "
                                  f"{', '.join(stains)} (got {item!r})")
        pairs.append((int(number), stain.strip()))
    return tuple(pairs)


def read_csv(uri: str, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    except storage.StorageError:
        raise
    except Exception as error:
        raise DataSourceError(f"{uri}: not a readable CSV ({error})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataSourceError(
            f"{uri}: missing column(s) {missing}; found {list(table.columns)}, expected {list(required)}"
        )
    return table


def missing_stains(sources: list[str]) -> list[str]:
    """The stain names that ``image_folder_index`` marked as missing in ``sources``."""
    return [uri.strip("<>").split()[1] for uri in sources if uri.startswith("<missing")]

