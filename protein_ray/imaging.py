"""The one preprocessing path: bytes -> float image -> model tensor.

Training validation, batch scoring and Serve all call ``decode_image`` and
``preprocess_batch`` so that the same bytes become the same tensor everywhere
(DESIGN.md section 3). Decoding never trusts its input: every failure is an
``ImageDecodeError`` whose ``reason`` is a short machine-readable code and whose
message says what was wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

# Real HPA-style PNGs are 512x512; a 40-megapixel cap leaves room for large plate
# fields while refusing decompression bombs before any pixel is allocated.
MAX_PIXELS = 40_000_000
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Channel statistics of the real Kaggle PNGs on a 0-1 scale (DESIGN.md section 9).
HPA_MEAN = (0.079, 0.053, 0.054)
HPA_STD = (0.149, 0.113, 0.156)
HPA_STAINS = ("red", "green", "blue")  # microtubules, protein of interest, nucleus


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model's input: the one description that
    training writes into every checkpoint and that collation, bulk scoring, Serve
    and ``Predictor`` all take."""

    image_size: int
    mean: tuple[float, ...] = HPA_MEAN
    std: tuple[float, ...] = HPA_STD
    stains: tuple[str, ...] = HPA_STAINS  # channel order of the model's input

    def __post_init__(self):
        # JSON gives lists; frozen dataclasses compare (and hash) only with tuples.
        for name in ("mean", "std", "stains"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.mean) == len(self.std) == len(self.stains):
            raise ValueError(f"mean, std and stains differ in length: {self.mean}, {self.std}, {self.stains}")

    @property
    def channels(self) -> int:
        return len(self.stains)

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}



class ImageDecodeError(ValueError):
    """Bytes that cannot become a 3-channel image. ``reason`` is one of:
    empty, not_an_image, truncated, channels, bit_depth, too_large, shape_mismatch."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded PNG/TIFF/JPEG bytes -> float32 array (H, W, 3) scaled to 0..1.

    8-bit images are divided by 255 and 16-bit by 65535, so the same picture saved
    at either depth gives (nearly) the same array. RGBA drops alpha. Single
    channel images are refused here: per-stain files go through ``merge_channels``.
    """
    pixels = decode_raw(data, max_pixels)
    return to_rgb_float(pixels)


def decode_raw(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes -> integer pixel array (H, W) or (H, W, C), without scaling."""
    if not data:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    if data[:4] in TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    return _decode_with_pillow(data, max_pixels)


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            _check_pixel_count(int(np.prod(page.shape[:2])), max_pixels)
            return page.asarray()
    except ImageDecodeError:
        raise
    except Exception as error:  # tifffile raises many types on bad input
        raise ImageDecodeError("truncated", f"cannot read TIFF data ({error})") from None


def _decode_with_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "not a PNG, TIFF or JPEG image") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too_large", str(error)) from None
    _check_pixel_count(image.width * image.height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError("truncated", f"image data is truncated or corrupt ({error})") from None
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16)
    elif image.mode == "I":
        return np.asarray(image).astype(np.int64)
    return np.asarray(image)


def _check_pixel_count(pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image has {pixels:,} pixels; the limit is {max_pixels:,}"
        )


def scale_to_unit(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels -> float32 on 0..1 (8-bit /255, 16-bit /65535)."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16 or (pixels.dtype.kind in "iu" and pixels.max(initial=0) <= 65535 and pixels.min(initial=0) >= 0):
        return pixels.astype(np.float32) / 65535.0
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    raise ImageDecodeError("bit_depth", f"unsupported pixel type {pixels.dtype}; expected 8- or 16-bit")


def to_rgb_float(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4) and pixels.shape[-1] not in (3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar TIFF (C, H, W)
    channels = 1 if pixels.ndim == 2 else pixels.shape[-1]
    if pixels.ndim not in (2, 3) or channels not in (3, 4):
        raise ImageDecodeError(
            "channels",
            f"image has {channels} channel(s) (shape {tuple(pixels.shape)}); expected 3 (RGB) or 4 (RGBA). "
            "Single-stain files must be merged: name them <id>_red/_green/_blue.",
        )
    return scale_to_unit(np.ascontiguousarray(pixels[..., :3]))


def merge_channels(stains: Sequence[bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Per-stain grayscale files (in the model's stain order) -> float32 (H, W, C)."""
    return scale_to_unit(stack_stains(stains, max_pixels))


def stack_stains(stains: Sequence[bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Per-stain grayscale files -> one integer (H, W, C) array, losslessly.

    The one stain-merge path: scoring scales this array to 0..1 and the shard
    writer encodes it, so both give the same tensor. Stains of mixed depth share
    the 16-bit scale: an 8-bit plane is multiplied by 257, which maps 255 to 65535
    and keeps ``x / 255 == 257 x / 65535`` exactly."""
    planes = [_stain_plane(decode_raw(data, max_pixels)) for data in stains]
    if len({p.shape for p in planes}) != 1:
        raise ImageDecodeError("shape_mismatch", f"stain files differ in size: {[p.shape for p in planes]}")
    if all(p.dtype == np.uint8 for p in planes):
        return np.stack(planes, axis=-1)
    for plane in planes:
        scale_to_unit(plane[:1, :1])  # refuses pixel types that are neither 8- nor 16-bit
    return np.stack([p.astype(np.uint16) * (257 if p.dtype == np.uint8 else 1) for p in planes], axis=-1)


def _stain_plane(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., 0]  # a grey image saved as RGB carries the same value thrice
    if pixels.ndim != 2:
        raise ImageDecodeError("channels", f"a stain file has shape {tuple(pixels.shape)}; expected one channel")
    return pixels


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float -> (N, 3, size, size), antialiased so that downsampling
    keeps small bright structures (dots, speckles) instead of aliasing them away."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def preprocess_batch(images: Sequence[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Float (H, W, C) images on 0..1 -> normalized float32 array (N, C, size, size):
    ``resize_images`` then ``normalize_batch``. Training calls the two steps apart so
    that it can cache the resized images and augment them afresh every epoch."""
    return normalize_batch(resize_images(images, spec.image_size), spec)


def resize_images(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Float (H, W, C) images on 0..1 -> float32 array (N, C, size, size) on 0..1."""
    resized = [
        resize_batch(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None], size)[0]
        for img in images
    ]
    return torch.stack(resized).numpy() if resized else np.empty((0, 3, size, size), np.float32)


def normalize_batch(batch: np.ndarray, spec: Preprocessing, augment_rng: np.random.Generator | None = None) -> np.ndarray:
    """(N, C, S, S) on 0..1 -> normalized float32. With ``augment_rng`` (training only)
    each image is augmented first, on the 0..1 scale, so intensity changes mean what
    they say."""
    if augment_rng is not None:
        batch = augment_batch(batch, augment_rng)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((batch - mean) / std).astype(np.float32)


def augment_batch(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Microscopy-safe augmentation of a 0..1 (N, 3, S, S) batch: cells have no up
    or orientation, so flips and 90-degree turns are free; stain intensity varies
    between acquisitions, so each image gets a small brightness scale."""
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        image = np.rot90(image, k=int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            image = image[:, :, ::-1]
        out[i] = image * np.float32(rng.uniform(0.85, 1.15))
    return out
