"""Huge images through overlap-tile inference in flat memory: one page of a `SectionSource`
(read by window) planned exactly as a `TiledImage` and streamed, band by band, into a
`SectionWriter` (a tiled, compressed TIFF).

`SectionImage` speaks the TiledImage protocol the batcher and `BatchRunner` use (`take`,
`tile_input`, `add`, `result`, the counters), so the service queues it beside ordinary
requests. Its plan is `core.tiling`'s; each tile's input window is the plan's own mirror
indices (`TilePlan.input_indices`) applied to the smallest window of the source they touch,
so it equals `TilePlan.extract` on the whole image. Tiles are handed out row-major; their
outputs come back in any order into the band (tile row) they belong to, and a band goes to
the writer as soon as it and every band above it are complete. In memory at once: the
source's cached band of input chunks, the few bands still being stitched (about one, as
tiles are taken in order and computed a batch at a time) and the writer's bounded backlog.

`run_section` is the whole job in one thread (`unet-predict`, the benchmark): every page
through `core.runner.run_tiles`, the recipe `Segmenter.segment` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.core.tiling import Tile, TileCounts, TilePlan, plan_image
from unet_service.imaging.decode import ImageError, match_channels
from unet_service.imaging.sources import SectionSource
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.tiled_image import mask_pixels

if TYPE_CHECKING:
    from unet_service.core.engine import Segmenter

Output = Literal["mask", "probabilities"]
OUTPUTS: tuple[Output, ...] = ("mask", "probabilities")


@dataclass(frozen=True)
class PageResult:
    """What a finished SectionImage returns: its rows are in the writer's queue."""

    page: int
    height: int
    width: int
    tiles: int


