"""Training images/s: Ray Train + Ray Data against a plain PyTorch loop.

Same model, batch size, images, preprocessing and torch threads in one run. Two
plain PyTorch loops are the references: one decodes in the training process every
epoch (a DataLoader with num_workers=0, what a user writes first on a small
machine), one trains on images decoded into memory beforehand (the compute limit
of this model on this machine). The Ray path decodes in Ray Data tasks, once when
the decoded set fits data.cache_decoded_gib (it does here). Figures are per-epoch
throughput of the last epoch, so start-up, decoding before training and
validation are excluded from all three.

    python benchmarks/train_throughput.py [--images 600] [--model resnet18] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def plain_pytorch_images_per_s(kaggle_root: Path, model_name: str, image_size: int, batch_size: int,
                               threads: int, epochs: int, predecoded: bool) -> float:
    import pandas as pd

    from protein_ray.imaging import Preprocessing, decode_image, preprocess_batch
    from protein_ray.labels import multi_hot_matrix, parse_label_string
    from protein_ray.model import create_model

    table = pd.read_csv(kaggle_root / "train.csv", dtype=str, keep_default_na=False)
    paths = [kaggle_root / "train" / f"{i}.png" for i in table.Image]
    targets = multi_hot_matrix([parse_label_string(s) for s in table.Label])

    def load(i: int):
        return preprocess_batch([decode_image(paths[i].read_bytes())], Preprocessing(image_size))[0]

    in_memory = [load(i) for i in range(len(paths))] if predecoded else None

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            image = in_memory[i] if predecoded else load(i)
            return torch.from_numpy(image), torch.from_numpy(targets[i])

    torch.set_num_threads(threads)
    model = create_model(model_name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=0)
    rates = []
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
        rates.append(seen / (time.perf_counter() - started))
    return rates[-1]


def ray_images_per_s(shards: str, runs: Path, model_name: str, image_size: int, batch_size: int,
                     workers: int, cpus_per_worker: int, epochs: int) -> float:
    from protein_ray.config import load_config
    from protein_ray.train import run_training

    name = f"bench-{workers}w"
    config = load_config(None, [
        f"data.path={shards}", f"data.image_size={image_size}", f"model.name={model_name}",
        f"optim.batch_size={batch_size // workers}", f"optim.epochs={epochs}", f"run.name={name}",
        f"run.storage_path={runs}", f"run.num_workers={workers}", f"run.cpus_per_worker={cpus_per_worker}",
    ])
    run_training(config)
    history = [json.loads(line) for line in (runs / name / "history.jsonl").read_text().splitlines()]
    return history[-1]["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is measured; the first warms up")
    args = parser.parse_args()

    import ray

    from protein_ray import synthetic
    from protein_ray.data import write_shards

    cores = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    synthetic.write_kaggle_dataset(work / "kaggle", n_train=args.images, n_test=10, size=args.source_size, seed=0)
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
    write_shards(str(work / "kaggle"), str(work / "shards"))

    plain_args = (work / "kaggle", args.model, args.image_size, args.batch_size, cores, args.epochs)
    plain = plain_pytorch_images_per_s(*plain_args, predecoded=False)
    limit = plain_pytorch_images_per_s(*plain_args, predecoded=True)
    one = ray_images_per_s(str(work / "shards"), work / "runs", args.model, args.image_size, args.batch_size, 1, cores, args.epochs)
    two = ray_images_per_s(str(work / "shards"), work / "runs", args.model, args.image_size, args.batch_size, 2,
                           max(1, cores // 2), args.epochs)
    print(f"\n{args.model} at {args.image_size} px, {args.images} images, global batch {args.batch_size}, {cores} cores")
    print(f"{'path':<40}{'images/s':>10}{'vs plain':>10}{'vs limit':>10}")
    for name, rate in (("plain PyTorch loop, decoding", plain), ("plain PyTorch loop, pre-decoded (limit)", limit),
                       ("Ray Train + Ray Data, 1 worker", one), ("Ray Train + Ray Data, 2 workers", two)):
        print(f"{name:<40}{rate:>10.1f}{rate / plain:>10.2f}{rate / limit:>10.2f}")


if __name__ == "__main__":
    main()
