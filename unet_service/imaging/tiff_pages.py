"""A TIFF's pages, walked and checked from their headers alone: the one walk every reader of
TIFFs makes (an upload decoded in memory, `imaging.pages`; a job's file read by window,
`imaging.sources`), so one file gets one verdict whichever way it is sent.

A TIFF's pages are a chain of headers (IFDs), each pointing at the next, so a crafted file can
claim or chain any number of them. The chain is walked one header at a time and the walk
stops as soon as the page count or the pixels counted so far pass the limits: no pixel is
decoded, and nothing is allocated for pages beyond the limits. Every page is checked (size,
pixel type, samples, compression, the shape and extent of its strips or tiles) before any is
decoded. A chain that loops back or ends in an offset past the end of the file is a truncated
or corrupt file, an error, never a shorter stack; so is a page count that the file's ImageJ
or OME metadata declares and its chain does not hold. A reduced-resolution page (a thumbnail
or preview) after the first is not a page of the stack and is skipped.

tifffile reports a chain that points past the end of the file, or a header it cannot parse,
as a log line and then simply returns fewer pages; so the walk listens to its log, and also
reads the last page's next-page offset from the bytes, which finds the cut whatever the
logging configuration lets through.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tifffile

from unet_service.imaging.decode import check_pixels
from unet_service.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    StackMismatchError,
    TooManyPagesError,
)
from unet_service.imaging.tiff_layout import check_storage

# The image count an ImageJ description or an OME-XML header declares.
_IMAGEJ_COUNTS = ("channels", "slices", "frames")
_OME_SIZES = re.compile(rb'\bSize([CZT])="(\d+)"')


@dataclass(frozen=True)
class TiffStack:
    """What the walk found: the stack's pages (the file's IFD index of each, thumbnails
    skipped), all height x width with `samples` stored samples a pixel of `dtype` as stored
    (readers map it onto uint8, uint16 or float32, `imaging.decode.standard_dtype`)."""

    ifds: tuple[int, ...]
    height: int
    width: int
    samples: int
    dtype: np.dtype

    @property
    def pages(self) -> int:
        return len(self.ifds)

    @property
    def channels(self) -> int:
        """Samples without alpha (gray+alpha, RGB+alpha), which every reader drops."""
        return self.samples - 1 if self.samples in (2, 4) else self.samples


def walk_pages(
    tif: tifffile.TiffFile,
    *,
    max_pixels: int | None,
    max_pages: int,
    file_size: int,
    check_page: Callable[[tifffile.TiffPage, int, TiffStack], None] | None = None,
) -> TiffStack:
    """Walk and check every page of `tif` (a file of `file_size` bytes): at most `max_pages`
    pages and `max_pixels` pixels in all (None: no pixel limit). `check_page(page, index,
    first)` is a reader's own check of each page (index from 0; `first` describes page 1).
    Raises ImageError subclasses."""
    with PageChain() as chain:
        try:
            return _walk(tif, chain, max_pixels, max_pages, file_size, check_page)
        except ImageError:
            raise
        except Exception as e:  # tifffile raises many types for corrupt headers
            raise CorruptImageError(f"the TIFF is truncated or corrupt: {e}") from None


def _walk(tif, chain, max_pixels, max_pages, file_size, check_page) -> TiffStack:
    if not tif.pages:
        raise CorruptImageError("the TIFF has no readable pages (truncated or corrupt?)")
    declared = declared_pages(tif, max_pages)
    ifds: list[int] = []
    first: TiffStack | None = None
    last = None
    # Walk the chain one header at a time; never len(tif.pages), which walks it all.
    for ifd, page in enumerate(tif.pages):
        number = ifd + 1
        if ifd >= max_pages:
            raise TooManyPagesError(f"the TIFF has more than the limit of {max_pages} pages")
        if not isinstance(page, tifffile.TiffPage):
            raise CorruptImageError(f"page {number} is not an image")
        chain.visit(page, number)
        last = page
        if ifds and getattr(page, "is_reduced", False):
            continue  # a thumbnail or preview after the image, not a page of it
        height, width, samples, dtype = describe_page(page, ifd)
        if first is None:
            check_pixels(height, width, max_pixels)
            first = TiffStack((), height, width, samples, dtype)
        elif (height, width) != (first.height, first.width):
            raise StackMismatchError(
                f"page {number} is {width}x{height} but page 1 is {first.width}x"
                f"{first.height}; all pages of a stack must have one size"
            )
        elif (samples, dtype) != (first.samples, first.dtype):
            raise StackMismatchError(
                f"page {number} has {samples} channel(s) of {dtype}, page 1 {first.samples} "
                f"of {first.dtype}; all pages of a stack must match"
            )
        check_storage(page, ifd, height, file_size)
        if check_page is not None:
            check_page(page, ifd, first)
        ifds.append(ifd)
        total = len(ifds) * height * width
        if max_pixels is not None and total > max_pixels:
            raise ImageTooLargeError(
                f"the stack's first {len(ifds)} pages of {width}x{height} hold {total} "
                f"pixels, more than the limit of {max_pixels} (all pages count)"
            )
    assert first is not None and last is not None
    chain.check_end(tif, last, len(ifds))
    if declared is not None and declared not in (1, len(ifds)):
        raise CorruptImageError(
            f"the TIFF declares {declared} pages but holds {len(ifds)} (truncated or corrupt?)"
        )
    return TiffStack(tuple(ifds), first.height, first.width, first.samples, first.dtype)


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


def describe_page(page: tifffile.TiffPage, index: int) -> tuple[int, int, int, np.dtype]:
    """(height, width, samples, stored dtype) of a page (index from 0), or a clear error."""
    check_chunk_shape(page, index)
    separate, depth, height, width, contig = page.shaped
    if depth != 1:
        raise ImageError(f"page {index + 1} is a 3D volume ({depth} deep), not a section")
    dtype = page.dtype
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        raise ImageError(
            f"unsupported pixel type: page {index + 1} has {page.bitspersample}-bit pixels "
            f"of sample format {page.sampleformat}"
        )
    samples = separate * contig
    if not 1 <= samples <= 4:
        raise ImageError(f"page {index + 1} has {samples} samples per pixel (at most 4)")
    if page.compression != 1 and page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise ImageError(
            f"page {index + 1} is compressed with TIFF compression scheme "
            f"{int(page.compression)}, which cannot be decoded here"
        )
    return height, width, samples, np.dtype(dtype)


def check_chunk_shape(page: tifffile.TiffPage, index: int) -> None:
    """The page's tiles or strips have a size: a TileWidth, TileLength or RowsPerStrip of 0
    (which tifffile reads without complaint, and divides by, or takes a TileWidth of 0 for
    strips) is a corrupt header."""
    if 322 in page.tags or 323 in page.tags:  # TileWidth, TileLength
        dims = (page.tilewidth, page.tilelength, page.tiledepth)
        if min(dims) < 1:
            depth = f"x{dims[2]}" if dims[2] != 1 else ""
            raise CorruptImageError(
                f"page {index + 1} declares tiles of {dims[0]}x{dims[1]}{depth} pixels: the "
                "TIFF is corrupt"
            )
    elif page.rowsperstrip < 1:
        raise CorruptImageError(
            f"page {index + 1} declares strips of {page.rowsperstrip} rows: the TIFF is corrupt"
        )


class _TiffComplaints(logging.Handler):
    """Collects what tifffile logs as errors in this thread about the chain of pages (other
    complaints, an odd tag say, are harmless)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and "TiffPages" in message:
            self.messages.append(message)


