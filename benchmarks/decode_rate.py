"""Decode cost per core of real microscope files against the Kaggle PNGs.

One process, one thread: the per-core rate of ``imaging.decode_image`` +
``preprocess_batch`` for (a) a 512-px 8-bit RGB PNG (the Kaggle images) and
(b) one 2,160-px 12-bit field as four LZW-compressed 16-bit TIFFs (an HPA-style
4-stain export), resized to the model's 256 px. Prints images/s and the ratio.

    python benchmarks/decode_rate.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import tifffile
import torch
from PIL import Image

from protein_ray.imaging import Preprocessing, decode_image, preprocess_batch
from protein_ray.spec import Stain
from protein_ray.synthetic_cells import render_stains


def rate(decode, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode()
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(np.rint(render_stains([4, 6], 512, rng)[..., :3] * 255).astype(np.uint8)).save(png, "PNG")
    field = render_stains([4, 6], 2160, rng)
    tiffs = []
    for c in range(4):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, np.rint(field[..., c] * 4095).astype(np.uint16), compression="lzw")
        tiffs.append(buffer.getvalue())
    rgb, rgby = Preprocessing(256), Preprocessing(256, (0.1,) * 4, (0.2,) * 4, [Stain(n, 12) for n in "rgby"])
    png_rate = rate(lambda: preprocess_batch([decode_image(png.getvalue(), rgb.stains)], rgb), args.seconds)
    tiff_rate = rate(lambda: preprocess_batch([decode_image(tiffs, rgby.stains)], rgby), args.seconds)
    print(f"512-px 8-bit RGB PNG ({len(png.getvalue()) / 1e3:.0f} KB): {png_rate:.1f} images/s per core")
    print(f"2160-px 12-bit field, 4 LZW TIFFs ({sum(map(len, tiffs)) / 1e6:.1f} MB): {tiff_rate:.2f} fields/s per core "
          f"({1000 / tiff_rate:.0f} ms each)")
    print(f"ratio: a 2160-px 4-stain field costs {png_rate / tiff_rate:.1f}x a Kaggle PNG to decode and resize")


if __name__ == "__main__":
    main()
