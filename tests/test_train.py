"""Training: configuration, checkpoints, and real Ray Train runs (2 CPU workers, gloo)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import history, smoke_config

from protein_ray.checkpoint import ModelCard, load_checkpoint, read_model_card, save_checkpoint
from protein_ray.config import ConfigError, load_config
from protein_ray.imaging import Preprocessing
from protein_ray.labels import CLASS_NAMES
from protein_ray.model import create_model, fold_batch_norms, prepare_for_inference
from protein_ray.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- configuration --


def test_cpu_demo_preset_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "cpu-demo.yaml") == load_config(None)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_sets_what_its_file_says(preset):
    import yaml

    config = load_config(ROOT / "configs" / preset)
    document = yaml.safe_load((ROOT / "configs" / preset).read_text())
    assert document, "an empty preset"
    for section, values in document.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


def test_overrides_are_typed():
    config = load_config(None, ["model.name=resnet34", "optim.epochs=20", "optim.lr=1e-4", "run.use_gpu=true"])
    assert (config.model.name, config.optim.epochs, config.optim.lr, config.run.use_gpu) == ("resnet34", 20, 1e-4, True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=resnet_does_not_exist", "unknown timm backbone 'resnet_does_not_exist'"),
        ("optim.epochs=zero", "optim.epochs: expected int, got 'zero'"),
        ("optim.epochs=0", "optim.epochs must be at least 1"),
        ("optim.loss=hinge", "optim.loss must be one of"),
        ("optim.learning_rate=0.1", "unknown setting 'optim.learning_rate'"),
        ("trainer.epochs=3", "unknown setting 'trainer.epochs'"),
        ("data.val_fraction=1.5", "data.val_fraction must be between 0 and 1"),
        ("data.shuffle_buffer=-1", "data.shuffle_buffer must be 0 (off) or a number of images"),
        ("run.use_gpu=maybe", "expected true/false"),
        ("optim.epochs", "must look like section.key=value"),
    ],
)
def test_invalid_config_values_fail_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


# --------------------------------------------------------------- checkpoints --


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet").eval()
    card = ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64), thresholds=[0.3] * 10, metrics={"macro_f1": 0.5}, epoch=2)
    save_checkpoint(tmp_path / "ckpt", model, card, training_state={"epoch": 2})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "config.json", "training_state.pt"}
    rebuilt, loaded_card = load_checkpoint(str(tmp_path / "ckpt"))
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)
    assert loaded_card == card and loaded_card.class_names == list(CLASS_NAMES)


def with_learned_batch_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model's batch norms are the identity; give them statistics a fold must carry."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for values, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 2.0),
                                      (module.weight.data, 0.5, 1.5), (module.bias.data, -0.5, 0.5)):
                values.copy_(torch.rand(values.shape, generator=generator) * (high - low) + low)
    return model.eval()


def test_inference_folds_every_batch_norm_and_keeps_the_outputs(tmp_path):
    torch.manual_seed(0)
    model = with_learned_batch_norm_statistics(create_model("test_resnet"))
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    card = ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64))
    save_checkpoint(tmp_path / "ckpt", model, card)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
        assert fold_batch_norms(copy.deepcopy(model), images[:1]) == batch_norms > 0

    predictor = Predictor(str(tmp_path / "ckpt"), device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    first_conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(predictor.predict_batch(images.numpy()), expected, atol=1e-5)
    np.testing.assert_allclose(predictor.embed_batch(images.numpy()), model.forward_head(
        model.forward_features(images), pre_logits=True).detach().numpy(), atol=1e-4)


class ConvUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, images):
        return self.bn(self.conv(images)) + self.conv(images)


class ConvOutputUsedTwice(ConvUsedTwice):
    def forward(self, images):
        features = self.conv(images)
        return self.bn(features) + features


@pytest.mark.parametrize("kind", [ConvUsedTwice, ConvOutputUsedTwice])
def test_a_batch_norm_stays_where_folding_it_would_change_the_outputs(kind):
    model = with_learned_batch_norm_statistics(kind())
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(images)
        assert fold_batch_norms(model, images) == 0
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_preparing_a_model_leaves_models_running_in_other_threads_alone():
    """A Serve replica builds the next model in a thread while batches run (hot reload);
    torch.fx's tracer, used here before, patched every module's __call__ and failed them."""
    import threading

    running = with_learned_batch_norm_statistics(create_model("test_resnet"))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = running(images)
    failures, stop = [], threading.Event()

    def serve_batches():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    torch.testing.assert_close(running(images), expected)
            except Exception as error:  # any failure of the running model is the bug
                failures.append(repr(error))

    thread = threading.Thread(target=serve_batches)
    thread.start()
    try:
        for _ in range(3):
            prepare_for_inference(create_model("test_resnet"), torch.device("cpu"), images[:1])
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []


@pytest.mark.s3
def test_checkpoint_loads_from_s3(tmp_path, s3_bucket):
    from protein_ray import storage

    model = create_model("test_resnet").eval()
    save_checkpoint(tmp_path / "ckpt", model, ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64)))
    for path in (tmp_path / "ckpt").iterdir():
        storage.write_bytes(f"{s3_bucket}/ckpt/{path.name}", path.read_bytes())
    rebuilt, card = load_checkpoint(f"{s3_bucket}/ckpt")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


def test_not_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="protein-ray train"):
        read_model_card(str(tmp_path))


# -------------------------------------------------------- real training runs --


@pytest.mark.slow
def test_smoke_training_learns(smoke_run):
    config, best = smoke_run
    records = history(config)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    best_card = read_model_card(best)
    # The smoke run's order of batches across its two workers varies, and so does its best
    # macro F1: prior + 0.043 to + 0.085 in three runs on 2026-12-05 (+ 0.049 failed the old
    # margin of 0.05); a model that cannot learn (lr 1e-9) reached prior + 0.010.
    assert best_card.metrics["macro_f1"] > best_card.metrics["label_prior_macro_f1"] + 0.03
    assert best_card.metrics["macro_f1"] == max(r["macro_f1"] for r in records)
    run_dir = Path(config.run.storage_path) / config.run.name
    assert {"curves.png", "classes.png", "config.yaml", "history.jsonl"} <= {p.name for p in run_dir.iterdir()}
    assert load_config(run_dir / "config.yaml") == config  # the resolved config is saved with the run


@pytest.mark.slow
def test_rerun_with_same_name_resumes_at_the_next_epoch(smoke_run, tmp_path_factory):
    from protein_ray.train import run_training

    config = smoke_config(tmp_path_factory, "smoke", "optim.epochs=4")
    run_training(config)
    epochs = [r["epoch"] for r in history(config)]
    assert epochs == [0, 1, 2, 3], "the rerun should add epoch 4 only, not start over"


def test_an_epoch_run_again_after_a_failure_is_logged_once(tmp_path):
    """A worker lost after logging an epoch but before its checkpoint was committed runs
    that epoch again: its new record replaces the lost attempt's, later ones go."""
    from protein_ray.train import HISTORY_FILE, append_history

    for epoch, loss in ((0, 0.9), (1, 0.8), (2, 0.7), (1, 0.6), (2, 0.5)):
        append_history(str(tmp_path), {"epoch": epoch, "train_loss": loss})
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"epoch": 0, "train_loss": 0.9}, {"epoch": 1, "train_loss": 0.6}, {"epoch": 2, "train_loss": 0.5}]


