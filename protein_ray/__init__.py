"""protein-ray: protein localisation classification at cluster scale with Ray.

The Python API, four names (``import protein_ray`` stays light: torch and Ray are
imported by the first call that needs them)::

    import protein_ray

    best = protein_ray.train("configs/smoke.yaml", {"optim.epochs": 2})     # -> best checkpoint URI
    summary = protein_ray.score(best, "plates/P001", "scores/P001", plate_map="plates/plate_map.csv")
    predictor = protein_ray.Predictor.from_checkpoint(best)                 # in-process predictions
    config = protein_ray.load_config("configs/smoke.yaml", ["optim.epochs=2"])

``protein_ray.train`` is the function above; the training module of the same name is
imported as ``from protein_ray.train import run_training`` (see ``_Package``).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Predictor", "load_config", "score", "train"]

if TYPE_CHECKING:
    from protein_ray.config import TrainingConfig

# Names served by module __getattr__: their modules import torch (or yaml/timm) when loaded.
_LAZY = {"Predictor": "protein_ray.predictor", "load_config": "protein_ray.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def train(config: TrainingConfig | str | os.PathLike | Mapping | None = None,
          overrides: Mapping[str, Any] | None = None, *, address: str | None = None) -> str:
    """Train with Ray Train and return the URI of the best checkpoint (by macro F1).

    ``config`` is a ``TrainingConfig``, a YAML preset's path, a mapping of settings
    (``{"optim.epochs": 2}`` or ``{"optim": {"epochs": 2}}``), or None for the embedded
    default; ``overrides`` (the same mapping forms) apply on top. Everything is validated
    before Ray starts. Joins the cluster at ``address`` or ``$RAY_ADDRESS``, else starts a
    local Ray instance sized for the run (or uses the one this process already started).
    Rerunning with the same ``run.name`` and ``run.storage_path`` resumes.

    >>> best = protein_ray.train("configs/smoke.yaml", {"run.storage_path": "/tmp/runs", "optim.epochs": 2})
    """
    from protein_ray.runtime import init_ray
    from protein_ray.train import run_training

    resolved = _training_config(config, overrides)
    init_ray(address, num_cpus=resolved.run.local_cpus())
    return run_training(resolved)


def _training_config(config, overrides: Mapping | None = None) -> TrainingConfig:
    from protein_ray.config import TrainingConfig, load_config, validate

    if isinstance(config, TrainingConfig) and not overrides:
        validate(config)
        return config
    path, settings = (config, {}) if isinstance(config, (str, os.PathLike)) else (None, config or {})
    if isinstance(settings, TrainingConfig):
        settings = settings.to_dict()
    dotted = {**_dotted(settings), **_dotted(overrides or {})}
    # JSON is YAML, so each value reads back as the same type through load_config's parser.
    return load_config(path, [f"{key}={json.dumps(os.fspath(v) if isinstance(v, os.PathLike) else v)}"
                              for key, v in dotted.items()])


def _dotted(settings: Mapping) -> dict[str, Any]:
    """``{"optim": {"epochs": 2}}`` -> ``{"optim.epochs": 2}``; dotted keys pass as they are."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = value
    return flat


def score(checkpoint: str | os.PathLike, inputs: str | os.PathLike | Sequence[str | os.PathLike],
          output: str | os.PathLike, **options: Any) -> dict:
    """Score images in bulk with Ray Data (``protein-ray predict``); returns the job's summary.

    ``checkpoint`` is a checkpoint or a run folder (its best epoch); ``inputs`` one or more
    shard folders, Kaggle roots, image or plate folders (local or ``s3://``); ``options``
    are ``PredictOptions`` fields (``plate_map=``, ``batch_size=``, ``tta=``, ``layout=``...,
    see ``protein_ray/scoring/options.py``). The summary's ``outputs`` name the files
    written (predictions, wells.csv, heatmaps, report.html). An unknown option is a TypeError.

    >>> summary = protein_ray.score(best, "plates/P001", "scores/P001", plate_map="plates/plate_map.csv")
    >>> summary["outputs"]["wells_csv"]
    """
    from protein_ray.scoring.job import score as run_job
    from protein_ray.scoring.options import PredictOptions

    known = PredictOptions.defaults()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"score() got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"options are {', '.join(sorted(known))}")
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    return run_job(PredictOptions(checkpoint=os.fspath(checkpoint), inputs=[os.fspath(p) for p in paths],
                                  output=os.fspath(output), **options))


class _Package(types.ModuleType):
    """Keeps ``protein_ray.train`` the function: importing the submodule of the same name
    (as the function itself does) would otherwise rebind the attribute to the module. The
    module stays in ``sys.modules`` and ``from protein_ray.train import ...`` works as before."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
