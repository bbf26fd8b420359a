"""Is the synthetic data learnable? Train a small CNN briefly on CPU and print macro F1.

Generates a Kaggle-layout synthetic set at 256 px (train + held-out "test" with its
hidden labels), resizes to 128 px, trains timm resnet18 from scratch with BCE + AdamW
for a fixed number of epochs (~6 min on 2 quiet cores), and prints validation macro F1 at threshold 0.5 and with
the best per-class threshold (chosen on the same validation set, so optimistic).

    python benchmarks/synthetic_learnability.py --train 1500 --val 300 --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from protein_ray.labels import NUM_CLASSES, multi_hot_matrix, parse_label_string
from protein_ray.synthetic import write_kaggle_dataset


def load_split(folder: Path, csv_path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    images = [np.asarray(Image.open(folder / f"{row['Image']}.png").convert("RGB").resize((size, size), Image.BILINEAR))
              for row in rows]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y = torch.from_numpy(multi_hot_matrix([parse_label_string(row["Label"]) for row in rows]))
    return x, y


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = (y * pred).sum(0)
    denominator = y.sum(0) + pred.sum(0)
    return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)))


def best_threshold_f1(y: np.ndarray, prob: np.ndarray) -> float:
    grid = np.linspace(0.05, 0.95, 19)
    per_class = []
    for c in range(y.shape[1]):
        scores = [macro_f1(y[:, [c]], (prob[:, [c]] > t).astype(float)) for t in grid]
        per_class.append(max(scores))
    return float(np.mean(per_class))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Flips and 90-degree turns: a microscope field has no up or left."""
    if torch.rand(1) < 0.5:
        x = x.flip(3)
    return torch.rot90(x, int(torch.randint(0, 4, (1,))), (2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--generate-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "protein_ray_learnability")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    summary = write_kaggle_dataset(args.data, args.train, args.val, size=args.generate_size, seed=0, progress=False)
    print(f"data: {summary['images']} images, {summary['images_per_s']} images/s when generated "
          f"({'reused' if summary['reused'] else 'new'}), load+generate {time.perf_counter() - start:.0f} s")
    x_train, y_train = load_split(args.data / "train", args.data / "train.csv", args.input_size)
    x_val, y_val = load_split(args.data / "test", args.data / "test_labels.csv", args.input_size)
    mean = x_train.float().mean((0, 2, 3), keepdim=True) / 255
    std = x_train.float().std((0, 2, 3), keepdim=True) / 255

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    model = timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    torch.manual_seed(0)

    def train_step(index: torch.Tensor) -> float:
        logits = model(augment(prepare(x_train[index])))
        loss = loss_fn(logits, y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    # A fixed number of epochs, not a wall-time budget: on a shared machine the step rate
    # drifts with other people's load, and the figure should not. 10 epochs of 1500 images
    # take about 6 minutes on a quiet 2-core machine (0.7 s per step of 32).
    model.train()
    total_steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=total_steps, pct_start=0.15)
    t0, step, losses = time.perf_counter(), 0, []
    for epoch in range(1, args.epochs + 1):
        for index in torch.randperm(len(x_train)).split(args.batch_size):
            losses.append(train_step(index))
            scheduler.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{total_steps} loss {np.mean(losses[-50:]):.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if epoch % 2 == 0 or epoch == args.epochs:  # partial figures survive an interrupted run
            report(model, prepare, x_val, y_val, f"epoch {epoch} ({time.perf_counter() - t0:.0f} s train time)")
            model.train()


def report(model, prepare, x_val: torch.Tensor, y_val: torch.Tensor, when: str) -> None:
    model.eval()
    with torch.no_grad():
        prob = torch.cat([torch.sigmoid(model(prepare(b))) for b in x_val.split(64)]).numpy()
    y = y_val.numpy()
    per_class = [macro_f1(y[:, [c]], (prob[:, [c]] > 0.5).astype(float)) for c in range(NUM_CLASSES)]
    print(f"{when}: val macro F1 @0.5 {macro_f1(y, (prob > 0.5).astype(float)):.3f}, "
          f"best per-class threshold {best_threshold_f1(y, prob):.3f}; per class @0.5: "
          + " ".join(f"{c}:{f:.2f}" for c, f in enumerate(per_class)), flush=True)


if __name__ == "__main__":
    main()
