"""Decoding uploads into (H, W, C) arrays in their own integer type (uint8 / uint16) or
float32, and matching them to the model's input channels. Limits are checked from the header,
before any pixel is decoded."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from unet_service.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

# Our own pixel limit replaces Pillow's global one (checked before decoding, below).
Image.MAX_IMAGE_PIXELS = None

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Signatures of formats whose header Pillow itself may refuse (a PNG declaring zero width is
# a broken PNG, not an unknown format).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
# Float pixels are meant to lie in [0, 1]. Far beyond that (float32 reaches 3.4e38) the
# normalisation overflows and every probability becomes NaN; such images are refused with
# a clear error instead of coming back as an all-zero mask.
MAX_FLOAT_PIXEL = 1e30
# ITU-R 601-2 luma, as Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def check_pixels(height: int, width: int, max_pixels: int | None) -> None:
    """Refuse an empty image, or one over `max_pixels` (None: no limit)."""
    if height < 1 or width < 1:
        raise EmptyImageError(f"image has zero size ({height}x{width})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {height * width} pixels, more than the limit of "
            f"{max_pixels}"
        )


def check_float_range(lo: float, hi: float) -> None:
    """Refuse float pixels beyond +-MAX_FLOAT_PIXEL (`lo`, `hi`: the image's extremes)."""
    if not -MAX_FLOAT_PIXEL <= lo <= hi <= MAX_FLOAT_PIXEL:
        raise ImageError(
            f"float pixel values must be finite and within +-{MAX_FLOAT_PIXEL:g} "
            f"(this model expects them in [0, 1]); found {lo:g} .. {hi:g}"
        )


def standard_dtype(arr: np.ndarray, value_range: tuple[int, int] | None = None) -> np.ndarray:
    """Keep uint8/uint16/float32; map other types onto them without losing range (integers
    by their `value_range`, default the array's own, so that a stack's pages can share one)."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = value_range or ((int(arr.min()), int(arr.max())) if arr.size else (0, 0))
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.uint16)
        info = np.iinfo(arr.dtype)
        return ((arr.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
    # A plain ImageError (422): the file is fine, its pixel type is what we cannot use.
    raise ImageError(f"unsupported pixel type {arr.dtype}")


def _decode_tiff(data: bytes, max_pixels: int | None) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise UnsupportedImageError(
                    "TIFF file has no readable pages (truncated or corrupt?)"
                )
            page = tif.pages.first  # multi-page: the first page (imaging.pages reads all)
            axes, shape = page.axes, page.shape
            dims = dict(zip(axes, shape, strict=True))
            check_pixels(dims.get("Y", 0), dims.get("X", 0), max_pixels)
            arr = page.asarray()
    except ImageError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise UnsupportedImageError(f"cannot decode TIFF: {e}") from None
    # Put the sample axis last and drop anything else of length 1.
    order = [axes.index(a) for a in ("Y", "X") if a in axes]
    rest = [i for i in range(arr.ndim) if i not in order]
    arr = np.transpose(arr, order + rest).reshape(arr.shape[order[0]], arr.shape[order[1]], -1)
    return arr


def _decode_pillow(data: bytes, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            check_pixels(img.height, img.width, max_pixels)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise UnsupportedImageError(
            "not a supported image (PNG, JPEG, TIFF, BMP, WebP, GIF)"
        ) from None
    except Exception as e:
        raise UnsupportedImageError(f"cannot decode image (truncated or corrupt?): {e}") from None
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("1", "LA", "La", "PA"):
        img = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    return arr


def format_recognised(data: bytes) -> bool:
    """Whether the bytes start like an image we support (header only, no decoding)."""
    if data[:4] in TIFF_MAGIC or data.startswith(_SIGNATURES):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP/WebP/GIF bytes into (H, W, C); alpha is dropped. Raises
    EmptyImageError, ImageTooLargeError, CorruptImageError (a supported format that cannot
    be decoded), UnsupportedImageError (anything else) or ImageError (unusable pixels)."""
    try:
        return _decode(data, max_pixels)
    except CorruptImageError:
        raise
    except UnsupportedImageError as e:
        if format_recognised(data):
            raise CorruptImageError(f"the image is truncated or corrupt: {e}") from None
        raise


def _decode(data: bytes, max_pixels: int | None) -> np.ndarray:
    if not data:
        raise EmptyImageError("empty file")
    if data[:4] in TIFF_MAGIC:
        arr = _decode_tiff(data, max_pixels)
    else:
        arr = _decode_pillow(data, max_pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise UnsupportedImageError(f"unsupported image layout with shape {arr.shape}")
    check_pixels(arr.shape[0], arr.shape[1], max_pixels)
    if arr.shape[2] in (2, 4):  # gray+alpha, RGB+alpha
        arr = arr[:, :, : arr.shape[2] - 1]
    arr = standard_dtype(arr)
    if arr.dtype == np.float32 and not np.isfinite(arr).all():
        raise ImageError("image has NaN or infinite pixel values")
    return arr


def read_image(path: str, max_pixels: int | None = None) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read(), max_pixels)


def match_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """(H, W, C) -> (H, W, in_channels): RGB to luma for 1-channel models, gray replicated
    (as a view, no copy) for 3-channel ones."""
    channels = image.shape[2]
    if channels == in_channels:
        return image
    if channels == 1:
        return np.broadcast_to(image, (*image.shape[:2], in_channels))
    if channels == 3 and in_channels == 1:
        out = np.empty((*image.shape[:2], 1), dtype=image.dtype)
        for r in range(0, image.shape[0], 1024):  # bounded temporaries for huge images
            luma = image[r : r + 1024].astype(np.float32) @ _LUMA
            if image.dtype != np.float32:
                luma = np.rint(luma)
            out[r : r + 1024, :, 0] = luma
        return out
    raise ImageError(f"image has {channels} channels, the model expects {in_channels}")


def media_type_of(path: Path) -> str:
    """The input's media type from its header: TIFF by its magic (Pillow is not how TIFFs
    are read here), the rest as Pillow names them."""
    with open(path, "rb") as f:
        if f.read(4) in TIFF_MAGIC:
            return "image/tiff"
    try:
        with Image.open(path) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"
