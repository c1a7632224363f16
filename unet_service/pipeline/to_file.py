"""A source's pages through the pipeline into one result file: the same recipe for a section
job in the service and for `unet-predict` on a huge image. Only the way tiles are computed
differs, and it is handed in (`Compute`): the service's shared tile queue, or a batch runner
in a thread of the command line. Two ways through, chosen by the request:

- streamed (mask, probabilities): each page is tiled from the source as its tiles are
  computed, and its output rows go to a tiled, compressed TIFF as soon as they are stitched
  (`pipeline.sinks.BandSink`): memory stays flat in the image's size.
- whole pages (instances, overlay, and test-time augmentation): each page is read and
  segmented in memory like a request, then handed to the same kind of writer, a page at a
  time.

Either way the result is one (D, H, W) volume (imaging.tiff_volume). Cell ids are 16-bit while
every page's fit, as /v1/segment sends them, but the largest is known only once every page is
labelled: pages are spooled as 32-bit to a file beside the result and copied as 16-bit at the
end (one more pass over the compressed ids, small beside the labelling), or the spool itself
becomes the result when some page has more than 65535 cells. Blocking work (reading pages,
labelling, writing) runs in threads, so an event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_service.core.tiling import TileCounts
from unet_service.imaging.decode import match_channels
from unet_service.imaging.encode import mask_pixels, overlay_rgb
from unet_service.imaging.sources import ArraySource, Source
from unet_service.imaging.tiff_source import TiffSource
from unet_service.imaging.tiff_volume import labels_dtype
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.outputs import SegmentRequest, result_layout
from unet_service.pipeline.recipe import Recipe
from unet_service.pipeline.sinks import BandSink, Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TileGroup

# Beside the result: the 32-bit cell ids of an instances result until the last page is done.
LABELS_SPOOL = "labels.part"

# Computes every tile of a queue entry and returns its result.
Compute = Callable[[TiledImage | TileGroup], Awaitable[Any]]


@dataclass
class Progress:
    tiles_total: int = 0
    pages_total: int = 0
    pages_done: int = 0
    finished_tiles: int = 0  # of the pages (or blocks) done
    resumed_tiles: int = 0  # of those, done by an earlier attempt (blocks already written)
    page: TileCounts | None = None  # the page being computed
    # Told after every page (a job's worker instead reads the counts when it reports).
    on_page: Callable[[Progress], None] | None = None

    @property
    def tiles_done(self) -> int:
        return self.finished_tiles + (self.page.done if self.page is not None else 0)


async def segment_to_file(
    source: Source,
    request: SegmentRequest,
    recipe: Recipe,
    path: Path,
    *,
    compute: Compute,
    progress: Progress,
    instances: Callable[[np.ndarray], np.ndarray] | None = None,
    bigtiff: bool | None = None,
) -> None:
    """Every page of `source` into the result file at `path` (deleted on any error), its
    one output as `request` says. `instances`: (K, H, W) probabilities -> (H, W) cell ids."""
    (output,) = request.outputs
    if request.labels and instances is None:
        raise ValueError("cell instances need the model's labelling")
    if request.streamed:
        await _streamed(source, output, recipe, path, compute, progress, bigtiff)
    else:
        await _whole_pages(source, request, recipe, path, compute, progress, instances)


async def _computed(entry: TiledImage | TileGroup, compute: Compute, progress: Progress) -> Any:
    """One page's entry through `compute`; the progress counts its tiles as they are done."""
    progress.page = entry
    try:
        result = await compute(entry)
    finally:
        progress.page = None
    progress.finished_tiles += entry.total
    progress.pages_done += 1
    if progress.on_page is not None:
        progress.on_page(progress)
    return result


def open_writer(
    path: str | Path,
    source: Source,
    out_channels: int,
    output: str = "mask",
    bigtiff: bool | None = None,
    ids: type = np.uint32,
) -> SectionWriter:
    """The result file for `source`, one page per input page, laid out as each output's
    pages are: mask and probabilities as `result_layout` says, overlay RGB, instances
    `ids`."""
    samples, rgb = 1, False
    if output == "overlay":
        dtype, samples, rgb = np.dtype(np.uint8), 3, True
    elif output == "instances":
        dtype = np.dtype(ids)
    else:
        dtype, samples = result_layout(output, out_channels)  # type: ignore[arg-type]
    return SectionWriter(
        path,
        pages=source.pages,
        height=source.height,
        width=source.width,
        dtype=dtype,
        samples=samples,
        rgb=rgb,
        bigtiff=bigtiff,
    )


