"""The shard format (DESIGN.md section 2): Parquet files of encoded images.

One row per image: ``image_id``, ``image`` (the encoded file bytes, untouched),
``labels``, ``plate``/``well``/``field`` and ``source``. A shard root holds one
folder per split and ``manifest.json``; ``_INCOMPLETE`` marks one still being
written. The writer is ``protein_ray.data.write_shards``.
"""

from __future__ import annotations

import json

import pyarrow as pa

from protein_ray import storage

MANIFEST = "manifest.json"
FORMAT = "protein-ray shards v1"
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("labels", pa.list_(pa.int32())),
        ("plate", pa.string()),
        ("well", pa.string()),
        ("field", pa.int32()),
        ("source", pa.string()),
    ]
)
INDEX_COLUMNS = tuple(name for name in SCHEMA.names if name != "image")  # all but the bytes


class ShardFormatError(ValueError):
    """A shard folder that is unfinished or not a protein-ray shard folder."""


def is_shard_root(uri: str) -> bool:
    return storage.exists(storage.join(uri, MANIFEST)) or storage.exists(storage.join(uri, storage.INCOMPLETE_MARKER))


def list_shard_files(uri: str) -> list[str]:
    return [u for u in storage.list_files(uri) if u.endswith(".parquet")]


def read_manifest(shard_root: str) -> dict:
    if storage.exists(storage.join(shard_root, storage.INCOMPLETE_MARKER)):
        raise ShardFormatError(
            f"{shard_root}: shard writing did not finish ({storage.INCOMPLETE_MARKER} present); rewrite it")
    if not storage.exists(storage.join(shard_root, MANIFEST)):
        raise ShardFormatError(f"{shard_root}: no {MANIFEST}; not a protein-ray shard folder")
    return json.loads(storage.read_text(storage.join(shard_root, MANIFEST)))
