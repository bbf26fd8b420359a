"""The timm model factory and the device helpers training and inference share.

The checkpoint format (weights + model card) is in ``protein_ray.checkpoint``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import timm
import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

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


def prepare_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode model made cheaper to run, with the same outputs (to float
    rounding): batch norms folded into their convolutions, then channels-last memory.
    Measured for resnet18 at 256 px on one CPU thread: 1.2-1.5x faster; on GPU both are
    the usual inference settings. Callers feed it channels-last inputs."""
    folded = fold_batch_norms(model.eval())
    logger.info("folded %d batch norms into their convolutions", folded)
    return model.to(device=device, memory_format=torch.channels_last)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold each eval-mode ``BatchNorm2d`` into the ``Conv2d`` that alone feeds it, in
    place, so that inference skips a pass over every activation. Returns how many were
    folded. torch.fx finds the pairs; a model it cannot trace keeps its batch norms."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # data-dependent control flow: fx cannot follow it
        logger.info("batch norms not folded: %s cannot be traced (%s)", type(model).__name__, error)
        return 0
    modules = dict(model.named_modules())
    # A module called twice (shared weights) cannot be rewritten for one of its calls.
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = 0
    for node in graph.nodes:
        conv = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(conv, fx.Node) and conv.op == "call_module"):
            continue
        # Exact types: subclasses (timm's BatchNormAct2d, Conv2dSame) do more than the fold keeps.
        if type(modules[node.target]) is not nn.BatchNorm2d or type(modules[conv.target]) is not nn.Conv2d:
            continue
        if len(conv.users) != 1 or calls[conv.target] != 1 or calls[node.target] != 1:
            continue
        model.set_submodule(conv.target, fuse_conv_bn_eval(modules[conv.target], modules[node.target]))
        model.set_submodule(node.target, nn.Identity())
        folded += 1
    return folded
