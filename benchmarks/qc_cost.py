"""What per-field image QC adds to the decode stage, per core.

One process: the time of ``imaging.decode_image`` and of ``qc.field_measures``
on its output, per image, for (a) 512-px 8-bit RGB PNGs from the synthetic
generator and (b) 2,160-px fields of four 12-bit LZW TIFFs from the synthetic
ImageXpress export (an HPA-style 4-stain field). QC runs on every field in the
decode stage, so its cost should be a small fraction of decoding (target < 10%).
The images cycle: timing one image again and again flatters ``np.partition``,
whose branches learn a repeated input.

    python benchmarks/qc_cost.py [--seconds 5] [--pngs 8] [--fields 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from protein_ray.imaging import decode_image
from protein_ray.qc import field_measures
from protein_ray.spec import Stain
from protein_ray.synthetic import write_kaggle_dataset
from protein_ray.synthetic_exports import write_imagexpress_export


def per_image_ms(work, inputs: list, seconds: float) -> float:
    """Mean ms per call of ``work`` over ``inputs`` in turn, for about ``seconds`` (at least one round)."""
    done, started = 0, time.perf_counter()
    while done < len(inputs) or time.perf_counter() - started < seconds:
        work(inputs[done % len(inputs)])
        done += 1
    return (time.perf_counter() - started) / done * 1000


def png_files(folder: Path, count: int) -> list[bytes]:
    """``count`` synthetic 512-px 8-bit RGB PNGs, as the generator writes them (Kaggle layout)."""
    write_kaggle_dataset(folder, n_train=count, n_test=0, size=512, seed=0, progress=False)
    return [path.read_bytes() for path in sorted((folder / "train").glob("*.png"))]


def tiff_fields(folder: Path, count: int) -> list[list[bytes]]:
    """``count`` fields of a synthetic ImageXpress export: four 2,160-px 12-bit LZW TIFFs each."""
    write_imagexpress_export(folder, wells=["B03"], fields=count, size=2160, seed=0, progress=False)
    return [[(folder / "P001" / f"P001_B03_s{site}_w{channel}.TIF").read_bytes() for channel in (1, 2, 3, 4)]
            for site in range(1, count + 1)]


def measure(name: str, files: list, stains: list[Stain], seconds: float) -> tuple[str, float, float]:
    decoded = [decode_image(data, stains) for data in files]
    decode_ms = per_image_ms(lambda data: decode_image(data, stains), files, seconds)
    qc_ms = per_image_ms(field_measures, decoded, seconds)
    return name, decode_ms, qc_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="time each measurement at least this long")
    parser.add_argument("--pngs", type=int, default=8, help="distinct 512-px PNGs to cycle through")
    parser.add_argument("--fields", type=int, default=2, help="distinct 2,160-px fields (rendering takes ~10 s each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pngs = png_files(Path(tmp) / "plate", args.pngs)
        tiffs = tiff_fields(Path(tmp) / "export", args.fields)
    rows = [
        measure(f"512-px 8-bit RGB PNG ({np.mean([len(p) for p in pngs]) / 1e3:.0f} KB)",
                pngs, [Stain(s) for s in ("red", "green", "blue")], args.seconds),
        measure(f"2160-px field, 4 x 12-bit LZW TIFF ({np.mean([sum(map(len, t)) for t in tiffs]) / 1e6:.1f} MB)",
                tiffs, [Stain(s, bits=12) for s in ("dapi", "green", "red", "far_red")], args.seconds),
    ]
    print(f"{'image':48s} {'decode ms':>10s} {'qc ms':>8s} {'qc/decode':>10s}")
    for name, decode_ms, qc_ms in rows:
        print(f"{name:48s} {decode_ms:10.2f} {qc_ms:8.2f} {qc_ms / decode_ms:10.1%}")


if __name__ == "__main__":
    main()
