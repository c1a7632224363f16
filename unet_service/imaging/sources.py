"""Huge images on disk, read by window: a section (one page) or a stack of sections (one TIFF
page each) whose pixels are never all in memory at once.

`open_section` validates a file from its headers alone (page count, sizes, types, chunk
layout, chunk offsets against the file's size) before any pixel is decoded, so a truncated
or lying TIFF is refused up front with an ImageError instead of failing hours into a job.
`SectionSource.read` then decodes only the TIFF strips or tiles a window overlaps, with
tifffile's own per-segment decoder (no zarr layer: we need the chunk grid anyway to bound
memory), and keeps the chunks of the rows last asked for: tiles are taken row by row, so
each chunk is decoded about once.

Layouts: tiled TIFFs and TIFFs in strips, any compression tifffile decodes, 8/16-bit unsigned
or 32-bit float, 1 to 4 samples (alpha dropped, as `imaging.decode` does). Uncompressed data is
read by byte offset, so even one strip holding a whole page is read by window. A compressed
chunk must be decoded whole, so chunks above MAX_CHUNK_BYTES (e.g. one compressed strip
holding a whole 20000 x 20000 page) are refused with a message asking for a tiled TIFF:
decoding it would hold the whole page in memory. Other formats (PNG, JPEG, ...) cannot be
read by window: they are decoded whole under their own, smaller pixel limit.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import tifffile

from unet_service.imaging.decode import (
    TIFF_MAGIC,
    CorruptImageError,
    ImageTooLargeError,
    StackMismatchError,
    TooManyPagesError,
    read_image,
)
from unet_service.imaging.pages import declared_pages
from unet_service.imaging.tiff_chain import PageChain
from unet_service.imaging.tiff_layout import (
    MAX_CHUNK_BYTES,
    check_chunks,
    chunk_layout,
    describe_page,
    page_name,
)


class SectionSource:
    """A stack of `pages` sections of height x width x channels pixels of `dtype`, read by
    window. Thread-safe (one lock around the file and the cache)."""

    pages: int
    height: int
    width: int
    channels: int
    dtype: np.dtype

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `page` as a new (h, w, channels) array in `dtype`."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (a no-op for decoded images)."""

    def __enter__(self) -> SectionSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pixels(self) -> int:
        return self.pages * self.height * self.width


