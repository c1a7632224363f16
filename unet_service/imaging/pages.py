"""Stacks: decoding an upload into its pages, each (H, W, C). A non-TIFF image, or a one-page
TIFF, is a stack of one page. (Pages are written back as one volume by imaging.tiff_volume.)

A TIFF's pages are a chain of headers (IFDs), each pointing at the next, so a crafted file
can claim or chain any number of them. The chain is therefore walked one header at a time
and the walk stops as soon as the page count or the pixels counted so far pass the limits:
no pixel is decoded, and nothing is allocated for pages beyond the limits. Every page is
checked (size, pixel type, channels, tile or strip shape) before any is decoded. A chain
that ends in a bad offset or loops back (a truncated or corrupt file) is an error, not a
shorter stack: `imaging.tiff_chain`, which the section jobs' reader walks with too.
"""

from __future__ import annotations

import io
import re

import numpy as np
import tifffile

from unet_service.imaging.decode import (
    TIFF_MAGIC,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    TooManyPagesError,
    check_pixels,
    decode_image,
    standard_dtype,
)
from unet_service.imaging.tiff_chain import PageChain
from unet_service.imaging.tiff_layout import check_chunk_shape

DEFAULT_MAX_PAGES = 1000
# The image count an ImageJ description or an OME-XML header declares.
_IMAGEJ_COUNTS = ("channels", "slices", "frames")
_OME_SIZES = re.compile(rb'\bSize([CZT])="(\d+)"')


def declared_pages(tif: tifffile.TiffFile, max_pages: int) -> int | None:
    """The page count the file's own metadata declares (ImageJ or OME), refusing at once
    a count over the limit and stacks with more than one non-spatial axis."""
    first = tif.pages.first
    counts: dict[str, int] = {}
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        counts = {k: int(meta.get(k, 1)) for k in _IMAGEJ_COUNTS}
        declared = int(meta.get("images", 1))
    elif tif.is_ome:
        found = {k.decode(): int(v) for k, v in _OME_SIZES.findall(first.description.encode())}
        samples = first.samplesperpixel
        # Interleaved RGB is one page holding SizeC = 3 samples, not three pages.
        if found.get("C", 1) == samples:
            found["C"] = 1
        counts = {"C": found.get("C", 1), "Z": found.get("Z", 1), "T": found.get("T", 1)}
        declared = counts["C"] * counts["Z"] * counts["T"]
    else:
        return None
    if declared > max_pages:
        raise TooManyPagesError(
            f"the TIFF declares {declared} pages, more than the limit of {max_pages}"
        )
    axes = {k: v for k, v in counts.items() if v > 1}
    if len(axes) > 1:
        shown = " x ".join(f"{v} {k}" for k, v in axes.items())
        raise ImageError(
            f"the TIFF is a hyperstack ({shown}); send a plain stack of pages with one "
            "non-spatial axis (e.g. slices only), one image per page"
        )
    return declared


def _page_array(page: tifffile.TiffPage) -> np.ndarray:
    """One page as (H, W, C): the sample axis last, anything else of length 1 dropped."""
    arr = page.asarray()
    axes = page.axes
    order = [axes.index(a) for a in ("Y", "X") if a in axes]
    rest = [i for i in range(arr.ndim) if i not in order]
    arr = np.transpose(arr, order + rest)
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _describe(page: tifffile.TiffPage) -> tuple[int, int, int, np.dtype]:
    dims = dict(zip(page.axes, page.shape, strict=True))
    height, width = dims.get("Y", 0), dims.get("X", 0)
    channels = max(1, int(np.prod(page.shape)) // max(1, height * width))
    return height, width, channels, page.dtype


def _tiff_pages(data: bytes, max_pixels: int | None, max_pages: int) -> list[np.ndarray] | None:
    """The pages of a multi-page TIFF, or None for a one-page TIFF (left to decode_image,
    so one page decodes exactly as it always has)."""
    try:
        with PageChain() as chain, tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise CorruptImageError("the TIFF has no readable pages (truncated or corrupt?)")
            declared = declared_pages(tif, max_pages)
            pages: list[tifffile.TiffPage] = []
            first: tuple[int, int, int, np.dtype] | None = None
            total = 0
            # Walk the chain one header at a time; never len(tif.pages), which walks it all.
            for index, page in enumerate(tif.pages, start=1):
                if index > max_pages:
                    raise TooManyPagesError(
                        f"the TIFF has more than the limit of {max_pages} pages"
                    )
                chain.visit(page, index)
                if getattr(page, "is_reduced", False) and pages:
                    continue  # a thumbnail or preview after the image, not a page of it
                check_chunk_shape(page, index - 1)
                height, width, channels, dtype = _describe(page)
                if first is None:  # one page alone gets decode_image's own words
                    check_pixels(height, width, max_pixels)
                    first = (height, width, channels, dtype)
                elif (height, width) != first[:2]:
                    raise ImageError(
                        f"page {index} is {width}x{height} but page 1 is "
                        f"{first[1]}x{first[0]}; all pages of a stack must have one size"
                    )
                elif (channels, dtype) != first[2:]:
                    raise ImageError(
                        f"page {index} has {channels} channel(s) of {dtype}, page 1 "
                        f"{first[2]} of {first[3]}; all pages of a stack must match"
                    )
                total += height * width
                if max_pixels is not None and total > max_pixels:
                    raise ImageTooLargeError(
                        f"the stack's first {index} pages of {width}x{height} hold {total} "
                        f"pixels, more than the limit of {max_pixels} (all pages count)"
                    )
                pages.append(page)
            chain.check_end(tif, page, len(pages))
            if declared is not None and declared not in (1, len(pages)):
                raise CorruptImageError(
                    f"the TIFF declares {declared} pages but holds {len(pages)} (truncated "
                    "or corrupt?)"
                )
            if len(pages) == 1:
                return None
            arrays = [_page_array(page) for page in pages]
    except ImageError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise CorruptImageError(f"the TIFF is truncated or corrupt: {e}") from None
    return arrays


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
    return _finish_pages(arrays)


def _finish_pages(arrays: list[np.ndarray]) -> list[np.ndarray]:
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


def read_pages(
    path: str, max_pixels: int | None = None, max_pages: int = DEFAULT_MAX_PAGES
) -> list[np.ndarray]:
    with open(path, "rb") as f:
        return decode_pages(f.read(), max_pixels, max_pages)


__all__ = [
    "DEFAULT_MAX_PAGES",
    "EmptyImageError",
    "TooManyPagesError",
    "decode_pages",
    "read_pages",
]
