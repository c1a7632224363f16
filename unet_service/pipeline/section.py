"""Huge images through overlap-tile inference in flat memory: each page of a `Source` (read by
window) is a `TiledImage` whose outputs stream, band by band, into a `SectionWriter` (a tiled,
compressed TIFF) through a `BandSink`. In memory at once: the source's cached band of input
chunks, the few bands still being stitched (about one, as tiles are taken in order and
computed a batch at a time) and the writer's bounded backlog.

`run_section` is the whole job in one thread (`unet-predict`, the benchmark): every page
through `core.runner.run_tiles`, the recipe `Segmenter.segment` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.sources import Source
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.outputs import Output, result_layout
from unet_service.pipeline.sinks import BandSink
from unet_service.pipeline.tiled_image import TiledImage

if TYPE_CHECKING:
    from unet_service.core.engine import Segmenter


def open_writer(
    path: str | Path,
    source: Source,
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
    source: Source,
    page: int,
    writer: SectionWriter,
    tile_sizes: int | tuple[int, ...] | None = None,
    output: Output = "mask",
    tta: int = 1,
) -> TiledImage:
    """Page `page` of `source` planned as `Segmenter.tiled` plans an image (one tile size,
    or the cheapest of several), writing its `output` to `writer`."""
    if tta != 1:
        raise ValueError("test-time augmentation is not available for sections (tta must be 1)")
    classes = segmenter.out_channels
    return segmenter.recipe(tile_sizes).page(
        source, page, lambda plan: BandSink(plan, page, writer, output, classes)
    )


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
    source: Source,
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
        total = segmenter.recipe(tile_sizes).tiles(source.height, source.width, source.pages)
        progress = Progress(0, total, 0, source.pages)

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
