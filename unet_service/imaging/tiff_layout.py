"""A TIFF page's storage, from its header alone: size and pixel type, the grid of strips or
tiles its pixels are stored in, and whether those chunks fit the file and the memory bound.
`imaging.sources` reads sections by window on this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tifffile

from unet_service.imaging.decode import CorruptImageError, ImageError

# Largest decoded chunk (strip or tile) of a compressed TIFF: a chunk is decoded whole.
MAX_CHUNK_BYTES = 32 << 20
# Rows per read of uncompressed strips (a "virtual strip"), whatever the file's own strips.
RAW_ROW_BYTES = 1 << 20
DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


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


def describe_page(page: tifffile.TiffPage, index: int) -> tuple[int, int, int, np.dtype]:
    """(height, width, samples, dtype) of a page, or a clear error."""
    separate, depth, height, width, contig = page.shaped
    if depth != 1:
        raise ImageError(f"page {index + 1} is a 3D volume ({depth} deep), not a section")
    dtype = page.dtype
    if dtype is None or np.dtype(dtype) not in DTYPES:
        raise ImageError(
            f"page {index + 1} has {page.bitspersample}-bit pixels of type {dtype}: sections "
            "must be 8- or 16-bit unsigned or 32-bit float"
        )
    samples = separate * contig
    if not 1 <= samples <= 4:
        raise ImageError(f"page {index + 1} has {samples} samples per pixel (at most 4)")
    if height < 1 or width < 1:
        raise ImageError(f"page {index + 1} has zero size ({width}x{height})")
    check_chunk_shape(page, index)
    return height, width, samples, np.dtype(dtype)


def chunk_layout(page: tifffile.TiffPage, height: int, width: int, max_chunk_bytes: int) -> Layout:
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
    chunk_bytes = rows * cols * contig * itemsize
    if raw and not page.is_tiled:
        # Uncompressed strips are read by offset in slices of rows, whatever the file's own
        # strips (one strip may hold a whole page).
        band = max(1, min(height, RAW_ROW_BYTES // (cols * contig * itemsize)))
    elif chunk_bytes > max_chunk_bytes:
        kind = "tiles" if page.is_tiled else "strips"
        raise ImageError(
            f"the TIFF stores its pixels in {kind} of {cols}x{rows} pixels "
            f"({chunk_bytes >> 20} MiB each), which are decoded whole; huge sections are "
            "read by window, which needs a tiled TIFF (e.g. 512x512 tiles), strips of a "
            "few rows, or no compression"
        )
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


def page_name(shape: tuple) -> str:
    height, width, samples, dtype = shape[:4]
    extra = f", {samples} samples" if samples != 1 else ""
    return f"{width}x{height} {dtype}{extra}"


def check_chunks(
    page: tifffile.TiffPage,
    index: int,
    lay: Layout,
    height: int,
    file_size: int,
    max_chunk_bytes: int,
) -> None:
    """Every chunk's bytes lie inside the file (a truncated file ends early) and, for raw
    data, are as many as its pixels need; compressed chunks are not absurdly long."""
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if len(offsets) != lay.chunks or len(counts) != lay.chunks:
        raise CorruptImageError(
            f"page {index + 1} lists {len(offsets)} strips/tiles, its size needs {lay.chunks}"
        )
    present = counts > 0
    if present.any():
        end = int((offsets[present] + counts[present]).max())
        if end > file_size or int(offsets[present].min()) < 0:
            raise CorruptImageError(
                f"page {index + 1}'s pixel data runs past the end of the file "
                f"({end} > {file_size} bytes): the TIFF is truncated"
            )
    if lay.raw:
        need = np.full(lay.chunks, lay.rows * lay.cols * lay.pixel_bytes, np.int64)
        if not lay.tiled:  # the last strip holds only the rows that are left
            tops = np.arange(lay.chunks) % lay.down * lay.rows
            need = np.minimum(lay.rows, height - tops) * lay.cols * lay.pixel_bytes
        if np.any(present & (counts < need)):
            raise CorruptImageError(
                f"page {index + 1} has strips/tiles shorter than their pixels: truncated"
            )
    elif counts.size and int(counts.max()) > 2 * max_chunk_bytes:
        raise CorruptImageError(
            f"page {index + 1} has a compressed strip/tile of {int(counts.max())} bytes"
        )