class ArraySource(SectionSource):
    """A decoded (H, W, C) image as a one-page source (formats that cannot be read by window)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.pages = 1
        self.height, self.width, self.channels = image.shape
        self.dtype = image.dtype

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if page != 0:
            raise IndexError(f"page {page} of a one-page image")
        return self.image[y0:y1, x0:x1].copy()


class TiffSource(SectionSource):
    """A TIFF's pages (the main IFD chain) as a stack, validated by `open_section`."""

    def __init__(
        self,
        path: str | Path,
        max_pixels: int,
        max_pages: int,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ) -> None:
        self.path = Path(path)
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        # (page, plane, chunk row, chunk column) -> (first image row held, decoded rows):
        # one band of chunk rows across the page, less the rows above the last window.
        self._cache: dict[tuple[int, int, int, int], tuple[int, np.ndarray]] = {}
        self.max_cached_rows = 0  # most image rows held in the cache at once (tests)
        with PageChain() as chain:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except Exception as e:  # tifffile raises many types for corrupt headers
                raise CorruptImageError(f"cannot read the TIFF header: {e}") from None
            try:
                self._current: tifffile.TiffPage | None = None
                self._validate(chain, max_pixels, max_pages)
            except BaseException:
                self._tif.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._tif.close()

    # ----- validation, from the headers only ---------------------------------------------------

    def _validate(self, chain: PageChain, max_pixels: int, max_pages: int) -> None:
        tif = self._tif
        if not tif.pages:
            raise CorruptImageError("the TIFF has no readable pages (truncated or corrupt?)")
        self._size = os.path.getsize(self.path)
        first = self._page(0)
        self.height, self.width, samples, self.dtype = describe_page(first, 0)
        self.channels = samples - 1 if samples in (2, 4) else samples  # alpha is dropped
        if self.height * self.width > max_pixels:
            raise ImageTooLargeError(
                f"page 1 is {self.width}x{self.height} = {self.height * self.width} pixels, "
                f"more than the limit of {max_pixels}"
            )
        self._layout = chunk_layout(first, self.height, self.width, self.max_chunk_bytes)
        # The count ImageJ or OME metadata declares is refused at once when over the limit,
        # and must match the pages found (as for a synchronous stack, imaging.pages).
        declared = declared_pages(tif, max_pages)
        # Walk the IFD chain one page at a time, never past max_pages: a chain that is
        # endless costs at most max_pages + 1 small reads before it is refused, and a page
        # count claimed anywhere else (ImageJ or OME metadata) is never trusted. A chain that
        # loops or is cut short is refused as imaging.pages refuses it (imaging.tiff_chain).
        page, index = first, 0
        while True:
            chain.visit(page, index + 1)
            if index > 0:
                shape = describe_page(page, index)
                if shape != (self.height, self.width, samples, self.dtype):
                    raise StackMismatchError(
                        f"page {index + 1} is {page_name(shape)}, page 1 is "
                        f"{page_name((self.height, self.width, samples, self.dtype))}: every page "
                        "of a stack must have the same size, samples and pixel type"
                    )
                if (
                    chunk_layout(page, self.height, self.width, self.max_chunk_bytes)
                    != self._layout
                ):
                    raise StackMismatchError(
                        f"page {index + 1} is stored in other strips or tiles than page 1"
                    )
            check_chunks(page, index, self._layout, self.height, self._size, self.max_chunk_bytes)
            index += 1
            if index * self.height * self.width > max_pixels:
                raise ImageTooLargeError(
                    f"the stack's first {index} pages of {self.width}x{self.height} are "
                    f"already more than the limit of {max_pixels} pixels"
                )
            try:
                page = self._page(index)
            except IndexError:
                chain.check_end(tif, page, index)
                break
            if index >= max_pages:
                raise TooManyPagesError(f"the TIFF has more than {max_pages} pages")
        if declared is not None and declared not in (1, index):
            raise CorruptImageError(
                f"the TIFF declares {declared} pages but holds {index} (truncated or corrupt?)"
            )
        self.pages = index

    def _page(self, index: int) -> tifffile.TiffPage:
        """Page `index` (IndexError past the last), the last one asked for kept: parsing an
        IFD reads all its strip/tile offsets."""
        if self._current is not None and self._current.index == index:
            return self._current
        try:
            page = self._tif.pages[index]
        except IndexError:
            raise
        except Exception as e:
            raise CorruptImageError(f"page {index + 1} cannot be read: {e}") from None
        if not isinstance(page, tifffile.TiffPage):
            raise CorruptImageError(f"page {index + 1} is not an image")
        self._current = page
        return page

    # ----- reading -----------------------------------------------------------------------------

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if not (0 <= page < self.pages and 0 <= y0 < y1 <= self.height):
            raise IndexError(f"rows {y0}:{y1} of page {page} are outside the stack")
        if not 0 <= x0 < x1 <= self.width:
            raise IndexError(f"columns {x0}:{x1} are outside the page")
        lay = self._layout
        out = np.empty((y1 - y0, x1 - x0, lay.planes * lay.contig), self.dtype)
        with self._lock:
            first, last = y0 // lay.band, (y1 - 1) // lay.band
            self._forget(page, y0, first, last)
            for plane in range(lay.planes):
                for down in range(first, last + 1):
                    for across in range(x0 // lay.cols, (x1 - 1) // lay.cols + 1):
                        top, chunk = self._chunk(
                            page, plane, down, across, max(y0, down * lay.band)
                        )
                        left = across * lay.cols
                        ya, yb = max(y0, top), min(y1, top + chunk.shape[0])
                        xa, xb = max(x0, left), min(x1, left + chunk.shape[1])
                        src = chunk[ya - top : yb - top, xa - left : xb - left]
                        planes = slice(plane, plane + 1) if lay.planes > 1 else slice(None)
                        out[ya - y0 : yb - y0, xa - x0 : xb - x0, planes] = src
            rows = {k[2]: len(chunk) for k, (_, chunk) in self._cache.items()}
            self.max_cached_rows = max(self.max_cached_rows, sum(rows.values()))
        return out[..., : self.channels]

    def _forget(self, page: int, y0: int, first: int, last: int) -> None:
        """Drop cached chunks outside chunk rows first..last, and the rows above y0 of the
        top ones: tiles come row by row, downwards, so those are not asked for again (a
        mirrored bottom border that is decodes them anew)."""
        for key, (top, chunk) in list(self._cache.items()):
            if key[0] != page or not first <= key[2] <= last:
                del self._cache[key]
            elif top < y0:
                self._cache[key] = (y0, chunk[y0 - top :].copy())

    def _chunk(
        self, page: int, plane: int, down: int, across: int, need: int
    ) -> tuple[int, np.ndarray]:
        """One chunk, (its first row, (rows, cols, contig samples) in `dtype`), holding at
        least its rows from `need` on."""
        key = (page, plane, down, across)
        cached = self._cache.get(key)
        if cached is not None and cached[0] <= need:
            return cached
        lay = self._layout
        tiff_page = self._page(page)
        if lay.raw and not lay.tiled:
            chunk = self._raw_rows(tiff_page, plane, down * lay.band)
        else:
            index = (plane * lay.down + down) * lay.across + across
            chunk = self._file_chunk(tiff_page, index, down * lay.rows)
        self._cache[key] = (down * lay.band, chunk)
        return self._cache[key]

    def _raw_rows(self, page: tifffile.TiffPage, plane: int, top: int) -> np.ndarray:
        """Rows top .. top + band of uncompressed strips, read by offset."""
        lay = self._layout
        bottom = min(self.height, top + lay.band)
        row_bytes = lay.cols * lay.pixel_bytes
        parts = []
        row = top
        while row < bottom:
            strip = row // lay.rows
            stop = min(bottom, (strip + 1) * lay.rows)
            index = plane * lay.down + strip
            offset = int(page.dataoffsets[index]) + (row - strip * lay.rows) * row_bytes
            if int(page.databytecounts[index]) == 0:
                parts.append(np.zeros((stop - row) * lay.cols * lay.contig, self.dtype))
            else:
                parts.append(self._read(offset, (stop - row) * row_bytes))
            row = stop
        return np.concatenate(parts).reshape(bottom - top, lay.cols, lay.contig)

    def _file_chunk(self, page: tifffile.TiffPage, index: int, top: int) -> np.ndarray:
        lay = self._layout
        count = int(page.databytecounts[index])
        rows = lay.rows if lay.tiled else min(lay.rows, self.height - top)
        if count == 0:  # a sparse file's missing chunk: tifffile's fill value, zero
            return np.zeros((rows, lay.cols, lay.contig), self.dtype)
        offset = int(page.dataoffsets[index])
        if lay.raw:
            return self._read(offset, rows * lay.cols * lay.pixel_bytes).reshape(
                rows, lay.cols, lay.contig
            )
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        _check_expansion(page.compression, data, lay.rows * lay.cols * lay.pixel_bytes)
        args: dict[str, object] = {}
        if page.compression in (6, 7, 34892, 33007):  # JPEG: tables in the header
            args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        try:
            pixels, _, _ = page.decode(data, index, **args)
        except Exception as e:
            raise CorruptImageError(
                f"a strip/tile of page {page.index + 1} is corrupt: {e}"
            ) from None
        return np.asarray(pixels)[0].astype(self.dtype, copy=False)  # (rows, cols, contig)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(nbytes)
        if len(data) != nbytes:
            raise CorruptImageError("the TIFF ends inside its pixel data: truncated")
        stored = np.dtype(self._tif.byteorder + self.dtype.char)
        return np.frombuffer(data, stored).astype(self.dtype)  # native order, writable


def _check_expansion(compression: int, data: bytes, nbytes: int) -> None:
    """Refuse a chunk that decompresses to more than its pixels (a decompression bomb: a
    64 KiB deflate stream can hold 64 MiB of zeros). tifffile decodes without an output
    bound, so the chunk is first decoded into a bounded buffer; codecs whose decoder takes
    no bound (JPEG, which decodes to the size in its own header, and rarer ones) pass."""
    decode = tifffile.TIFF.DECOMPRESSORS.get(compression) if compression != 1 else None
    if decode is None or compression in (6, 7, 34892, 33007):
        return
    limit = 2 * nbytes + 4096  # some writers pad their chunks; never a whole page more
    try:
        size = len(decode(data, out=limit))
    except TypeError:
        return  # this codec takes no output bound
    except Exception as e:
        raise CorruptImageError(
            f"a strip/tile decompresses to more than its {nbytes} bytes of pixels, or is "
            f"corrupt: {e}"
        ) from None
    if size >= limit:  # a decoder that stops at the bound instead of failing (LZW)
        raise CorruptImageError(f"a strip/tile decompresses to more than its {nbytes} bytes")


def open_section(
    path: str | Path,
    *,
    max_pixels: int,
    max_pages: int,
    max_decoded_pixels: int | None = None,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> SectionSource:
    """A stack on disk, validated from its headers: a TIFF is read by window (any number of
    pages up to `max_pages`, `max_pixels` in all); other formats are decoded whole, at most
    `max_decoded_pixels` (default: `max_pixels`). Raises ImageError subclasses."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic in TIFF_MAGIC:
        return TiffSource(path, max_pixels, max_pages, max_chunk_bytes)
    limit = max_pixels if max_decoded_pixels is None else min(max_pixels, max_decoded_pixels)
    try:
        return ArraySource(read_image(str(path), limit))
    except ImageTooLargeError as e:
        if limit == max_pixels:
            raise
        # Say why a section this size is refused here when a TIFF of it would not be.
        raise ImageTooLargeError(
            f"{e}: only TIFF files are read window by window beyond that; other formats are "
            "decoded whole (save it as a TIFF to segment it as a section)"
        ) from None
