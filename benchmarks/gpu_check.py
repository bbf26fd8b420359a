"""The PyTorch half of the GPU check (``benchmarks/gpu_check.sh`` runs it first).

Measures, on the GPU when there is one (CPU otherwise, to try the script):

- mixed-precision training: the training loop's own step (``train_one_epoch``:
  autocast bf16 or fp16 + scaler, channels-last, AdamW + one-cycle) on synthetic
  images already on the device, so it shows the accelerator's rate, not decode;
- the model alone at inference (the same autocast), images/s;
- decode + preprocess of one 512-px PNG on one CPU core, images/s, and so the
  CPU cores one GPU needs to be fed at that inference rate.

    python benchmarks/gpu_check.py [--model resnet34] [--image-size 512] [--steps 300]
    python benchmarks/gpu_check.py --summarize runs/gpu-check   # the table of gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: ``--summarize`` and the argument check
# (tests/test_benchmarks.py) need only the standard library.


def synthetic_batch(size: int, image_size: int, batch_size: int, out: Path) -> tuple[torch.Tensor, list[bytes]]:
    """A batch of preprocessed synthetic images, plus their encoded PNG files."""
    import torch

    from protein_ray.imaging import Preprocessing, decode_image, preprocess_batch
    from protein_ray.synthetic import write_kaggle_dataset

    root = out / f"images-{size}px"
    write_kaggle_dataset(root, n_train=batch_size, n_test=0, size=size, seed=0, workers=1, progress=False)
    files = [path.read_bytes() for path in sorted((root / "train").glob("*.png"))]
    return torch.from_numpy(preprocess_batch([decode_image(f) for f in files], Preprocessing(image_size))), files


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def amp_training(model_name: str, images: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Images/s of ``steps`` training steps (after 10 warm-up steps) and the loss before and after."""
    import torch

    from protein_ray.config import OptimConfig
    from protein_ray.model import autocast_context, create_model
    from protein_ray.optimization import build_optimizer, train_one_epoch

    optim = OptimConfig(epochs=1)
    model = create_model(model_name).to(device).to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, optim, steps + 10)
    autocast, scaler = autocast_context(device, optim.amp)
    images = images.to(device)
    # Fixed random targets: the loss must fall as the model memorises them, proof the steps do update.
    targets = (torch.rand(len(images), 10, generator=torch.Generator().manual_seed(0)) < 0.3).float().to(device)
    batch = {"image": images, "target": targets, "ok": torch.ones(len(images), device=device)}
    first = train_one_epoch(model, [batch] * 10, optimizer, scheduler, optim, device, autocast, scaler)
    synchronize(device)
    started = time.perf_counter()
    last = train_one_epoch(model, [batch] * steps, optimizer, scheduler, optim, device, autocast, scaler)
    synchronize(device)
    return {"train_images_per_s": steps * len(images) / (time.perf_counter() - started),
            "loss_first_10_steps": first["loss_sum"] / first["seen"], "loss_last_steps": last["loss_sum"] / last["seen"],
            "autocast_dtype": str(autocast.fast_dtype) if device.type == "cuda" and optim.amp else "off"}


def inference_rate(model_name: str, images: torch.Tensor, repeats: int, device: torch.device) -> float:
    import torch

    from protein_ray.model import autocast_context, create_model, prepare_for_inference

    model = prepare_for_inference(create_model(model_name), device, images[:1])  # as the Predictor runs it
    autocast, _ = autocast_context(device, True)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast:
        for _ in range(3):
            model(images)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            model(images)
        synchronize(device)
    return repeats * len(images) / (time.perf_counter() - started)


def decode_rate_per_core(files: list[bytes], image_size: int, seconds: float = 5.0) -> float:
    """Decode + preprocess one image at a time on one thread, as one decode task does."""
    import torch

    from protein_ray.imaging import Preprocessing, decode_image, preprocess_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        preprocess_batch([decode_image(files[done % len(files)])], Preprocessing(image_size))
        done += 1
    torch.set_num_threads(threads)
    return done / (time.perf_counter() - started)


def measure(args) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, files = synthetic_batch(args.source_size, args.image_size, args.batch_size, args.out)
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size}
    figures |= amp_training(args.model, images, args.steps, device)
    figures["inference_images_per_s"] = inference_rate(args.model, images, args.steps // 3, device)
    figures["decode_images_per_s_per_core"] = decode_rate_per_core(files, args.image_size)
    figures["cores_to_feed_inference"] = figures["inference_images_per_s"] / figures["decode_images_per_s_per_core"]
    return figures


def summarize(out: Path) -> None:
    """One table from gpu_check.json and the two benchmarks' logs (when they ran)."""
    rows = [(key, f"{value:.3f}" if isinstance(value, float) else str(value))
            for key, value in json.loads((out / "gpu_check.json").read_text()).items()]
    for log, pattern in (("predict.log", r"^(limit: .*|\([ab]\) .*|\(c\) time = .*|\(c\) on \d+ images.*)$"),
                         ("serve.log", r"^\s+((?:plain in-process loop|batched|unbatched) .*)$")):
        path = out / log
        lines = re.findall(pattern, path.read_text(), re.MULTILINE) if path.exists() else ["(not run)"]
        rows += [(log.removesuffix(".log"), line.strip()) for line in lines]
    width = max(len(key) for key, _ in rows)
    print("\nGPU check summary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--source-size", type=int, default=512, help="synthetic image side, pixels")
    parser.add_argument("--image-size", type=int, default=512, help="model input side, pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--summarize", type=Path, metavar="OUT", help="print the summary table of a finished check")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = measure(args)
    (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
