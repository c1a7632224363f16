"""Every TIFF this project writes: a (D, H, W) volume (or (D, H, W, S), S samples a pixel) as
ONE series of D pages with an ImageJ hyperstack description (D slices), so that
`tifffile.imread` (which scikit-image and napari read TIFFs with) gives back the whole array
and Fiji opens one stack. A one-page volume is the same file with D = 1.

Pixel types: uint8 (masks, RGB overlays), uint16 (cell ids while they fit) and float32
(probabilities) are ImageJ's own. uint32 (cell ids beyond 65535) is not, but ImageJ's TIFF
reader opens 32-bit unsigned pages (as 32-bit float, exact up to 2**24) and tifffile reads the
file back as one (D, H, W) uint32 series. So the description is written here, with
`tifffile.imagej_description`, rather than by `TiffWriter(imagej=True)`: for ImageJ's types
the file is the same (the same tags), and this one way also covers uint32, which
`imagej=True` refuses, and BigTIFF, where it warns that ImageJ itself cannot read the file
(Fiji opens it with Bio-Formats, which reads the description).

Several classes of probabilities (K > 1) are K samples a pixel, which ImageJ has no
hyperstack for (beyond RGB). A (D, K, H, W) channel hyperstack stores each class of a page as
a plane of its own, one after another, so every class but the first would have to be held
until the page is complete: the streaming writer never holds a page. Such a volume is one
(D, H, W, K) series without ImageJ metadata.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

# Classic TIFF addresses 4 GiB with 32-bit offsets. The size is decided before writing,
# from the raw size (deflate can grow incompressible data a little), with room to spare.
CLASSIC_TIFF_LIMIT = int(0.9 * 2**32)
# zlib level of the answers written in memory: as fast as the PNGs (masks compress well at
# any level, and latency matters more); files written by a job use zlib's default.
FAST_LEVEL = 1
WRITTEN_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.float32))


@dataclass(frozen=True)
class Volume:
    """What is written: `pages` pages of height x width pixels of `dtype`, `samples` a pixel
    (RGB colour with `rgb`, else one per class)."""

    pages: int
    height: int
    width: int
    dtype: np.dtype
    samples: int = 1
    rgb: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.dtype not in WRITTEN_DTYPES:
            raise ValueError(f"a volume of {self.dtype} is not written (only {WRITTEN_DTYPES})")
        if self.rgb and (self.samples, self.dtype) != (3, np.uint8):
            raise ValueError("an RGB volume is 3 samples of uint8")

    @property
    def shape(self) -> tuple[int, ...]:
        planes = (self.pages, self.height, self.width)
        return planes if self.samples == 1 else (*planes, self.samples)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def imagej(self) -> bool:
        """Whether ImageJ has a hyperstack for it: one sample a pixel, or RGB."""
        return self.samples == 1 or self.rgb

    def needs_bigtiff(self) -> bool:
        """Whether the file may exceed a classic TIFF's 4 GiB."""
        return self.nbytes > CLASSIC_TIFF_LIMIT

    def description(self) -> str | None:
        if not self.imagej:
            return None
        axes = "ZYX" if self.samples == 1 else "ZYXS"
        return tifffile.imagej_description(self.shape, axes=axes)


def labels_dtype(top_id: int) -> np.dtype:
    """Cell ids as 16-bit while the largest fits (ImageJ's and most viewers' own type), else
    32-bit."""
    return np.dtype(np.uint16 if top_id <= 0xFFFF else np.uint32)


def open_volume(
    file: str | Path | BinaryIO, volume: Volume, bigtiff: bool | None = None
) -> tifffile.TiffWriter:
    """The file to `write_volume` into (BigTIFF when `bigtiff`, default: when the size
    needs it); open it first to learn at once that it cannot be created."""
    if bigtiff is None:
        bigtiff = volume.needs_bigtiff()
    return tifffile.TiffWriter(file, bigtiff=bigtiff)


def write_volume(
    tif: tifffile.TiffWriter,
    data: np.ndarray | Iterable[np.ndarray],
    volume: Volume,
    *,
    tile: int | None = None,
    level: int | None = None,
) -> None:
    """Write `volume`, deflate-compressed (zlib `level`, default zlib's), in one call of
    `TiffWriter.write`, so one series. `data` is the whole array, its pages one after another,
    or with `tile` its tile x tile tiles, page after page and row of tiles after row of tiles
    (edge tiles may be short). An iterator is taken one item at a time, each written before the
    next is asked for: it may produce them as they are computed."""
    streamed = not isinstance(data, np.ndarray)
    tif.write(
        iter(data) if streamed else data,
        shape=volume.shape,
        dtype=volume.dtype,
        photometric="rgb" if volume.rgb else "minisblack",
        planarconfig="contig" if volume.samples > 1 else None,
        tile=(tile, tile) if tile else None,
        compression="zlib",
        compressionargs=None if level is None else {"level": level},
        # Floats compress far better with the floating-point predictor.
        predictor=volume.dtype.kind == "f",
        # Tiles one at a time: no read-ahead of an iterator that computes them.
        maxworkers=1 if streamed and tile else None,
        description=volume.description(),
        metadata=None,  # no tifffile description of its own beside ImageJ's
    )


def volume_bytes(pages: Sequence[np.ndarray], *, rgb: bool = False) -> bytes:
    """Pages of one shape and dtype, each (H, W) (or (H, W, 3) with `rgb`), as one volume in
    strips, zlib level 1: an answer made in memory."""
    first = pages[0]
    volume = Volume(len(pages), first.shape[0], first.shape[1], first.dtype, 3 if rgb else 1, rgb)
    buf = io.BytesIO()
    with open_volume(buf, volume) as tif:
        write_volume(tif, (np.ascontiguousarray(page) for page in pages), volume, level=FAST_LEVEL)
    return buf.getvalue()


def labels_bytes(labels: Sequence[np.ndarray]) -> bytes:
    """Pages of (H, W) cell ids (each page labelled on its own) as one volume, 16-bit while
    every page's ids fit (as the one-page PNG), else 32-bit."""
    top = max((int(page.max()) for page in labels if page.size), default=0)
    dtype = labels_dtype(top)
    return volume_bytes([page.astype(dtype, copy=False) for page in labels])