class SectionImage(TileCounts):
    """Page `page` of `source`, tiled by `plan`, its `output` written to `writer` (whose
    pages before this one must be complete: pages go one after another)."""

    def __init__(
        self,
        source: SectionSource,
        page: int,
        plan: TilePlan,
        segmenter: Segmenter,
        writer: SectionWriter,
        output: Output = "mask",
    ) -> None:
        if (plan.height, plan.width) != (source.height, source.width):
            raise ValueError("the plan does not match the source")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}")
        if not 0 <= page < source.pages:
            raise ValueError(f"page {page} of {source.pages}")
        if writer.rows_written != page * source.height:
            raise ValueError(f"the writer expects page {writer.rows_written / source.height:g}")
        self.source, self.page, self.plan = source, page, plan
        self.output = output
        self._segmenter = segmenter
        self._writer = writer
        self._in_channels = segmenter.card.in_channels
        self._classes = segmenter.out_channels
        self._cols = len(plan.cols)
        self._rows = plan.rows
        self._bands: dict[int, np.ndarray] = {}  # band index -> (rows, W[, K]) being stitched
        self._band_done = [0] * len(self._rows)  # tiles stitched per band
        self._next_band = 0  # first band not yet written
        self.max_rows_held = 0  # most output rows being stitched at once (tests)
        self.total = len(plan)
        self.taken = 0
        self.done = 0
        self._tiles = iter(plan)

    # ----- the TiledImage protocol -------------------------------------------------------------

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    def take(self) -> Tile:
        tile = next(self._tiles)
        self.taken += 1
        return tile

    def tile_input(self, tile: Tile) -> np.ndarray:
        """The tile's (C, S, S) input in the source's dtype. Waits while the writer is far
        behind: this runs in the inference thread, so the disk slows inference down, never
        the caller's event loop."""
        self._writer.wait_for_room()
        ys, xs = self.plan.input_indices(tile)
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        window = self.source.read(self.page, y0, y1, x0, x1)
        window = match_channels(window, self._in_channels)
        if window.dtype.kind == "f" and not np.isfinite(window).all():
            raise ImageError(f"page {self.page + 1} has NaN or infinite pixel values")
        return np.ascontiguousarray(window[ys - y0][:, xs - x0].transpose(2, 0, 1))

    def add(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        """Stitch one tile's (K, S, S) probabilities and (S, S) 0/1 or class mask."""
        band = tile.index // self._cols
        rows, cols = self.plan.write_window(tile)
        buffer = self._bands.get(band)
        if buffer is None:
            buffer = self._bands[band] = self._new_band(band, rows.stop)
            held = sum(len(b) for b in self._bands.values())
            self.max_rows_held = max(self.max_rows_held, held)
        dst = buffer[:, tile.col : tile.col + cols.stop]
        if self.output == "mask":
            dst[...] = mask_pixels(mask[rows, cols], self._classes)
        else:
            dst[...] = probabilities[:, rows, cols].transpose(1, 2, 0)
        self._band_done[band] += 1
        self.done += 1
        while self._next_band < len(self._rows) and self._band_done[self._next_band] == self._cols:
            self._writer.write_rows(self._bands.pop(self._next_band))
            self._next_band += 1

    def result(self) -> PageResult:
        if not self.complete:
            raise RuntimeError(f"{self.outstanding} of {self.total} tiles were never stitched")
        return PageResult(self.page, self.plan.height, self.plan.width, self.total)

    def _new_band(self, band: int, rows: int) -> np.ndarray:
        width = self.plan.width
        if self.output == "mask":
            return np.zeros((rows, width), np.uint8)
        return np.zeros((rows, width, self._classes), np.float32)


def result_layout(output: Output, out_channels: int) -> tuple[np.dtype, int]:
    """(dtype, samples per pixel) of the result file: a uint8 mask, or float32
    probabilities with one sample per class (contiguous, so rows stream out in order)."""
    if output == "mask":
        return np.dtype(np.uint8), 1
    return np.dtype(np.float32), out_channels


# Bytes per pixel of the results jobs.compute computes page by page, whole: cell ids are
# spooled as uint32 and, at the end, copied as uint16 beside the spool (6 at the peak); RGB.
WHOLE_PAGE_PIXEL_BYTES = {"instances": 6, "overlay": 3}
# Room for a result file's own structure: its header and metadata, and each page's header.
FILE_OVERHEAD = 64 << 10
PAGE_OVERHEAD = 4 << 10


def result_nbytes(source: SectionSource, output: str, out_channels: int) -> int:
    """The most bytes the result file for `source` takes, for keeping room for it before a
    job starts: its pixel bytes (mask 1 a pixel, probabilities 4 a class, instances 6,
    overlay 3) and what compression and the file's structure can add. Deflate grows
    incompressible data by well under 1/256 and tiles' offset tables take 16 bytes a tile,
    so the 1/256 margin covers both; each page adds its header."""
    if output in OUTPUTS:
        dtype, samples = result_layout(output, out_channels)  # type: ignore[arg-type]
        per_pixel = samples * dtype.itemsize
    else:
        per_pixel = WHOLE_PAGE_PIXEL_BYTES[output]
    pixel_bytes = source.pixels * per_pixel
    return pixel_bytes + pixel_bytes // 256 + source.pages * PAGE_OVERHEAD + FILE_OVERHEAD


def open_writer(
    path: str | Path,
    source: SectionSource,
    out_channels: int,
    output: Output = "mask",
    bigtiff: bool | None = None,
) -> SectionWriter:
    """The result file for `source`: one page per input page."""
    dtype, samples = result_layout(output, out_channels)
    return SectionWriter(
        path,
        pages=source.pages,
        height=source.height,
        width=source.width,
        dtype=dtype,
        samples=samples,
        bigtiff=bigtiff,
    )


def section_image(
    segmenter: Segmenter,
    source: SectionSource,
    page: int,
    writer: SectionWriter,
    tile_sizes: int | tuple[int, ...] | None = None,
    output: Output = "mask",
    tta: int = 1,
) -> SectionImage:
    """Page `page` of `source` planned as `Segmenter.tiled` plans an image (one tile size,
    or the cheapest of several), writing its `output` to `writer`."""
    if tta != 1:
        raise ValueError("test-time augmentation is not available for sections (tta must be 1)")
    if isinstance(tile_sizes, tuple):
        plan = plan_image(source.height, source.width, segmenter.geometry, tile_sizes)
    else:
        plan = segmenter.plan(source.height, source.width, tile_sizes)
    return SectionImage(source, page, plan, segmenter, writer, output)


@dataclass
class Progress:
    tiles_done: int
    tiles_total: int
    pages_done: int
    pages: int


class Cancelled(Exception):
    """`run_section` was stopped by its cancel check; no result file is left."""


def run_section(
    segmenter: Segmenter,
    source: SectionSource,
    path: str | Path,
    *,
    output: Output = "mask",
    tile_sizes: int | tuple[int, ...] | None = None,
    batch_size: int = 4,
    bigtiff: bool | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Every page of `source` through the network into a result TIFF at `path`, in this
    thread. On any error or cancellation (`cancelled()` is asked between batches) the file
    is deleted and the error (or `Cancelled`) raised."""
    run = BatchRunner(segmenter, batch_size)
    with open_writer(path, source, segmenter.out_channels, output, bigtiff) as writer:
        per_page = len(section_image(segmenter, source, 0, writer, tile_sizes, output).plan)
        progress = Progress(0, per_page * source.pages, 0, source.pages)

        def on_batch(tiles: int) -> None:
            progress.tiles_done += tiles
            if on_progress is not None:
                on_progress(progress)
            if cancelled is not None and cancelled():
                raise Cancelled("the section job was cancelled")

        for page in range(source.pages):
            image = section_image(segmenter, source, page, writer, tile_sizes, output)
            run_tiles(image, run, on_batch)
            image.result()
            progress.pages_done += 1
            if on_progress is not None:
                on_progress(progress)