# ---------------------------------------------------------------- bad data ---


def test_missing_dataset_path_fails_before_workers(ray_session, tmp_path):
    from protein_ray.train_data import TrainingDataError, prepare_datasets

    config = load_config(None, [f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(TrainingDataError, match="does not exist"):
        prepare_datasets(config)


@pytest.mark.parametrize("cache_gib", [4.0, 0.0], ids=["cached", "streamed"])
def test_corrupt_training_images_are_counted_then_fatal_past_the_limit(ray_session, tmp_path, cache_gib):
    from protein_ray import synthetic
    from protein_ray.train import BatchCollator
    from protein_ray.train_data import TrainingDataError, prepare_datasets

    root = tmp_path / "kaggle"
    synthetic.write_kaggle_dataset(root, n_train=30, n_test=2, size=64, seed=1, workers=1, progress=False)
    victim = sorted((root / "train").glob("*.png"))[4]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    settings = [f"data.path={root}", "data.image_size=32", f"data.cache_decoded_gib={cache_gib}"]
    datasets, train_count, bad, _ = prepare_datasets(load_config(None, [*settings, "data.max_bad_fraction=0.1"]))
    assert bad == 1
    batches = {name: list(data.iter_torch_batches(batch_size=8, collate_fn=BatchCollator(Preprocessing(image_size=32), augment=True)))
               for name, data in datasets.items()}
    ok = torch.cat([b["ok"] for split in batches.values() for b in split])
    assert len(ok) == 30 and ok.sum() == 29  # the bad image is kept, weighted 0 by the loss
    assert sum(len(b["ok"]) for b in batches["train"]) == train_count
    assert set(batches["train"][0]) == {"image", "target", "ok"}
    assert batches["train"][0]["image"].shape[1:] == (3, 32, 32)
    assert batches["train"][0]["image"].dtype == batches["train"][0]["target"].dtype == torch.float32
    # Cached, the training blocks come in a new order each epoch; a stream keeps its order (Ray's plan operator).
    assert (type(datasets["train"]._logical_plan.dag).__name__ == "RandomizeBlocks") == (cache_gib > 0)
    with pytest.raises(TrainingDataError, match=rf"1 of 30 training images cannot be decoded.*{victim.stem}"):
        prepare_datasets(load_config(None, [*settings, "data.max_bad_fraction=0.0"]))


def wells_drawn(dataset, buffer: int, epoch: int) -> list[list[int]]:
    """The wells (each its own class) of the rows in each training batch of one epoch."""
    from protein_ray.train import TrainJob, training_batches

    config = load_config(None, ["optim.batch_size=16", f"data.shuffle_buffer={buffer}"])
    job = TrainJob(config, Preprocessing(image_size=32), tuple(CLASS_NAMES), train_count=80, run_uri="")
    return [batch["target"].argmax(1).tolist() for batch in training_batches(dataset, job, epoch, rank=0)]


def test_each_epoch_draws_its_batches_across_wells_in_a_new_order(ray_session):
    import numpy as np
    import ray.data

    # A plate folder's order: 10 wells of 8 fields, one after the other.
    wells = np.repeat(np.arange(10), 8)
    rows = ray.data.from_items([{"image": np.full((3, 32, 32), well, np.uint8), "target": np.eye(10)[well],
                                 "ok": 1.0} for well in wells], override_num_blocks=1).materialize()
    first, second = (wells_drawn(rows, buffer=1024, epoch=epoch) for epoch in (0, 1))
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == wells.tolist()  # every field once per epoch
    assert min(len(set(batch)) for batch in first) >= 5, first  # in order, a batch of 16 holds 2 wells
    assert first != second
    assert wells_drawn(rows, buffer=0, epoch=0) == [wells[i:i + 16].tolist() for i in range(0, 80, 16)]




# ------------------------------------------------------- losses and schedules --


def test_focal_loss_is_bce_at_gamma_zero_and_discounts_easy_examples():
    from protein_ray.optimization import focal_loss

    logits = torch.tensor([[4.0, -4.0, 0.0, 4.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # easy, easy, uncertain, confidently wrong
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0), bce)
    ratio = (focal_loss(logits, targets, gamma=2.0) / bce)[0]
    assert ratio[0] < 0.001 and ratio[1] < 0.001  # easy examples nearly vanish
    assert ratio[2] == pytest.approx(0.25)  # p = 0.5: (1 - 0.5)^2
    assert ratio[3] > 0.95  # a confident mistake keeps almost its whole loss


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_restored_optimizer_and_schedule_continue_where_they_stopped(schedule):
    from protein_ray.config import OptimConfig
    from protein_ray.optimization import build_optimizer, restore_optimizer

    optim = OptimConfig(epochs=4, lr=0.01, schedule=schedule)
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer(model, optim, steps_per_epoch=5)
    for _ in range(10):  # two epochs
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict()

    fresh_model = torch.nn.Linear(3, 2)
    fresh_optimizer, fresh_scheduler = build_optimizer(fresh_model, optim, steps_per_epoch=5)
    restore_optimizer(fresh_optimizer, fresh_scheduler, saved, steps=10)
    assert fresh_scheduler.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    state = fresh_optimizer.state_dict()["state"]
    torch.testing.assert_close(state[0]["exp_avg"], saved["state"][0]["exp_avg"])
    assert int(state[0]["step"]) == 10


@pytest.mark.parametrize("steps", range(1, 13))
def test_every_run_length_has_a_schedule_that_steps_to_the_end(steps):
    """A one-epoch smoke run died with ZeroDivisionError inside OneCycleLR (5 steps)."""
    from protein_ray.config import OptimConfig
    from protein_ray.optimization import build_optimizer

    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, OptimConfig(epochs=1), steps_per_epoch=steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    assert 0 <= scheduler.get_last_lr()[0] <= OptimConfig().lr


def test_a_non_finite_step_is_skipped_and_an_all_nan_epoch_stops_training():
    from protein_ray.config import OptimConfig
    from protein_ray.model import autocast_context
    from protein_ray.optimization import build_optimizer, train_one_epoch

    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10)
    optim = OptimConfig(epochs=1, lr=0.01)
    optimizer, scheduler = build_optimizer(model, optim, steps_per_epoch=2)
    autocast, scaler = autocast_context(torch.device("cpu"), enabled=False)

    def batch(poison: bool) -> dict:
        images = torch.randn(4, 3, 32, 32)
        if poison:
            images[0, 0, 0, 0] = float("nan")
        return {"image": images, "target": torch.zeros(4, 10), "ok": torch.ones(4)}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_one_epoch(model, [batch(True), batch(False)], optimizer, scheduler, optim, torch.device("cpu"),
                            autocast, scaler)
    assert stats["skipped_steps"] == 1 and stats["seen"] == 4  # only the clean batch counted
    after = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the clean step still trained
    with pytest.raises(FloatingPointError, match="1 of 1 steps of the epoch had non-finite gradients"):
        train_one_epoch(model, [batch(True)], optimizer, scheduler, optim, torch.device("cpu"), autocast, scaler)
    strict = OptimConfig(epochs=1, lr=0.01, max_nonfinite_steps=0)
    with pytest.raises(FloatingPointError, match="1 of 2 steps"):
        train_one_epoch(model, [batch(True), batch(False)], optimizer, scheduler, strict, torch.device("cpu"),
                        autocast, scaler)


def test_an_unwritable_run_folder_fails_before_any_data_is_read(tmp_path):
    from protein_ray import storage
    from protein_ray.train import run_training

    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should go")
    config = load_config(None, [f"run.storage_path={blocker}", f"data.path={tmp_path / 'no-data-here'}"])
    with pytest.raises(storage.StorageError, match="runs"):
        run_training(config)  # the missing data path would have failed later, after a decode pass


def test_rerunning_a_run_name_with_another_model_is_an_error_at_once(tmp_path):
    from protein_ray.train import ResumeMismatch, check_resumable

    run = tmp_path / "runs" / "exp"
    card = ModelCard(backbone="test_resnet", preprocessing=Preprocessing(image_size=64), epoch=1)
    save_checkpoint(run / "epoch_001", create_model("test_resnet"), card)
    same = load_config(None, ["model.name=test_resnet", "data.image_size=64"])
    check_resumable(str(run), same)  # the same model resumes
    check_resumable(str(tmp_path / "runs" / "new"), load_config(None))  # a new run name has nothing to resume
    other = load_config(None, ["model.name=resnet18", "data.image_size=128", "data.spec=hpa-rgby"])
    with pytest.raises(ResumeMismatch, match=r"backbone test_resnet -> resnet18; image size 64 -> 128; stains"):
        check_resumable(str(run), other)
