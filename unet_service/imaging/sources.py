"""Where an image's pixels come from: a `Source` is a stack of pages of one size, read by
window. Every image the pipeline segments is one: an upload decoded in memory (`ArraySource`),
a job's file on disk (`TiffSource`, read by window; other formats decoded whole), an OME-Zarr
image at a path or URL (`ZarrSource`, its z planes the pages), and test-time augmentation's
rotated and mirrored views of either (`pipeline.views`).

Pixels come out as uploads are decoded (`imaging.decode`): (h, w, channels), uint8, uint16 or
float32, alpha dropped. The values are checked once, before a source is used
(`check_values`): a float image must be finite and within +-MAX_FLOAT_PIXEL, and integers
other than uint8 and uint16 are mapped by the range of the whole stack, which for a file on
disk takes one pass over it (only for such types).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from unet_service.imaging.decode import TIFF_MAGIC, check_float_range, read_image
from unet_service.imaging.errors import ImageError, ImageTooLargeError
from unet_service.imaging.tiff_layout import MAX_CHUNK_BYTES
from unet_service.imaging.tiff_source import TiffSource

if TYPE_CHECKING:  # zarr (and dask, under ome-zarr) are imported only when a store is read
    from unet_service.imaging.zarr_source import ZarrSource

# Rows per read when a file is scanned for its values: bounded memory at any width.
SCAN_BYTES = 8 << 20
# The largest page decoded whole, unless the caller says (the service's UNET_MAX_PIXELS).
DECODED_WHOLE = 100_000_000


class Source(Protocol):
    """A stack of `pages` pages of height x width x channels pixels of `dtype`."""

    pages: int
    height: int
    width: int
    channels: int
    dtype: np.dtype

    @property
    def pixels(self) -> int:
        """Pixels of all pages."""
        ...

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `page` (from 0), (h, w, channels); not to be modified."""
        ...

    def close(self) -> None: ...


class ArraySource:
    """Decoded pages, each (H, W, C) of one shape and dtype, as a source."""

    def __init__(self, pages: np.ndarray | Sequence[np.ndarray]) -> None:
        self.arrays = [pages] if isinstance(pages, np.ndarray) else list(pages)
        if not self.arrays:
            raise ValueError("a source needs at least one page")
        first = self.arrays[0]
        if any(a.shape != first.shape or a.dtype != first.dtype for a in self.arrays):
            raise ValueError("the pages of a source must share one shape and dtype")
        self.pages = len(self.arrays)
        self.height, self.width, self.channels = first.shape
        self.dtype = first.dtype

    @property
    def pixels(self) -> int:
        return self.pages * self.height * self.width

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.arrays[page][y0:y1, x0:x1]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> ArraySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_values(source: ArraySource | TiffSource | ZarrSource) -> None:
    """The one check of an image's values, for every way in: float pixels finite and within
    +-MAX_FLOAT_PIXEL (beyond, the normalisation overflows to NaN); and, for a file whose
    integers are neither uint8 nor uint16, the value range that maps them (a pass over the
    file). Raises ImageError."""
    if isinstance(source, ArraySource):
        if source.dtype.kind == "f":
            lo = min(float(a.min()) for a in source.arrays)  # no |x| copy of the image
            hi = max(float(a.max()) for a in source.arrays)
            check_float_range(lo, hi)
        return
    stored = source.stored
    if stored.kind not in "iuf" or (stored.kind == "u" and stored.itemsize <= 2):
        return  # uint8, uint16 and 1-bit pages need nothing
    lo, hi = _scan(source)
    if stored.kind == "f":
        check_float_range(lo, hi)
    else:
        source.set_value_range((int(lo), int(hi)))


def _scan(source: TiffSource | ZarrSource) -> tuple[float, float]:
    """The smallest and largest stored value of every page, in bands of rows."""
    rows = max(1, SCAN_BYTES // max(1, source.width * source.channels * source.stored.itemsize))
    lo, hi = np.inf, -np.inf
    for page in range(source.pages):
        for y0 in range(0, source.height, rows):
            band = source.read_stored(page, y0, min(source.height, y0 + rows), 0, source.width)
            if band.dtype.kind == "f" and not np.isfinite(band).all():
                raise ImageError(f"page {page + 1} has NaN or infinite pixel values")
            lo, hi = min(lo, band.min().item()), max(hi, band.max().item())
    return lo, hi


def open_source(
    path: str | Path,
    *,
    max_pixels: int,
    max_pages: int,
    max_decoded_pixels: int | None = None,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> ArraySource | TiffSource:
    """A stack on disk, checked from its headers and then its values (`check_values`): a
    TIFF is read by window (any number of pages up to `max_pages`, `max_pixels` in all);
    other formats are decoded whole, at most `max_decoded_pixels` (default DECODED_WHOLE),
    which is also the largest page whose strips or tiles may be decoded whole. Raises
    ImageError subclasses."""
    whole = min(max_pixels, DECODED_WHOLE if max_decoded_pixels is None else max_decoded_pixels)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic in TIFF_MAGIC:
        source: ArraySource | TiffSource = TiffSource(
            path,
            max_pixels=max_pixels,
            max_pages=max_pages,
            max_chunk_bytes=max_chunk_bytes,
            decoded_whole=whole,
        )
    else:
        try:
            source = ArraySource(read_image(str(path), whole))
        except ImageTooLargeError as e:
            if whole == max_pixels:
                raise
            # Say why a section this size is refused here when a TIFF of it would not be.
            raise ImageTooLargeError(
                f"{e}: only TIFF files are read window by window beyond that; other formats "
                "are decoded whole (save it as a TIFF to segment it as a section)"
            ) from None
    try:
        check_values(source)
    except BaseException:
        source.close()
        raise
    return source


def open_zarr(location: str, *, max_pixels: int, max_pages: int) -> ZarrSource:
    """The OME-Zarr image at a path or fsspec URL, checked from its metadata and then its
    values (`check_values`). Raises ImageError subclasses."""
    from unet_service.imaging.zarr_source import ZarrSource

    source = ZarrSource(location, max_pixels=max_pixels, max_pages=max_pages)
    check_values(source)
    return source
