"""A TIFF page's storage, from its header alone: the grid of strips or tiles its pixels are
stored in, whether they lie in the file (`check_storage`, part of the walk every reader makes,
`imaging.tiff_pages`) and whether one of them may be decoded whole. `imaging.tiff_source`
reads pages by window on this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tifffile

from unet_service.imaging.errors import CorruptImageError, ImageError

# Largest decoded chunk (strip or tile) of a compressed TIFF read by window: a chunk is
# decoded whole. (A page small enough for a request is decoded whole anyway: any chunk goes.)
MAX_CHUNK_BYTES = 32 << 20
# Rows per read of uncompressed strips (a "virtual strip"), whatever the file's own strips.
RAW_ROW_BYTES = 1 << 20


@dataclass(frozen=True)
class Layout:
    """One page's storage: the file's chunks (strips or tiles) of rows x cols pixels, `down`
    x `across` of them per plane (planes: separately stored samples), `contig` samples per
    pixel in each; and the rows of one cached chunk, `band`: the file's chunk rows, except
    for uncompressed strips, which are read by offset in slices of about RAW_ROW_BYTES."""

    tiled: bool
    rows: int
    cols: int
    down: int
    across: int
    planes: int
    contig: int
    raw: bool  # uncompressed and byte-aligned
    band: int
    itemsize: int

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one pixel in one chunk (its contiguous samples)."""
        return self.contig * self.itemsize

    @property
    def chunks(self) -> int:
        return self.planes * self.down * self.across

    @property
    def chunk_bytes(self) -> int:
        return self.rows * self.cols * self.pixel_bytes


def chunk_layout(page: tifffile.TiffPage, height: int, width: int) -> Layout:
    """The storage of a page the walk (`imaging.tiff_pages`) has checked."""
    planes, contig = page.shaped[0], page.shaped[4]
    itemsize = np.dtype(page.dtype).itemsize
    if page.is_tiled:
        rows, cols = page.tilelength, page.tilewidth
    else:
        rows, cols = min(page.rowsperstrip, height), width
    raw = (
        page.compression == 1
        and page.predictor == 1
        and page.fillorder == 1
        and page.bitspersample == 8 * itemsize
    )
    band = rows
    if raw and not page.is_tiled:
        # Uncompressed strips are read by offset in slices of rows, whatever the file's own
        # strips (one strip may hold a whole page).
        band = max(1, min(height, RAW_ROW_BYTES // (cols * contig * itemsize)))
    return Layout(
        tiled=bool(page.is_tiled),
        rows=rows,
        cols=cols,
        down=math.ceil(height / rows),
        across=math.ceil(width / cols),
        planes=planes,
        contig=contig,
        raw=raw,
        band=band,
        itemsize=itemsize,
    )


def check_chunk_size(lay: Layout, page_pixels: int, max_chunk_bytes: int, whole: int) -> None:
    """Refuse compressed chunks so large that reading by window would decode a page's worth
    at a time, unless the page has at most `whole` pixels (what a request decodes whole)."""
    if lay.raw and not lay.tiled:
        return  # read by offset, in slices of rows
    if lay.chunk_bytes > max_chunk_bytes and page_pixels > whole:
        kind = "tiles" if lay.tiled else "strips"
        raise ImageError(
            f"the TIFF stores its pixels in {kind} of {lay.cols}x{lay.rows} pixels "
            f"({lay.chunk_bytes >> 20} MiB each), which are decoded whole; huge sections are "
            "read by window, which needs a tiled TIFF (e.g. 512x512 tiles), strips of a "
            "few rows, or no compression"
        )


def check_storage(page: tifffile.TiffPage, index: int, height: int, file_size: int) -> None:
    """The page lists as many strips or tiles as its size needs, and every one lies inside
    the file (a truncated file ends early); uncompressed ones hold all their pixels."""
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    rows = page.tilelength if page.is_tiled else min(page.rowsperstrip, height)
    down = -(-height // rows)
    cols = page.tilewidth if page.is_tiled else page.imagewidth
    across = -(-page.imagewidth // cols)
    planes, contig = page.shaped[0], page.shaped[4]
    chunks = planes * down * across
    if len(offsets) != chunks or len(counts) != chunks:
        raise CorruptImageError(
            f"page {index + 1} lists {len(offsets)} strips/tiles, its size needs {chunks}"
        )
    present = counts > 0
    if present.any():
        end = int((offsets[present] + counts[present]).max())
        if end > file_size or int(offsets[present].min()) < 0:
            raise CorruptImageError(
                f"the TIFF is truncated or corrupt: page {index + 1}'s pixel data runs past "
                f"the end of the file ({end} > {file_size} bytes)"
            )
    bits = page.bitspersample * contig
    chunk_bytes = rows * cols * -(-bits // 8)
    if page.compression != 1 and counts.size and int(counts.max()) > 2 * chunk_bytes + 65536:
        raise CorruptImageError(
            f"the TIFF is corrupt: page {index + 1} has a compressed strip/tile of "
            f"{int(counts.max())} bytes, more than twice its {chunk_bytes} bytes of pixels"
        )
    if page.compression == 1 and bits % 8 == 0:
        row_bytes = cols * bits // 8
        need = np.full(chunks, rows * row_bytes, np.int64)
        if not page.is_tiled:  # the last strip holds only the rows that are left
            tops = np.arange(chunks) % down * rows
            need = np.minimum(rows, height - tops) * row_bytes
        if np.any(present & (counts < need)):
            raise CorruptImageError(
                f"the TIFF is truncated or corrupt: page {index + 1} has strips/tiles "
                "shorter than their pixels"
            )
