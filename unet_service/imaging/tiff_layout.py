"""A TIFF page's storage, from its header alone: the grid of strips or tiles its pixels are
stored in, and whether one of them may be decoded whole. `imaging.tiff_source` reads pages by
window on this; the header checks every reader makes are `imaging.tiff_pages`'."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tifffile

from unet_service.imaging.errors import ImageError

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
