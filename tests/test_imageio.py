"""Decoding the image formats users upload, and the errors for what is not an image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_service.imaging.decode import decode_image, match_channels
from unet_service.imaging.errors import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def tiff(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def test_gray_png_keeps_uint8(em_slice: np.ndarray) -> None:
    out = decode_image(encode(em_slice, "PNG"))
    assert out.shape == (512, 512, 1) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], em_slice)


def test_16bit_png_and_tiff_keep_uint16(em_slice: np.ndarray) -> None:
    deep = em_slice.astype(np.uint16) * 257
    for data in (encode(deep, "PNG"), tiff(deep)):
        out = decode_image(data)
        assert out.dtype == np.uint16 and np.array_equal(out[..., 0], deep)


def test_decode_image_gives_a_multipage_tiffs_first_page() -> None:
    # decode_image is the one-image reader (training data); imaging.pages reads every page.
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        for i in range(3):
            writer.write(np.full((20, 30), i * 1000, np.uint16), photometric="minisblack")
    assert len(tifffile.TiffFile(io.BytesIO(buf.getvalue())).pages) == 3
    out = decode_image(buf.getvalue())
    assert out.shape == (20, 30, 1) and (out == 0).all()


def test_planar_rgb_tiff() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (3, 16, 24), dtype=np.uint8)
    out = decode_image(tiff(rgb, photometric="rgb", planarconfig="separate"))
    assert out.shape == (16, 24, 3) and np.array_equal(out, rgb.transpose(1, 2, 0))


def test_rgb_rgba_palette_jpeg_bmp_webp() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((12, 10), 7, np.uint8)])
    assert np.array_equal(decode_image(encode(rgb, "PNG")), rgb)
    assert np.array_equal(decode_image(encode(rgba, "PNG")), rgb)  # alpha dropped
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert np.array_equal(decode_image(buf.getvalue()), np.asarray(palette.convert("RGB")))
    for fmt in ("JPEG", "BMP", "WEBP"):
        out = decode_image(encode(rgb, fmt))
        assert out.shape == (12, 10, 3) and out.dtype == np.uint8


def test_float_tiff_stays_float() -> None:
    arr = np.linspace(0, 1, 50, dtype=np.float64).reshape(5, 10)
    out = decode_image(tiff(arr))
    assert out.dtype == np.float32 and np.allclose(out[..., 0], arr)


def test_float_image_with_nan_is_refused() -> None:
    arr = np.zeros((4, 4), np.float32)
    arr[1, 2] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        decode_image(tiff(arr))


def test_errors() -> None:
    with pytest.raises(EmptyImageError):
        decode_image(b"")
    with pytest.raises(UnsupportedImageError, match="not a supported image"):
        decode_image(b"hello, this is text")
    png = encode(np.zeros((64, 64), np.uint8) + np.arange(64, dtype=np.uint8), "PNG")
    with pytest.raises(UnsupportedImageError, match="truncated"):
        decode_image(png[: len(png) // 2])
    with pytest.raises(UnsupportedImageError):
        decode_image(b"II*\x00" + b"\x00" * 20)  # TIFF magic, nothing behind it
    assert issubclass(ImageTooLargeError, ImageError)
    # A well-formed file with pixels we cannot use is not "truncated or corrupt".
    with pytest.raises(ImageError, match="unsupported pixel type complex64") as info:
        decode_image(tiff(np.ones((8, 8), np.complex64)))
    assert not isinstance(info.value, UnsupportedImageError)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A 20000x20000 PNG of zeros compresses to ~1 MB; the header alone must reject it.
    img = Image.new("L", (20000, 20000))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    with pytest.raises(ImageTooLargeError, match="400000000 pixels"):
        decode_image(buf.getvalue(), max_pixels=10_000_000)
    big_tiff = tiff(np.zeros((300, 400), np.uint8))
    with pytest.raises(ImageTooLargeError):
        decode_image(big_tiff, max_pixels=1000)


def test_match_channels() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [10, 10, 10]]], np.uint8)
    gray = match_channels(rgb, 1)
    assert gray.shape == (1, 3, 1)
    assert gray[0, :, 0].tolist() == [76, 150, 10]  # ITU-R 601 luma, as Pillow's "L"
    assert gray[0, :, 0].tolist() == list(np.asarray(Image.fromarray(rgb).convert("L"))[0])
    g = np.zeros((4, 5, 1), np.uint16)
    assert match_channels(g, 3).shape == (4, 5, 3)
    with pytest.raises(ImageError, match="3 channels, the model expects 2"):
        match_channels(rgb, 2)


@pytest.mark.parametrize("compression", ["lzw", "packbits", "zlib", "zstd"])
def test_compressed_tiffs_as_microscopes_write_them(em_slice, compression: str) -> None:
    deep = em_slice.astype(np.uint16) * 257
    buf = io.BytesIO()
    tifffile.imwrite(buf, deep, compression=compression)
    out = decode_image(buf.getvalue())
    assert out.dtype == np.uint16 and np.array_equal(out[..., 0], deep)