@contextlib.asynccontextmanager
async def _writing(open_result: Callable[[], SectionWriter]) -> AsyncIterator[SectionWriter]:
    """A result writer, opened, then closed (which waits for the last band to be compressed
    and written) or on any error aborted (which joins its thread and deletes the file)."""
    writer = await asyncio.to_thread(open_result)
    try:
        yield writer
    except BaseException:
        await asyncio.shield(asyncio.to_thread(writer.abort))
        raise
    await asyncio.to_thread(writer.close)


async def _streamed(source, output, recipe, path, compute, progress, bigtiff) -> None:
    classes = recipe.out_channels
    opened = functools.partial(open_writer, path, source, classes, output, bigtiff)
    async with _writing(opened) as writer:
        for page in range(source.pages):

            def sink(plan, page=page):
                return BandSink(plan, page, writer, output, classes)

            await _computed(recipe.page(source, page, sink), compute, progress)


async def _put(writer: SectionWriter, plane: np.ndarray) -> None:
    """One whole page to the writer, waiting (in a thread) until it has taken it: the writer
    holds at most the page it compresses while the next is computed."""
    writer.write_rows(plane)
    await asyncio.to_thread(writer.wait_for_room)


def _page_in_memory(source: Source, page: int, recipe: Recipe, request: SegmentRequest):
    pixels = source.read(page, 0, source.height, 0, source.width)
    prepared = ArraySource(match_channels(pixels, recipe.in_channels))
    entry = recipe.in_memory(prepared, probabilities=request.probabilities, tta=request.tta)
    return pixels, entry


async def _whole_pages(source, request, recipe, path, compute, progress, instances) -> None:
    (output,) = request.outputs
    labelled = output == "instances"
    target = path.with_name(LABELS_SPOOL) if labelled else path
    top_id = 0
    try:
        opened = functools.partial(open_writer, target, source, recipe.out_channels, output)
        async with _writing(opened) as writer:
            for page in range(source.pages):
                pixels, entry = await asyncio.to_thread(
                    _page_in_memory, source, page, recipe, request
                )
                result = await _computed(entry, compute, progress)
                labels = None
                if request.labels:
                    labels = await asyncio.to_thread(instances, result.probabilities)
                plane = await asyncio.to_thread(
                    _page_output, output, pixels, result, labels, recipe.out_channels
                )
                if labelled:
                    top_id = max(top_id, int(await asyncio.to_thread(np.max, plane)))
                await _put(writer, plane)
        if labelled:
            await _labels_result(target, path, source, top_id)
    finally:
        if labelled:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


async def _labels_result(spool: Path, path: Path, source: Source, top_id: int) -> None:
    """The spooled 32-bit cell ids become the result: as they are when some id needs 32
    bits, else copied page by page as 16-bit."""
    ids = labels_dtype(top_id)
    if ids == np.uint32:
        await asyncio.to_thread(os.replace, spool, path)
        return
    limits = {"max_pixels": source.pixels, "max_pages": source.pages}
    spooled = await asyncio.to_thread(functools.partial(TiffSource, spool, **limits))
    try:
        opened = functools.partial(open_writer, path, source, 1, "instances", None, ids.type)
        async with _writing(opened) as writer:
            for page in range(source.pages):
                ids_of_page = await asyncio.to_thread(
                    spooled.read_stored, page, 0, source.height, 0, source.width
                )
                await _put(writer, ids_of_page[..., 0].astype(ids))
    finally:
        spooled.close()


def _page_output(
    output: str,
    pixels: np.ndarray,
    result: Segmentation,
    labels: np.ndarray | None,
    out_channels: int,
) -> np.ndarray:
    """A page of the result as the streamed results lay it out: (H, W) planes, samples
    last (RGB, or one per class)."""
    if output == "instances":
        assert labels is not None
        return labels.astype(np.uint32)
    if output == "overlay":
        return overlay_rgb(pixels, result.mask, labels)
    if output == "probabilities":
        probs = result.probabilities
        assert probs is not None
        return probs[0] if probs.shape[0] == 1 else np.ascontiguousarray(probs.transpose(1, 2, 0))
    return mask_pixels(result.mask, out_channels)