class PageChain:
    """One walk along a TIFF's pages, in a `with` block (tifffile complains while it
    parses): `visit` each page as it is reached, then `check_end` with the last one."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._complaints = _TiffComplaints()

    def __enter__(self) -> PageChain:
        logging.getLogger("tifffile").addHandler(self._complaints)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self._complaints)

    def visit(self, page: tifffile.TiffPage, number: int) -> None:
        """Page `number` (from 1) is reached: a header seen before means a loop, which
        tifffile's iterator would follow forever."""
        if page.offset in self._seen:
            raise CorruptImageError(f"the TIFF's chain of pages loops at page {number}")
        self._seen.add(page.offset)

    def check_end(self, tif: tifffile.TiffFile, last: tifffile.TiffPage, pages: int) -> None:
        """The walk stopped after `last`, having found `pages` pages: the chain must really
        end there."""
        messages = self._complaints.messages
        if messages or next_page_offset(tif, last) != 0:
            said = f" ({messages[0]})" if messages else ""
            raise CorruptImageError(
                f"the TIFF is truncated or corrupt after page {pages}: its chain of pages "
                f"points past the end of the file{said}"
            )


def next_page_offset(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> int:
    """Where the chain goes after `page`, read from the file itself: 0 where it ends, -1
    when the header is cut off before its next-page offset."""
    fmt = tif.tiff
    fh = tif.filehandle
    with fh.lock:
        fh.seek(page.offset)
        count = fh.read(fmt.tagnosize)
        if len(count) < fmt.tagnosize:
            return -1
        (entries,) = struct.unpack(fmt.tagnoformat, count)
        fh.seek(page.offset + fmt.tagnosize + entries * fmt.tagsize)
        offset = fh.read(fmt.offsetsize)
    if len(offset) < fmt.offsetsize:
        return -1
    return struct.unpack(fmt.offsetformat, offset)[0]
