"""The one preprocessing path: bytes -> float image -> model pixels -> model tensor.

Training validation, batch scoring and Serve all call ``decode_image``,
``prepare_batch`` and ``normalize_batch`` so that the same bytes become the same
tensor everywhere (DESIGN.md section 3). What travels between the decode stage and
the model stage (Ray Data blocks, Serve's ingress-to-model hop, training's cache)
is the *model pixels* of ``prepare_batch``: resized images as unsigned integers
(uint8 for 8-bit stains, a quarter of float32's bytes; uint16 where a stain has more
bits), turned into float and normalized only next to the model. Decoding never trusts its input: every failure is an
``ImageDecodeError`` whose ``reason`` is a short machine-readable code and whose
message says what was wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import imagecodecs
import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from protein_ray.defaults import MAX_PIXELS
from protein_ray.spec import HPA_MEAN, HPA_STD, RGB, Stain

# The decoded array of the largest image allowed: RGBA at 16 bits. A TIFF with many
# samples per pixel or 64-bit samples is refused before it is decoded whole.
MAX_BYTES_PER_PIXEL = 4 * 2
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Preprocessing:
    """How decoded stains become the model's input: the one description that
    training writes into every checkpoint and that collation, bulk scoring, Serve
    and ``Predictor`` all take."""

    image_size: int
    mean: tuple[float, ...] = HPA_MEAN
    std: tuple[float, ...] = HPA_STD
    stains: tuple[Stain, ...] = RGB  # the model's input channels, in order, with their scaling

    def __post_init__(self):
        # JSON gives lists and dicts; frozen dataclasses compare (and hash) only with tuples.
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        object.__setattr__(self, "stains", tuple(Stain.of(s) for s in self.stains))
        if not len(self.mean) == len(self.std) == len(self.stains):
            raise ValueError(f"mean, std and stains differ in length: {self.mean}, {self.std}, {self.stain_names}")

    @property
    def channels(self) -> int:
        return len(self.stains)

    @property
    def stain_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stains)

    @property
    def pixel_dtype(self) -> type[np.unsignedinteger]:
        """The model pixels' type: uint8 when every stain means 8-bit data (the model
        then saw 256 levels per stain in training: a finer step carries nothing it
        learnt), uint16 when a stain has more bits or is stretched per image."""
        eight_bit = all(s.scaling == "bits" and s.bits in (None, 8) for s in self.stains)
        return np.uint8 if eight_bit else np.uint16

    def with_bits(self, bits: int | None) -> "Preprocessing":
        """The same spec with every stain's 16-bit data read as ``bits``-bit (``--bit-depth``)."""
        if bits is None:
            return self
        return replace(self, stains=tuple(replace(s, bits=bits, scaling="bits") for s in self.stains))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "stains": [asdict(s) for s in self.stains]}


class ImageDecodeError(ValueError):
    """Bytes that cannot become the model's stains. ``reason`` is one of: empty,
    not_an_image, truncated, channels, bit_depth, too_large, shape_mismatch, missing_stain."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


def decode_image(data: bytes | Sequence[bytes], stains: Sequence[Stain] = RGB,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The one decode: one merged file, or one file per stain in ``stains`` order
    -> float32 (H, W, C) on 0..1, each stain scaled as its ``Stain`` says.

    8-bit pixels are divided by 255 and 16-bit by 2**bits - 1 (65535 unless the
    stain says 12 or so), so the same picture at either depth gives (nearly) the
    same array. A merged file gives its first C channels (RGBA drops alpha for an
    RGB model); a merged file with fewer channels than stains is refused.
    """
    files = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    planes = stack_stains(files, max_pixels) if len(files) > 1 else merged_planes(decode_raw(files[0], max_pixels))
    if planes.shape[-1] < len(stains):
        raise ImageDecodeError(
            "channels",
            f"image has {planes.shape[-1]} channel(s) (shape {tuple(planes.shape)}); expected {len(stains)} "
            f"stains ({', '.join(s.name for s in stains)}). Single-stain files must be merged: "
            f"name them <id>_<stain> or pass one file per stain.",
        )
    return scale_stains(planes, stains)


def scale_stains(planes: np.ndarray, stains: Sequence[Stain]) -> np.ndarray:
    """Integer (H, W, C) stains -> float32 (H, W, C) on 0..1, each as its ``Stain`` says
    (decoded files and OME-Zarr fields alike)."""
    every_stain_by_bits = all(stain.scaling == "bits" for stain in stains)
    if planes.dtype in (np.uint8, np.uint16) and every_stain_by_bits and planes.shape[-1] >= len(stains):
        planes = planes[..., :len(stains)]
        # Every stain scaled by its bit depth: one pass over the interleaved pixels with
        # scale_stain's arithmetic (the same floats), 2.8x faster on a 512-px RGB field
        # than a strided pass per stain and a stack (0.75 against 2.1 ms).
        if planes.dtype == np.uint8:
            return planes.astype(np.float32) / 255.0
        full_scales = np.array([2 ** (stain.bits or 16) - 1 for stain in stains], np.float32)
        return np.minimum(planes.astype(np.float32) / full_scales, 1.0)
    return np.stack([scale_stain(planes[..., c], stain) for c, stain in enumerate(stains)], axis=-1)


def merged_planes(pixels: np.ndarray) -> np.ndarray:
    """A decoded merged file -> (H, W, C): planar TIFFs (C, H, W) are turned;
    a single-channel image is (H, W, 1)."""
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.ndim == 3 and pixels.shape[0] <= 8 < min(pixels.shape[1:]) and pixels.shape[-1] > 8:
        return np.moveaxis(pixels, 0, -1)  # planar TIFF (C, H, W)
    if pixels.ndim != 3:
        raise ImageDecodeError("channels", f"image has shape {tuple(pixels.shape)}; expected (H, W[, C])")
    return pixels


def scale_stain(plane: np.ndarray, stain: Stain) -> np.ndarray:
    """One stain's integer pixels -> float32 on 0..1, as ``stain`` says."""
    if stain.scaling == "percentile":
        low, high = np.percentile(plane, (0.1, 99.9))
        if high <= low:
            return np.zeros(plane.shape, np.float32)
        return np.clip((plane.astype(np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    if plane.dtype == np.uint8 or plane.dtype == np.bool_:
        return plane.astype(np.float32) / (255.0 if plane.dtype == np.uint8 else 1.0)
    check_bit_depth(plane)
    full_scale = 2 ** (stain.bits or 16) - 1
    return np.minimum(plane.astype(np.float32) / np.float32(full_scale), 1.0)


def check_bit_depth(plane: np.ndarray) -> None:
    """Refuse pixels that are not 8- or 16-bit integers (float TIFFs, 32-bit values)."""
    if plane.dtype in (np.uint8, np.uint16, np.bool_):
        return
    if plane.dtype.kind not in "iu" or plane.min(initial=0) < 0 or plane.max(initial=0) > 65535:
        raise ImageDecodeError("bit_depth", f"unsupported pixel type {plane.dtype}; expected 8- or 16-bit")


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
            # Width x height from the tags, whatever the planar configuration: shape[:2] of a
            # planar (C, H, W) page would count C x H.
            pixels = int(page.imagewidth) * int(page.imagelength)
            _check_decode_size(pixels, int(page.samplesperpixel), np.dtype(page.dtype).itemsize, max_pixels)
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
    except (OSError, SyntaxError, ValueError) as error:  # a header cut short: Pillow's "Truncated File Read"
        raise ImageDecodeError("truncated", f"image header is truncated or corrupt ({error})") from None
    # Pillow's images hold at most 4 samples of 2 bytes (or 1 of 4) per pixel, within the
    # byte budget of ``max_pixels`` pixels: only the pixel count can refuse one.
    _check_pixel_count(image.width * image.height, max_pixels)
    if image.format == "PNG" and image.mode in FAST_PNG_MODES:
        return _decode_png(data)
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


# PNGs that libpng (through imagecodecs) decodes straight to the array Pillow would
# give, 1.7x faster on the 512-px RGB fields here (benchmarks/decode_rate.py); a
# 16-bit RGB PNG keeps its 16 bits, which Pillow would cut to 8. Palette and other
# modes go through Pillow.
FAST_PNG_MODES = frozenset({"L", "RGB", "RGBA", "I;16", "I;16B", "I;16L"})


def _decode_png(data: bytes) -> np.ndarray:
    try:
        return imagecodecs.png_decode(data)
    except imagecodecs.PngError as error:
        raise ImageDecodeError("truncated", f"image data is truncated or corrupt ({error})") from None


def _check_pixel_count(pixels: int, max_pixels: int) -> None:
    """Refuse, before any pixel is allocated, an image with too many pixels."""
    if pixels > max_pixels:
        raise ImageDecodeError("too_large", f"image has {pixels:,} pixels; the limit is {max_pixels:,}")


def _check_decode_size(pixels: int, samples: int, itemsize: int, max_pixels: int) -> None:
    """Refuse, before any pixel is allocated, an image with too many pixels, or whose
    samples (stains, planes) and sample size make its decoded array larger than the
    largest image allowed: ``max_pixels`` of 4 samples (RGBA) at 16 bits."""
    _check_pixel_count(pixels, max_pixels)
    needed, budget = pixels * samples * itemsize, max_pixels * MAX_BYTES_PER_PIXEL
    if needed > budget:
        raise ImageDecodeError(
            "too_large", f"decoding needs {needed / 2**20:,.0f} MiB ({samples} samples of {itemsize} bytes per "
            f"pixel); the limit is {budget / 2**20:,.0f} MiB")


def stack_stains(stains: Sequence[bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Per-stain grayscale files -> one integer (H, W, C) array, losslessly.

    The one stain-merge path: ``decode_image`` scales this array to 0..1 and the
    shard writer encodes it, so both give the same tensor. Stains of mixed depth
    share the 16-bit scale: an 8-bit plane is multiplied by 257, which maps 255 to
    65535 and keeps ``x / 255 == 257 x / 65535`` exactly."""
    planes = [_stain_plane(decode_raw(data, max_pixels)) for data in stains]
    if len({p.shape for p in planes}) != 1:
        raise ImageDecodeError("shape_mismatch", f"stain files differ in size: {[p.shape for p in planes]}")
    if all(p.dtype == np.uint8 for p in planes):
        return np.stack(planes, axis=-1)
    for plane in planes:
        check_bit_depth(plane)  # before the cast to uint16, which would wrap wider values silently
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
    if min(images.shape[-2:]) >= 4 * size:
        # Large fields (1-2.5k px to a few hundred): area averaging over each output
        # pixel's footprint keeps the mean intensity and costs one pass.
        return F.adaptive_avg_pool2d(images, (size, size))
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def preprocess_batch(images: Sequence[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Float (H, W, C) images on 0..1 -> normalized float32 array (N, C, size, size):
    ``prepare_batch`` then ``normalize_batch``, in one process. The stages of bulk
    scoring, Serve and training call the two steps apart: the model pixels between
    them are what travels (and what training caches and augments afresh every epoch)."""
    return normalize_batch(prepare_batch(images, spec), spec)


def prepare_batch(images: Sequence[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """Float (H, W, C) images on 0..1 -> model pixels (N, C, size, size) of
    ``spec.pixel_dtype``: resized, then rounded to the type's full scale."""
    return to_pixels(resize_images(images, spec.image_size), spec.pixel_dtype)


def to_pixels(batch: np.ndarray, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """(N, C, S, S) on 0..1 -> unsigned integers, 0..1 spanning the type's range."""
    full_scale = np.iinfo(dtype).max
    return np.rint(np.clip(batch, 0, 1) * full_scale).astype(dtype)


def from_pixels(pixels: np.ndarray) -> np.ndarray:
    """Model pixels -> float32 on 0..1 (float input is taken as 0..1 already)."""
    if pixels.dtype.kind == "f":
        return pixels.astype(np.float32, copy=False)
    return pixels.astype(np.float32) * np.float32(1.0 / np.iinfo(pixels.dtype).max)


def resize_images(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Float (H, W, C) images on 0..1 -> float32 array (N, C, size, size) on 0..1."""
    # Channels first in memory: torch's antialiased resize then gives the same floats
    # 1.3x faster than on the (H, W, C) layout (2.3 against 3.1 ms for 512 -> 256 px).
    resized = [
        resize_batch(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None], size)[0]
        for img in images
    ]
    return torch.stack(resized).numpy() if resized else np.empty((0, 3, size, size), np.float32)


def normalize_batch(pixels: np.ndarray, spec: Preprocessing, augment_rng: np.random.Generator | None = None) -> np.ndarray:
    """Model pixels (N, C, S, S) -> normalized float32. With ``augment_rng`` (training
    only) each image is augmented first, on the 0..1 scale, so intensity changes mean
    what they say."""
    batch = from_pixels(pixels)
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
