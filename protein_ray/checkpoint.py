"""The checkpoint format (DESIGN.md section 2): its files, its card, and finding the best one.

A checkpoint is a directory holding ``model.safetensors`` (weights only, never a
pickle) and ``config.json``, the model card: everything needed to rebuild and
use the model (backbone, the ``Preprocessing`` spec, classes, thresholds,
metrics). Training also leaves ``training_state.pt`` (optimizer state, epoch)
for resuming; it is loaded with ``weights_only=True`` and is never needed for
inference. A run folder holds ``epoch_NNN`` checkpoints and ``history.jsonl``.

Every file name of a checkpoint or run lives here, and so does "which
checkpoint of a run is the best", so that training, scoring and Serve agree.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protein_ray import __version__, storage
from protein_ray.imaging import Preprocessing
from protein_ray.labels import CLASS_NAMES, NUM_CLASSES

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.jsonl"  # one JSON line per epoch, in the run folder
EPOCH_PREFIX = "epoch_"  # checkpoint folders: epoch_000, epoch_001, ...
BEST_METRIC = "macro_f1"  # what "best checkpoint" means everywhere
CHECKPOINT_ENV = "PROTEIN_RAY_CHECKPOINT"
DEMO_RUN_DIR = "runs/demo/train/cpu-demo"  # where `make demo` trains: the default when nothing is given
FORMAT = "protein-ray checkpoint v2"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unusable; the message says how to get one."""


def epoch_dir_name(epoch: int) -> str:
    return f"{EPOCH_PREFIX}{epoch:03d}"


def checkpoint_name(uri: str) -> str:
    """``s3://bucket/team/runs/cpu-demo/epoch_005`` -> ``cpu-demo/epoch_005``: what a
    client may see of a checkpoint without learning the storage layout behind it."""
    parts = [part for part in uri.rstrip("/").split("/") if part]
    return "/".join(parts[-2:])


@dataclass
class ModelCard:
    """The ``config.json`` of a checkpoint."""

    backbone: str
    preprocessing: Preprocessing
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    thresholds: list[float] = field(default_factory=lambda: [0.5] * NUM_CLASSES)
    never_empty: bool = True
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    run_name: str = ""
    package_version: str = __version__
    format: str = FORMAT

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"preprocessing": self.preprocessing.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        values = json.loads(text)
        if "preprocessing" not in values:  # v1 cards kept these three at the top level
            values["preprocessing"] = {k: values[k] for k in ("image_size", "mean", "std") if k in values}
        values["preprocessing"] = Preprocessing(**values["preprocessing"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def save_checkpoint(directory: str | Path, model, card: ModelCard, training_state: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    from protein_ray.model import unwrap

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / CARD_FILE).write_text(card.to_json())
    if training_state is not None:
        torch.save(training_state, directory / TRAINING_STATE_FILE)
    return directory


def read_model_card(checkpoint: str) -> ModelCard:
    uri = storage.join(checkpoint, CARD_FILE)
    if not storage.exists(uri):
        raise CheckpointError(
            f"{checkpoint} is not a protein-ray checkpoint (no {CARD_FILE}). "
            "Train one with `protein-ray train` (or `make demo`) and pass the URI it prints last."
        )
    return ModelCard.from_json(storage.read_text(uri))


def weights_bytes(checkpoint: str) -> int:
    return storage.file_info(storage.join(checkpoint, WEIGHTS_FILE)).size


def load_weights(model, checkpoint: str) -> None:
    """Load a checkpoint's weights (local or ``s3://``) into ``model``, strictly."""
    from safetensors.torch import load_file

    if not storage.is_s3(checkpoint):
        model.load_state_dict(load_file(storage.join(checkpoint, WEIGHTS_FILE)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch, WEIGHTS_FILE)
        local.write_bytes(storage.read_bytes(storage.join(checkpoint, WEIGHTS_FILE)))
        model.load_state_dict(load_file(str(local)))


def load_checkpoint(checkpoint: str, device="cpu"):
    """Rebuild the model from a checkpoint directory, local or ``s3://``, in eval mode:
    ``(model, card)``."""
    from protein_ray.model import create_model

    card = read_model_card(checkpoint)
    model = create_model(card.backbone, num_classes=len(card.class_names), in_chans=card.preprocessing.channels)
    load_weights(model, checkpoint)
    return model.to(device).eval(), card


def load_training_state(directory: str | Path) -> dict | None:
    import torch

    path = Path(directory) / TRAINING_STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ discovery --


def epoch_checkpoints_in(run_dir: str) -> dict[str, ModelCard]:
    """The ``epoch_*`` checkpoints under ``run_dir`` (a missing folder has none) and their cards."""
    try:
        cards = [f for f in storage.list_files(run_dir, recursive=True) if f.endswith("/" + CARD_FILE)]
    except storage.StorageError:
        return {}
    found = {}
    for card_uri in cards:
        checkpoint = card_uri[: -len(CARD_FILE) - 1]
        if os.path.basename(checkpoint).startswith(EPOCH_PREFIX):
            found[checkpoint] = ModelCard.from_json(storage.read_text(card_uri))
    return found


def best_checkpoint_in(run_dir: str) -> str | None:
    """The ``epoch_*`` checkpoint under ``run_dir`` with the highest macro F1, or None."""
    scored = [(card.metrics.get(BEST_METRIC, -1.0), uri) for uri, card in epoch_checkpoints_in(run_dir).items()]
    return max(scored)[1] if scored else None


def resolve_checkpoint(checkpoint: str | None) -> str:
    """A usable checkpoint URI from the argument, ``$PROTEIN_RAY_CHECKPOINT`` or the
    demo run. A run folder stands for its best epoch. The result is absolute, so
    processes with another working directory find the same files."""
    given = checkpoint or os.environ.get(CHECKPOINT_ENV) or DEMO_RUN_DIR
    uri = storage.absolute(given)
    if storage.exists(storage.join(uri, CARD_FILE)):
        return uri
    best = best_checkpoint_in(uri)
    if best:
        return best
    source = "the checkpoint given" if checkpoint else (
        f"${CHECKPOINT_ENV}" if os.environ.get(CHECKPOINT_ENV) else "the default")
    raise CheckpointError(
        f"no protein-ray checkpoint at {uri} (from {source}). Make one with `make demo` "
        f"(trains into {DEMO_RUN_DIR}) or `protein-ray train`, then pass its URI (or its run folder) "
        f"as args.checkpoint in serve_config.yaml, --checkpoint, or ${CHECKPOINT_ENV}."
    )
