"""Stacks: decoding an upload into its pages, each (H, W, C). A non-TIFF image, or a one-page
TIFF, is a stack of one page. A TIFF's pages are first walked and checked from their headers
(`imaging.tiff_pages`, the walk a job's file gets too), so no pixel is decoded for a file that
is refused. (Pages are written back as one volume by imaging.tiff_volume.)
"""

from __future__ import annotations

import io
import sys

import numpy as np
import tifffile

from unet_service.imaging.decode import TIFF_MAGIC, decode_image, standard_dtype
from unet_service.imaging.errors import CorruptImageError, ImageError
from unet_service.imaging.tiff_pages import walk_pages

DEFAULT_MAX_PAGES = 1000


def page_array(page: tifffile.TiffPage) -> np.ndarray:
    """One page as (H, W, C): the sample axis last, anything else of length 1 dropped."""
    arr = page.asarray()
    axes = page.axes
    order = [axes.index(a) for a in ("Y", "X") if a in axes]
    rest = [i for i in range(arr.ndim) if i not in order]
    arr = np.transpose(arr, order + rest)
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _tiff_pages(data: bytes, max_pixels: int | None, max_pages: int) -> list[np.ndarray] | None:
    """The pages of a multi-page TIFF, or None for a one-page TIFF (left to decode_image,
    so one page decodes exactly as it always has)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            stack = walk_pages(tif, max_pixels=max_pixels, max_pages=max_pages, file_size=len(data))
            if stack.pages == 1:
                return None
            return [page_array(tif.pages[ifd]) for ifd in stack.ifds]
    except ImageError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise CorruptImageError(f"the TIFF is truncated or corrupt: {e}") from None


def decode_pages(
    data: bytes, max_pixels: int | None = None, max_pages: int = DEFAULT_MAX_PAGES
) -> list[np.ndarray]:
    """Decode an upload into its pages, each (H, W, C) of one size, one dtype (uint8,
    uint16 or float32) and one channel count; alpha is dropped. A TIFF gives all its pages,
    any other format one. `max_pixels` bounds the pixels of all pages together, `max_pages`
    the page count; both are checked from the headers, before any pixel is decoded.

    Raises as `decode_image` does (EmptyImageError, ImageTooLargeError, CorruptImageError,
    UnsupportedImageError, ImageError), plus TooManyPagesError (an ImageTooLargeError)."""
    if data[:4] not in TIFF_MAGIC:
        return [decode_image(data, max_pixels)]
    arrays = _tiff_pages(data, max_pixels, max_pages)
    if arrays is None:
        return [decode_image(data, max_pixels)]
    return finish_pages(arrays)


def finish_pages(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """decode_image's last steps for every page, with one pixel type for all: integer
    types are mapped by the range of the whole stack, not page by page."""
    if arrays[0].shape[2] in (2, 4):  # gray+alpha, RGB+alpha
        arrays = [a[:, :, : a.shape[2] - 1] for a in arrays]
    dtype = arrays[0].dtype
    value_range = None
    if np.issubdtype(dtype, np.integer) and dtype not in (np.uint8, np.uint16):
        value_range = (min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays))
    out = []
    for index, array in enumerate(arrays, start=1):
        array = standard_dtype(array, value_range)
        if array.dtype == np.float32 and not np.isfinite(array).all():
            raise ImageError(f"page {index} has NaN or infinite pixel values")
        out.append(array)
    return out


def stored_page(data: bytes, index: int) -> np.ndarray:
    """Page `index` (from 0) of a TIFF already accepted by `decode_pages`, (H, W, C) in the
    file's own pixel type, where `decode_pages` maps it onto uint8, uint16 or float32 (32-bit
    cell ids, say)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        stack = walk_pages(tif, max_pixels=None, max_pages=sys.maxsize, file_size=len(data))
        return page_array(tif.pages[stack.ifds[index]])


def read_pages(
    path: str, max_pixels: int | None = None, max_pages: int = DEFAULT_MAX_PAGES
) -> list[np.ndarray]:
    with open(path, "rb") as f:
        return decode_pages(f.read(), max_pixels, max_pages)
