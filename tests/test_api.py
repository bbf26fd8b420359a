"""The Python API of protein_ray/__init__.py: light to import, typed entry points, checked options."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, encode

import protein_ray
from protein_ray.config import ConfigError, TrainingConfig

HEAVY = ("torch", "ray", "timm", "pandas", "pyarrow", "mlflow")


def test_import_protein_ray_imports_neither_torch_nor_ray():
    code = ("import json, sys, protein_ray; protein_ray.load_config; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(loaded.stdout) == []
    assert set(protein_ray.__all__) <= set(dir(protein_ray))


def test_train_stays_the_function_after_the_training_module_is_imported():
    from protein_ray.train import run_training  # binds the submodule on the package, but for the guard

    assert protein_ray.train.__module__ == "protein_ray" and callable(protein_ray.train)
    assert importlib.import_module("protein_ray.train").run_training is run_training


def test_train_accepts_a_preset_path_mappings_or_a_config():
    resolve = protein_ray._training_config
    from_path = resolve(ROOT / "configs" / "smoke.yaml", {"optim.epochs": 2, "run.tracking_uri": "sqlite:///m.db"})
    assert from_path.model.name == "test_resnet" and from_path.optim.epochs == 2
    assert from_path.run.tracking_uri == "sqlite:///m.db"
    nested = resolve({"optim": {"epochs": 4}, "optim.never_empty": False, "run.name": "yes"})
    assert nested.optim.epochs == 4 and nested.optim.never_empty is False and nested.run.name == "yes"
    config = TrainingConfig()
    assert resolve(config, None) is config
    assert resolve(config, {"data.path": Path("/data/x")}).data.path == "/data/x"
    with pytest.raises(ConfigError, match="optim.epoch"):
        resolve(None, {"optim.epoch": 3})


def test_score_names_an_unknown_option_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="'bach_size'"):
        protein_ray.score(tmp_path / "ckpt", tmp_path / "plate", tmp_path / "out", bach_size=8)
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        protein_ray.score(tmp_path / "ckpt", [tmp_path / "plate"], tmp_path / "out", batch_size=0)
    assert not (tmp_path / "out").exists()


def test_from_checkpoint_takes_a_run_folder_and_gives_the_predictors_probabilities(tmp_path):
    import torch

    from protein_ray.checkpoint import ModelCard, save_checkpoint
    from protein_ray.imaging import Preprocessing
    from protein_ray.model import create_model

    for epoch, macro_f1 in ((0, 0.4), (1, 0.6)):
        torch.manual_seed(epoch)
        card = ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64),
                         metrics={"macro_f1": macro_f1}, epoch=epoch)
        save_checkpoint(tmp_path / "run" / f"epoch_{epoch:03d}", create_model("test_resnet").eval(), card)
    images = [encode(np.random.default_rng(i).integers(0, 255, (80, 80, 3), dtype=np.uint8), "PNG") for i in range(3)]
    from_run = protein_ray.Predictor.from_checkpoint(str(tmp_path / "run"), device="cpu")
    assert from_run.checkpoint.endswith("epoch_001")  # the best epoch by macro F1
    direct = protein_ray.Predictor(str(tmp_path / "run" / "epoch_001"), device="cpu")
    for a, b in zip(from_run.predict_bytes(images), direct.predict_bytes(images)):
        np.testing.assert_array_equal(a.probabilities, b.probabilities)


@pytest.mark.slow
@pytest.mark.ray
def test_from_checkpoint_on_the_trained_smoke_checkpoint_matches_predictor(smoke_checkpoint):
    rng = np.random.default_rng(0)
    images = [encode(rng.integers(0, 255, (side, side, 3), dtype=np.uint8), "PNG") for side in (64, 96, 200)]
    loaded = protein_ray.Predictor.from_checkpoint(smoke_checkpoint, device="cpu", tta=True)
    direct = protein_ray.Predictor(smoke_checkpoint, device="cpu", tta=True)
    for a, b in zip(loaded.predict_bytes(images), direct.predict_bytes(images)):
        assert a.ok and b.ok
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
