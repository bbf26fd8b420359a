"""MLflow tracking (protein_ray/tracking.py) against a real SQLite store under the test's temp folder."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT, smoke_config

from protein_ray import tracking
from protein_ray.config import TrainingConfig, load_config

pytest.importorskip("mlflow")


def sqlite_uri(folder) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def own_smoke_config(tmp_path, name: str, *overrides: str):
    """configs/smoke.yaml with data and runs in this test's own folder (nothing shared)."""
    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.synthetic_dir={tmp_path / 'data'}",
                                                         f"run.storage_path={tmp_path / 'runs'}",
                                                         f"run.name={name}", *overrides])


def test_config_flattens_to_section_key_parameters():
    params = tracking.flatten_config(TrainingConfig())
    assert params["model.name"] == "resnet18" and params["optim.epochs"] == "6" and params["data.path"] == ""
    assert "run.tracking_uri" not in params  # where the parameters go is not one of them


def test_epoch_metrics_are_the_numbers_of_a_history_record_with_names_mlflow_accepts():
    record = {"epoch": 3, "train_loss": 0.5, "macro_f1": 0.7, "macro_f1@0.5": 0.6, "mAP": None, "bad_images": 0,
              "f1_per_class": [0.1, 0.9], "thresholds": [0.3, 0.4]}
    metrics = tracking.epoch_metrics(record, ["Golgi apparatus", "Nucleoli (fibrillar)"])
    assert metrics == {"train_loss": 0.5, "macro_f1": 0.7, "macro_f1_at_0.5": 0.6, "bad_images": 0.0,
                       "f1/Golgi apparatus": 0.1, "f1/Nucleoli _fibrillar_": 0.9}


def test_relative_local_stores_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert tracking.resolve_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"
    assert tracking.resolve_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert tracking.resolve_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    for uri in ("http://127.0.0.1:5000", "databricks", "databricks://profile", "file:///srv/mlruns"):
        assert tracking.resolve_uri(uri) == uri


def test_missing_mlflow_fails_before_any_data_is_read(tmp_path, monkeypatch):
    from protein_ray.train import run_training

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    tracking.client.cache_clear()
    config = own_smoke_config(tmp_path, "no-mlflow", f"run.tracking_uri={sqlite_uri(tmp_path)}")
    with pytest.raises(tracking.TrackingError, match=r"pip install 'protein-ray\[mlflow\]'"):
        run_training(config)
    assert not (tmp_path / "data").exists()  # raised before the synthetic data set was made
    tracking.client.cache_clear()


def test_reopening_a_run_folder_continues_its_mlflow_run_and_tags_changed_settings(tmp_path):
    config = own_smoke_config(tmp_path, "reopen", f"run.tracking_uri={sqlite_uri(tmp_path)}")
    run_uri = str(tmp_path / "runs" / "reopen")
    first = tracking.open_run(config, run_uri)
    assert (tmp_path / "runs" / "reopen" / tracking.RUN_ID_FILE).read_text() == first.run_id
    config.optim.epochs = 5
    second = tracking.open_run(config, run_uri)
    assert second == first
    run = tracking.client(first.tracking_uri).get_run(first.run_id)
    assert run.data.params["optim.epochs"] == "3" and run.data.tags["resumed.optim.epochs"] == "5"


def test_an_unusable_store_fails_with_a_message_that_names_it(tmp_path):
    config = own_smoke_config(tmp_path, "bad", "run.tracking_uri=nosuchscheme://x")
    with pytest.raises(tracking.TrackingError, match="nosuchscheme://x"):
        tracking.open_run(config, str(tmp_path / "runs" / "bad"))


@pytest.mark.slow
@pytest.mark.ray
def test_a_tracked_run_logs_params_metrics_per_epoch_plots_and_checkpoint_and_a_rerun_continues_it(
        ray_session, tmp_path_factory, tmp_path):
    from protein_ray.train import run_training

    store = sqlite_uri(tmp_path)
    config = smoke_config(tmp_path_factory, "tracked", "optim.epochs=2", f"run.tracking_uri={store}")
    run_training(config)
    mlflow_client = tracking.client(store)
    run = only_run(mlflow_client)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model.name"] == "test_resnet" and run.data.params["optim.epochs"] == "2"
    assert steps(mlflow_client, run, "macro_f1") == [0, 1]
    assert steps(mlflow_client, run, "train_loss") == [0, 1]
    assert {"mAP", "train_images_per_s", "macro_f1_at_0.5", "f1/Cytosol"} <= set(run.data.metrics)
    artifacts = artifact_paths(mlflow_client, run.info.run_id)
    assert {"curves.png", "classes.png", "config.yaml", "history.jsonl",
            "best_checkpoint/model.safetensors", "best_checkpoint/config.json"} <= artifacts

    config = smoke_config(tmp_path_factory, "tracked", "optim.epochs=3", f"run.tracking_uri={store}")
    run_training(config)  # resumes at epoch 3, in the same MLflow run
    rerun = only_run(mlflow_client)
    assert rerun.info.run_id == run.info.run_id and rerun.info.status == "FINISHED"
    assert steps(mlflow_client, rerun, "macro_f1") == [0, 1, 2]
    assert rerun.data.tags["resumed.optim.epochs"] == "3"


def only_run(mlflow_client):
    experiment = mlflow_client.get_experiment_by_name("protein-ray")
    runs = mlflow_client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(mlflow_client, run, metric: str) -> list[int]:
    return sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, metric))


def artifact_paths(mlflow_client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in mlflow_client.list_artifacts(run_id, path):
        found |= artifact_paths(mlflow_client, run_id, item.path) if item.is_dir else {item.path}
    return found
