"""`pipeline.to_file` in one thread, for `unet-predict` and the benchmark: every page of a
source through a batch runner (`core.runner.run_tiles`, the loop `Segmenter.segment` uses)
into a result file, streamed band by band in flat memory. In memory at once: the source's
cached band of input chunks, the few bands still being stitched (about one, as tiles are
taken in order and computed a batch at a time) and the writer's bounded backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.sources import Source
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.outputs import Output, SegmentRequest
from unet_service.pipeline.sinks import BandSink
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.pipeline.to_file import Progress, segment_to_file


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
    thread (and one more, for the network). On any error or cancellation (`cancelled()` is
    asked between batches) the file is deleted and the error (or `Cancelled`) raised."""
    run = BatchRunner(segmenter, batch_size)
    recipe = segmenter.recipe(tile_sizes)
    total = recipe.tiles(source.height, source.width, source.pages)
    progress = Progress(tiles_total=total, pages_total=source.pages, on_page=on_progress)

    def on_batch(tiles: int) -> None:
        if on_progress is not None:
            on_progress(progress)
        if cancelled is not None and cancelled():
            raise Cancelled("the section job was cancelled")

    def computed(entry: TiledImage | TileGroup) -> object:
        run_tiles(entry, run, on_batch)
        return entry.result()

    async def compute(entry: TiledImage | TileGroup) -> object:
        return await asyncio.to_thread(computed, entry)

    work = segment_to_file(
        source,
        SegmentRequest((output,)),
        recipe,
        Path(path),
        compute=compute,
        progress=progress,
        bigtiff=bigtiff,
    )
    asyncio.run(work)
