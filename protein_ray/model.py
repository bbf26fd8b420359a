"""The timm model factory and the device helpers training and inference share.

The checkpoint format (weights + model card) is in ``protein_ray.checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch

from protein_ray.labels import NUM_CLASSES

logger = logging.getLogger(__name__)


class PretrainedWeightsError(ValueError):
    """``model.pretrained_path`` that is not a readable file."""


def create_model(name: str, pretrained_path: str = "", drop_rate: float = 0.0, num_classes: int = NUM_CLASSES,
                 in_chans: int = 3) -> torch.nn.Module:
    """Any timm backbone with a ``num_classes`` head over ``in_chans`` stains.
    Pretrained weights come from a local file or not at all: timm's
    ``pretrained_cfg_overlay`` points it at the file and it drops the mismatched
    classifier itself."""
    options = dict(num_classes=num_classes, drop_rate=drop_rate, in_chans=in_chans)
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise PretrainedWeightsError(f"model.pretrained_path: {pretrained_path} is not a file")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_path)},
                                 **options)
    return timm.create_model(name, pretrained=False, **options)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 where the GPU supports it, else fp16 (with a scaler); nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return torch.autocast("cpu", enabled=False), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler
