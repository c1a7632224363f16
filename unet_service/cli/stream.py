"""`unet-predict`'s streaming path: a TIFF too large to decode (or any image with `--stream`)
is read by window and its result written as a tiled, compressed TIFF, in flat memory:
`pipeline.to_file` (the recipe of a section job) with a batch runner in a thread
(`run_section`, which the benchmark uses too). In memory at once: the source's cached band of
input chunks, the few bands still being stitched (about one, as tiles are taken in order and
computed a batch at a time) and the writer's bounded backlog."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import tifffile
from tqdm import tqdm

from unet_service.core.engine import TiledModel
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.decode import TIFF_MAGIC
from unet_service.imaging.errors import ImageError
from unet_service.imaging.sources import Source, open_source
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.outputs import Output, SegmentRequest
from unet_service.pipeline.sinks import BandSink
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.pipeline.to_file import Progress, segment_to_file

# Beyond this many pixels in one page a TIFF is streamed: the service's default
# UNET_MAX_PIXELS, about 1 GB of mask and probabilities in memory.
MAX_IN_MEMORY_PIXELS = 100_000_000
# What the streaming path accepts: a 100,000 x 100,000 section, or a stack of that many pixels.
MAX_STREAM_PIXELS = 10**10
MAX_STREAM_PAGES = 100_000


def wants_stream(path: Path, forced: bool) -> bool:
    """Whether `path` goes the streaming way: asked for, or a TIFF whose first page is too
    large to decode (its header says so; a broken one is left to the ordinary path)."""
    if forced:
        return True
    try:
        with open(path, "rb") as f:
            if f.read(4) not in TIFF_MAGIC:
                return False
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return page.imagelength * page.imagewidth > MAX_IN_MEMORY_PIXELS
    except Exception:
        return False


def stream_result_path(output_dir: Path, stem: str, output: Output) -> Path:
    return output_dir / (f"{stem}.tif" if output == "mask" else f"{stem}.probabilities.tif")


def predict_section(
    seg: TiledModel,
    path: Path,
    output_dir: Path,
    *,
    output: Output,
    tile_size: int,
    batch_size: int,
) -> Path:
    """Segment every page of `path` into DIR/<stem>.tif (mask: 0/255 for one class, the class
    index for several) or DIR/<stem>.probabilities.tif (float32, one sample per class). The
    file is written under a temporary name and renamed when complete."""
    target = stream_result_path(output_dir, path.stem, output)
    if target.exists() and target.samefile(path):
        raise ImageError(f"the result {target} would overwrite the input; choose another -o")
    partial = target.with_name(f".{target.name}.part")
    with (
        open_source(path, max_pixels=MAX_STREAM_PIXELS, max_pages=MAX_STREAM_PAGES) as source,
        tqdm(unit="tile", leave=False, file=sys.stderr) as bar,
    ):

        def progress(p: Progress) -> None:
            bar.total = p.tiles_total
            bar.update(p.tiles_done - bar.n)

        run_section(
            seg,
            source,
            partial,
            output=output,
            tile_sizes=tile_size,
            batch_size=batch_size,
            on_progress=progress,
        )
    partial.replace(target)
    return target


def section_image(
    segmenter: TiledModel,
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
    segmenter: TiledModel,
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
