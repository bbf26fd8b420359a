"""Typed training configuration: dataclasses, YAML presets and ``--set`` overrides.

One ``TrainingConfig`` describes a run. It is built from defaults, then a YAML
file, then ``section.key=value`` overrides, validated before any Ray worker
starts, and saved next to the checkpoints it produced.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

LOSSES = ("bce", "focal")
SCHEDULES = ("onecycle", "cosine")


class ConfigError(ValueError):
    """An invalid configuration value; the message says which and how to fix it."""


@dataclass
class DataConfig:
    # Shards root, Kaggle root or plate folder (local or s3://). Empty: the embedded
    # synthetic data set, generated into ``synthetic_dir`` on first use.
    path: str = ""
    # Classes and stains: a preset (hpa-z2g, hpa-rgby, hpa-2018) or a spec YAML file (protein_ray/spec.py).
    spec: str = "hpa-z2g"
    # Plate folders: a CSV of labels per well or field (plate, well[, field], labels), how the
    # files are named (auto, plate, imagexpress, phenix) or a regex, and which channel is which stain.
    labels: str = ""
    layout: str = "auto"
    pattern: str = ""
    channel_map: str = ""
    # 16-bit files hold this many bits of data (12 for most cameras); 0: the spec's (the file's depth).
    bit_depth: int = 0
    synthetic_dir: str = "runs/data/synthetic"
    synthetic_train: int = 3000
    synthetic_size: int = 256
    image_size: int = 128
    val_fraction: float = 0.2
    split_seed: int = 0
    # A run fails if more than this fraction of training images cannot be decoded.
    max_bad_fraction: float = 0.01
    # Decode once and keep the decoded images in Ray's object store when they fit in
    # this many GiB (images x stains x image_size^2 x 1 byte when every stain is 8-bit,
    # else 2); 0 decodes every epoch.
    cache_decoded_gib: float = 4.0
    # Each training worker draws its batches at random from a buffer of this many decoded
    # images, afresh each epoch (memory: this many x stains x image_size^2 x 1 or 2 bytes).
    # 0 keeps the input's order, which for a plate folder is well by well.
    shuffle_buffer: int = 1024


@dataclass
class ModelConfig:
    name: str = "resnet18"
    # Local file with pretrained weights (timm/torchvision state dict); nothing is downloaded.
    pretrained_path: str = ""
    drop_rate: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 6
    batch_size: int = 32  # per worker
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    loss: str = "bce"
    focal_gamma: float = 2.0
    # Mixed precision and channels-last apply on GPU only.
    amp: bool = True
    channels_last: bool = True
    never_empty: bool = True
    seed: int = 0
    # Steps with NaN/inf gradients are skipped; more than this many in an epoch stops the run.
    max_nonfinite_steps: int = 20


@dataclass
class RunConfig:
    name: str = "cpu-demo"
    storage_path: str = "runs/train"
    # On a 2-core laptop one worker with 2 threads beats 2 gloo workers (see README).
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    max_failures: int = 2
    keep_checkpoints: int = 2

    def local_cpus(self) -> int:
        """Logical CPUs for a local Ray instance running this: the workers plus room for
        Ray Data's decode tasks, and never fewer than the machine's cores."""
        return max(os.cpu_count() or 1, self.num_workers * self.cpus_per_worker + 2)
    # MLflow tracking (pip install 'protein-ray[mlflow]'): a store such as sqlite:///runs/mlflow.db
    # or an MLflow server's http(s):// address; empty: off. See protein_ray/tracking.py.
    tracking_uri: str = ""
    experiment: str = "protein-ray"


@dataclass
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_types(section: object) -> dict[str, type]:
    return typing.get_type_hints(type(section))


def _coerce(value: object, kind: type, where: str) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def _set(config: TrainingConfig, dotted: str, value: object) -> None:
    section_name, _, key = dotted.partition(".")
    sections = {f.name for f in dataclasses.fields(config)}
    if section_name not in sections or not key:
        raise ConfigError(f"unknown setting {dotted!r}: use section.key with section in {sorted(sections)}")
    section = getattr(config, section_name)
    types = _section_types(section)
    if key not in types:
        raise ConfigError(f"unknown setting {dotted!r}; {section_name} has {sorted(types)}")
    setattr(section, key, _coerce(value, types[key], dotted))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """Defaults <- YAML file <- ``section.key=value`` overrides, then validated."""
    config = TrainingConfig()
    if path:
        try:
            document = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, optim, run)")
        for section_name, values in document.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section_name!r} must be a mapping")
            for key, value in values.items():
                _set(config, f"{section_name}.{key}", value)
    for override in overrides or []:
        dotted, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        _set(config, dotted.strip(), yaml.safe_load(value) if value.strip() else "")
    validate(config)
    return config


def validate(config: TrainingConfig) -> None:
    """Cheap checks that fail before any worker starts, with the fix in the message."""
    checks = [
        (config.data.image_size >= 32, "data.image_size must be at least 32"),
        (0 < config.data.val_fraction < 1, "data.val_fraction must be between 0 and 1"),
        (0 <= config.data.max_bad_fraction < 1, "data.max_bad_fraction must be in [0, 1)"),
        (config.data.synthetic_train >= 20, "data.synthetic_train must be at least 20"),
        (config.data.bit_depth == 0 or 8 <= config.data.bit_depth <= 16, "data.bit_depth must be 0 or 8..16"),
        (config.data.shuffle_buffer >= 0, "data.shuffle_buffer must be 0 (off) or a number of images"),
        (config.optim.epochs >= 1, "optim.epochs must be at least 1"),
        (config.optim.batch_size >= 2, "optim.batch_size must be at least 2 (batch norm needs 2)"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.optim.loss in LOSSES, f"optim.loss must be one of {LOSSES}"),
        (config.optim.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}"),
        (config.run.num_workers >= 1, "run.num_workers must be at least 1"),
        (config.run.keep_checkpoints >= 1, "run.keep_checkpoints must be at least 1"),
        (config.run.name.replace("-", "").replace("_", "").isalnum(), "run.name may use letters, digits, - and _"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_backbone(config.model.name)
    _check_spec(config.data.spec)


def _check_spec(name_or_path: str) -> None:
    from protein_ray.spec import SpecError, load_spec

    try:
        load_spec(name_or_path)
    except SpecError as error:
        raise ConfigError(str(error)) from None


def _check_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.name: unknown timm backbone {name!r}{hint}")
