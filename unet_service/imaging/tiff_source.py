"""A TIFF on disk read by window: a section (one page) or a stack of sections whose pixels are
never all in memory at once.

The file is walked and checked from its headers first (`imaging.tiff_pages`, the walk an
upload gets too), so a truncated or lying TIFF is refused up front instead of failing hours
into a job. `read` then decodes only the strips or tiles a window overlaps, with tifffile's
own per-chunk decoder (no zarr layer: the chunk grid is needed anyway to bound memory), and
keeps the chunks of the rows last asked for: tiles are taken row by row, so each chunk is
decoded about once. Each page has its own layout (strips or tiles, any compression tifffile
decodes). Uncompressed data is read by byte offset, so even one strip holding a whole page is
read by window. A compressed chunk is decoded whole, so chunks above MAX_CHUNK_BYTES (one
compressed strip holding a whole 20000 x 20000 page, say) are refused with a message asking
for a tiled TIFF, unless the page is small enough for a request, which decodes it whole too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import tifffile

from unet_service.imaging.decode import standard_dtype
from unet_service.imaging.errors import CorruptImageError
from unet_service.imaging.tiff_layout import (
    MAX_CHUNK_BYTES,
    Layout,
    check_chunk_size,
    chunk_layout,
)
from unet_service.imaging.tiff_pages import TiffStack, walk_pages

JPEG = (6, 7, 34892, 33007)  # compressions whose tables sit in the page's header


class TiffSource:
    """A TIFF's pages as a stack, read by window (see `imaging.sources.Source`). Pixels are
    mapped onto uint8, uint16 or float32 as an upload's are; integer types other than uint8
    and uint16 need the stack's value range first (`set_value_range`). Thread-safe (one lock
    around the file and the cache)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_pixels: int,
        max_pages: int,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        decoded_whole: int = 0,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # (page, plane, chunk row, chunk column) -> (first image row held, decoded rows):
        # one band of chunk rows across the page, less the rows above the last window.
        self._cache: dict[tuple[int, int, int, int], tuple[int, np.ndarray]] = {}
        self.max_cached_rows = 0  # most image rows held in the cache at once (tests)
        self._current: tuple[int, tifffile.TiffPage, Layout] | None = None
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as e:  # tifffile raises many types for corrupt headers
            raise CorruptImageError(f"the TIFF is truncated or corrupt: {e}") from None

        def check_page(page: tifffile.TiffPage, index: int, first: TiffStack) -> None:
            lay = chunk_layout(page, first.height, first.width)
            check_chunk_size(lay, first.height * first.width, max_chunk_bytes, decoded_whole)

        try:
            self.stack = walk_pages(
                self._tif,
                max_pixels=max_pixels,
                max_pages=max_pages,
                file_size=os.path.getsize(self.path),
                check_page=check_page,
            )
        except BaseException:
            self._tif.close()
            raise
        self.pages, self.height = self.stack.pages, self.stack.height
        self.width, self.channels = self.stack.width, self.stack.channels
        self.stored = self.stack.dtype
        self._value_range: tuple[int, int] | None = None
        # Integers other than uint8 and uint16 are mapped by the stack's value range.
        needs_range = self.stored.kind == "i" or (
            self.stored.kind == "u" and self.stored.itemsize > 2
        )
        self.dtype: np.dtype | None = (
            None if needs_range else standard_dtype(np.zeros(0, self.stored)).dtype
        )

    def set_value_range(self, value_range: tuple[int, int]) -> None:
        """The smallest and largest value of the whole stack, which maps integer types other
        than uint8 and uint16 onto one of the three (as for an upload's pages)."""
        self._value_range = value_range
        self.dtype = standard_dtype(np.zeros(0, self.stored), value_range).dtype

    @property
    def pixels(self) -> int:
        return self.pages * self.height * self.width

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._tif.close()

    def __enter__(self) -> TiffSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reading -----------------------------------------------------------------------------

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of `page`, (h, w, channels), uint8, uint16 or float32."""
        if self.dtype is None:
            raise RuntimeError("the value range of this stack's integers is not known yet")
        raw = self.read_stored(page, y0, y1, x0, x1)
        return standard_dtype(raw, self._value_range)

    def read_stored(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The same window in the file's own pixel type."""
        if not (0 <= page < self.pages and 0 <= y0 < y1 <= self.height):
            raise IndexError(f"rows {y0}:{y1} of page {page} are outside the stack")
        if not 0 <= x0 < x1 <= self.width:
            raise IndexError(f"columns {x0}:{x1} are outside the page")
        with self._lock:
            tiff_page, lay = self._page(page)
            out = np.empty((y1 - y0, x1 - x0, lay.planes * lay.contig), self.stored)
            first, last = y0 // lay.band, (y1 - 1) // lay.band
            self._forget(page, y0, first, last)
            for plane in range(lay.planes):
                for down in range(first, last + 1):
                    for across in range(x0 // lay.cols, (x1 - 1) // lay.cols + 1):
                        top, chunk = self._chunk(
                            page, tiff_page, lay, plane, down, across, max(y0, down * lay.band)
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

    def _page(self, index: int) -> tuple[tifffile.TiffPage, Layout]:
        """Page `index` of the stack and its layout, the last one asked for kept: parsing an
        IFD reads all its strip/tile offsets."""
        if self._current is None or self._current[0] != index:
            try:
                page = self._tif.pages[self.stack.ifds[index]]
            except Exception as e:
                raise CorruptImageError(f"page {index + 1} cannot be read: {e}") from None
            self._current = (index, page, chunk_layout(page, self.height, self.width))
        return self._current[1], self._current[2]

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
        self,
        page: int,
        tiff_page: tifffile.TiffPage,
        lay: Layout,
        plane: int,
        down: int,
        across: int,
        need: int,
    ) -> tuple[int, np.ndarray]:
        """One chunk, (its first row, (rows, cols, contig samples) as stored), holding at
        least its rows from `need` on."""
        key = (page, plane, down, across)
        cached = self._cache.get(key)
        if cached is not None and cached[0] <= need:
            return cached
        if lay.raw and not lay.tiled:
            chunk = self._raw_rows(tiff_page, lay, plane, down * lay.band)
        else:
            index = (plane * lay.down + down) * lay.across + across
            chunk = self._file_chunk(tiff_page, lay, index, down * lay.rows)
        self._cache[key] = (down * lay.band, chunk)
        return self._cache[key]

    def _raw_rows(self, page: tifffile.TiffPage, lay: Layout, plane: int, top: int) -> np.ndarray:
        """Rows top .. top + band of uncompressed strips, read by offset."""
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
                parts.append(np.zeros((stop - row) * lay.cols * lay.contig, self.stored))
            else:
                parts.append(self._read(offset, (stop - row) * row_bytes))
            row = stop
        return np.concatenate(parts).reshape(bottom - top, lay.cols, lay.contig)

    def _file_chunk(self, page: tifffile.TiffPage, lay: Layout, index: int, top: int) -> np.ndarray:
        count = int(page.databytecounts[index])
        rows = lay.rows if lay.tiled else min(lay.rows, self.height - top)
        if count == 0:  # a sparse file's missing chunk: tifffile's fill value, zero
            return np.zeros((rows, lay.cols, lay.contig), self.stored)
        offset = int(page.dataoffsets[index])
        if lay.raw:
            return self._read(offset, rows * lay.cols * lay.pixel_bytes).reshape(
                rows, lay.cols, lay.contig
            )
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        _check_expansion(page.compression, data, lay.chunk_bytes)
        args: dict[str, object] = {}
        if page.compression in JPEG:
            args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        try:
            pixels, _, _ = page.decode(data, index, **args)
        except Exception as e:
            raise CorruptImageError(
                f"a strip/tile of page {page.index + 1} is corrupt: {e}"
            ) from None
        # (rows, cols, contig), as stored
        return np.asarray(pixels)[0].astype(self.stored, copy=False)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        fh = self._tif.filehandle
        with fh.lock:
            fh.seek(offset)
            data = fh.read(nbytes)
        if len(data) != nbytes:
            raise CorruptImageError("the TIFF ends inside its pixel data: truncated")
        stored = np.dtype(self._tif.byteorder + self.stored.char)
        return np.frombuffer(data, stored).astype(self.stored)  # native order, writable


def _check_expansion(compression: int, data: bytes, nbytes: int) -> None:
    """Refuse a chunk that decompresses to more than its pixels (a decompression bomb: a
    64 KiB deflate stream can hold 64 MiB of zeros). tifffile decodes without an output
    bound, so the chunk is first decoded into a bounded buffer; codecs whose decoder takes
    no bound (JPEG, which decodes to the size in its own header, and rarer ones) pass."""
    decode = tifffile.TIFF.DECOMPRESSORS.get(compression) if compression != 1 else None
    if decode is None or compression in JPEG:
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
