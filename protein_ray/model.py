"""timm model factory and the checkpoint format (DESIGN.md section 2).

A checkpoint is a directory holding ``model.safetensors`` (weights only, never a
pickle) and ``config.json`` (everything needed to rebuild and use the model:
backbone, image size, normalisation, classes, thresholds, metrics). Training
also leaves ``training_state.pt`` (optimizer state, epoch) for resuming; it
is loaded with ``weights_only=True`` and is never needed for inference.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from protein_ray import __version__, storage
from protein_ray.imaging import HPA_MEAN, HPA_STD
from protein_ray.labels import CLASS_NAMES, NUM_CLASSES

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unusable; the message says how to get one."""


@dataclass
class ModelCard:
    """The ``config.json`` of a checkpoint."""

    backbone: str
    image_size: int
    mean: list[float] = field(default_factory=lambda: list(HPA_MEAN))
    std: list[float] = field(default_factory=lambda: list(HPA_STD))
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    thresholds: list[float] = field(default_factory=lambda: [0.5] * NUM_CLASSES)
    never_empty: bool = True
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    run_name: str = ""
    package_version: str = __version__
    format: str = "protein-ray checkpoint v1"

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        values = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def create_model(name: str, pretrained_path: str = "", drop_rate: float = 0.0) -> torch.nn.Module:
    """Any timm backbone with a 10-class head. Pretrained weights come from a local
    file or not at all: timm's ``pretrained_cfg_overlay`` points it at the file and
    it drops the mismatched classifier itself."""
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise CheckpointError(f"model.pretrained_path: {pretrained_path} is not a file")
        return timm.create_model(
            name, pretrained=True, num_classes=NUM_CLASSES, drop_rate=drop_rate,
            pretrained_cfg_overlay={"file": str(pretrained_path)},
        )
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, drop_rate=drop_rate)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(directory: str | Path, model: torch.nn.Module, card: ModelCard,
                    training_state: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(card), indent=2))
    if training_state is not None:
        torch.save(training_state, directory / TRAINING_STATE_FILE)
    return directory


def read_model_card(checkpoint: str) -> ModelCard:
    uri = storage.join(checkpoint, CONFIG_FILE)
    if not storage.exists(uri):
        raise CheckpointError(
            f"{checkpoint} is not a protein-ray checkpoint (no {CONFIG_FILE}). "
            "Train one with `protein-ray train` (or `make demo`) and pass the URI it prints last."
        )
    return ModelCard.from_json(storage.read_text(uri))


def load_checkpoint(checkpoint: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the model from a checkpoint directory, local or ``s3://``, in eval mode."""
    card = read_model_card(checkpoint)
    model = create_model(card.backbone)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch, WEIGHTS_FILE)
        local.write_bytes(storage.read_bytes(storage.join(checkpoint, WEIGHTS_FILE)))
        model.load_state_dict(load_file(str(local)))
    return model.to(device).eval(), card


def load_training_state(directory: str | Path) -> dict | None:
    path = Path(directory) / TRAINING_STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 where the GPU supports it, else fp16 (with a scaler); nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return torch.autocast("cpu", enabled=False), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler
