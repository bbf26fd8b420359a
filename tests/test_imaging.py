"""The one decode/preprocess path: formats, bit depths, channels and every kind of bad bytes."""

import io

import numpy as np
import pytest
import tifffile
from conftest import encode

from protein_ray.imaging import (
    HPA_MEAN,
    HPA_STD,
    ImageDecodeError,
    Preprocessing,
    decode_image,
    normalize_batch,
    preprocess_batch,
    resize_images,
    scale_stain,
    scale_stains,
)
from protein_ray.spec import Stain


@pytest.fixture
def rgb8():
    return np.random.default_rng(0).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_lossless_formats_decode_exactly(rgb8, fmt):
    decoded = decode_image(encode(rgb8, fmt))
    assert decoded.dtype == np.float32 and decoded.shape == (40, 52, 3)
    np.testing.assert_allclose(decoded, rgb8 / 255.0, atol=1e-6)


def test_jpeg_decodes_close(rgb8):
    smooth = np.full((32, 32, 3), (30, 90, 200), dtype=np.uint8)
    np.testing.assert_allclose(decode_image(encode(smooth, "JPEG", quality=95)), smooth / 255.0, atol=0.02)


def test_sixteen_bit_tiff_matches_eight_bit_scale(rgb8):
    rgb16 = rgb8.astype(np.uint16) * 257  # 255 -> 65535
    np.testing.assert_allclose(decode_image(encode(rgb16, "TIFF", photometric="rgb")), rgb8 / 255.0, atol=1e-6)


def test_rgba_drops_alpha(rgb8):
    rgba = np.dstack([rgb8, np.full(rgb8.shape[:2], 7, np.uint8)])
    np.testing.assert_allclose(decode_image(encode(rgba, "PNG")), rgb8 / 255.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_scaling_all_stains_at_once_gives_each_stains_own_floats(dtype):
    # Three stains of different bit depths out of a 4-channel array: the one-pass path
    # must give every stain the floats its own scale gives it, in its own channel.
    planes = np.random.default_rng(1).integers(0, np.iinfo(dtype).max + 1, size=(30, 20, 4), dtype=dtype)
    stains = (Stain("green", bits=12), Stain("red"), Stain("blue", bits=10))
    expected = np.stack([scale_stain(planes[..., c], stain) for c, stain in enumerate(stains)], axis=-1)
    scaled = scale_stains(planes, stains)
    assert scaled.dtype == np.float32 and scaled.flags.c_contiguous
    np.testing.assert_array_equal(scaled, expected)
    assert scaled.max() == 1.0 and (dtype == np.uint8 or scaled[..., 1].max() < 1.0)


def test_real_16bit_nucleus_tiff_merges_as_blue(real_nucleus_tif):
    zeros = encode(np.zeros((512, 512), np.uint16), "TIFF")
    merged = decode_image([zeros, zeros, real_nucleus_tif])
    raw = tifffile.imread(io.BytesIO(real_nucleus_tif))
    assert raw.dtype == np.uint16 and merged.shape == (512, 512, 3)
    np.testing.assert_allclose(merged[..., 2], raw / 65535.0, atol=1e-7)
    assert merged[..., :2].max() == 0 and merged[..., 2].max() > 0


def test_sixteen_bit_png_grey_stains_merge():
    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    stain = encode(grey16, "PNG")
    merged = decode_image([stain, stain, stain])
    np.testing.assert_allclose(merged[..., 1], grey16 / 65535.0, atol=1e-7)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a picture", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not_an_image"),
    ],
)
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data)
    assert error.value.reason == reason


def test_truncated_png(rgb8):
    data = encode(rgb8, "PNG")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data[: len(data) // 2])
    assert error.value.reason == "truncated"


def test_truncated_tiff(rgb8):
    data = encode(rgb8, "TIFF")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data[:200])
    assert error.value.reason == "truncated"


@pytest.mark.parametrize("shape", [(30, 30), (30, 30, 2)])
def test_wrong_channel_count(shape):
    array = np.zeros(shape, np.uint8)
    data = encode(array, "TIFF") if len(shape) == 3 else encode(array, "PNG")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data)
    assert error.value.reason == "channels" and "expected 3" in str(error.value)


def test_too_many_pixels_refused_before_decoding(rgb8):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(encode(rgb8, "PNG"), max_pixels=100)
    assert error.value.reason == "too_large"


def test_decompression_bomb_header_refused():
    # A 20000x20000 all-black PNG compresses to a few hundred kB but would need 1.2 GB decoded.
    bomb = encode(np.zeros((20000, 20000), dtype=np.uint8), "PNG")
    with pytest.raises(ImageDecodeError) as error:
        decode_image(bomb, max_pixels=10_000_000)
    assert error.value.reason == "too_large"


def test_float_tiff_is_a_bit_depth_error():
    with pytest.raises(ImageDecodeError) as error:
        decode_image(encode(np.full((8, 8, 3), 0.5, np.float32), "TIFF", photometric="rgb"))
    assert error.value.reason == "bit_depth"


def test_stains_of_different_sizes_are_refused():
    a, b = encode(np.zeros((8, 8), np.uint8), "PNG"), encode(np.zeros((9, 8), np.uint8), "PNG")
    with pytest.raises(ImageDecodeError, match="differ in size"):
        decode_image([a, a, b])


def test_preprocess_resizes_and_normalizes(rgb8):
    image = decode_image(encode(rgb8, "PNG"))
    batch = preprocess_batch([image, image], Preprocessing(image_size=24))
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == np.float32
    mean_pixel = image.reshape(-1, 3).mean(axis=0)
    expected = (mean_pixel - np.array(HPA_MEAN)) / np.array(HPA_STD)
    np.testing.assert_allclose(batch[0].mean(axis=(1, 2)), expected, atol=0.05)


def test_augmentation_keeps_content_and_varies(rgb8):
    image = decode_image(encode(rgb8[:40, :40], "PNG"))
    spec = Preprocessing(image_size=40)
    plain = preprocess_batch([image], spec)[0]
    rng = np.random.default_rng(1)
    augmented = [normalize_batch(resize_images([image], 40), spec, augment_rng=rng)[0] for _ in range(8)]
    assert any(not np.allclose(a, plain) for a in augmented)
    for a in augmented:  # a turn/flip and a brightness scale never change the value histogram's shape much
        assert a.shape == plain.shape
        assert abs(np.corrcoef(np.sort(a.ravel()), np.sort(plain.ravel()))[0, 1]) > 0.99


def test_mixed_8_and_16_bit_stains_give_one_tensor_in_shards_and_in_scoring(real_nucleus_tif):
    """Shards store merged stains re-encoded; scoring merges the files directly.
    Both go through stack_stains, so the model sees the same numbers."""
    from protein_ray.data import encode_merged
    from protein_ray.imaging import stack_stains

    nucleus = tifffile.imread(io.BytesIO(real_nucleus_tif))
    red8 = np.random.default_rng(0).integers(0, 256, nucleus.shape, dtype=np.uint8)
    green8 = (nucleus >> 8).astype(np.uint8)
    stains = [encode(red8, "PNG"), encode(green8, "PNG"), encode(nucleus, "TIFF")]
    scored = decode_image(stains)
    from_shard = decode_image(encode_merged(stack_stains(stains)))
    np.testing.assert_array_equal(from_shard, scored)
    np.testing.assert_allclose(scored[..., 0], red8 / 255.0, atol=1e-7)  # 8-bit keeps its 0..1 meaning
    np.testing.assert_allclose(scored[..., 2], nucleus / 65535.0, atol=1e-7)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_every_truncation_of_a_file_is_a_decode_error(fmt, rgb8):
    """A file cut anywhere (header included) is an ImageDecodeError with a reason,
    never a raw OSError that escapes the callers' error handling."""
    data = encode(rgb8, fmt)
    for length in range(1, len(data), max(1, len(data) // 97)):
        with pytest.raises(ImageDecodeError) as error:
            decode_image(data[:length])
        assert error.value.reason in ("not_an_image", "truncated"), length


def test_a_32_bit_stain_beside_8_bit_ones_is_refused_not_wrapped():
    """Merging casts to 16 bits; a wider value must be an error, not wrap to a small one."""
    wide = np.zeros((8, 8), np.int32)
    wide[5, 5] = 70_000  # anywhere in the plane, not only its first pixel
    stains = [encode(np.zeros((8, 8), np.uint8), "PNG"), encode(np.zeros((8, 8), np.uint8), "PNG"),
              encode(wide, "TIFF")]
    with pytest.raises(ImageDecodeError) as error:
        decode_image(stains)
    assert error.value.reason == "bit_depth"
