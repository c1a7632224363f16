"""One section job from its input file to its result file, page by page through the tile
queue. Two ways, chosen by the output:

- streamed (mask, probabilities): each page is a `pipeline.section` image whose tiles are read
  from the input file as they are computed and whose output rows are written to a tiled,
  compressed TIFF as soon as they are stitched: memory stays flat in the image's size.
- whole pages (instances, overlay, and test-time augmentation): each page is decoded and
  segmented in memory like a /v1/segment request (so within UNET_MAX_INSTANCE_PIXELS /
  UNET_MAX_PIXELS per page), then handed to the same kind of writer, a page at a time.

Either way the result is one (D, H, W) volume (imaging.tiff_volume). Cell ids are 16-bit while
every page's fit, as /v1/segment sends them, but the largest is known only once every page is
labelled: pages are spooled as 32-bit to a file beside the result and copied as 16-bit at the
end (one more pass over the compressed ids, small beside the labelling), or the spool itself
becomes the result when some page has more than 65535 cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from unet_service.imaging.encode import mask_pixels, overlay_rgb
from unet_service.imaging.sources import Source, open_source
from unet_service.imaging.tiff_volume import labels_dtype
from unet_service.imaging.tiff_writer import SectionWriter
from unet_service.pipeline.outputs import result_layout
from unet_service.pipeline.section import open_writer, section_image
from unet_service.pipeline.sinks import Segmentation

if TYPE_CHECKING:
    from unet_service.jobs.runner import JobRunner, Progress
    from unet_service.jobs.table import JobRecord
    from unet_service.settings import Settings

STREAMED_OUTPUTS = ("mask", "probabilities")
# Beside the result.part: the 32-bit cell ids of an instances job until the last page is done.
LABELS_SPOOL = "labels.part"


class JobLost(Exception):
    """The job was cancelled, deleted or taken over by another replica while it ran."""


@dataclass
class ResultFile:
    bytes: int
    media_type: str
    name: str


def streamed(output: str, tta: int) -> bool:
    """Whether a job with this output is computed tile by tile from the file on disk."""
    return output in STREAMED_OUTPUTS and tta == 1


def open_input(path: Path, settings: Settings) -> Source:
    """The job's input, checked (sizes, pages, corruption): the route calls this before it
    answers 202, so a bad upload is a 4xx and never a failed job. Formats other than TIFF
    cannot be read by window and are decoded whole, up to UNET_MAX_PIXELS."""
    s = settings
    return open_source(
        path,
        max_pixels=s.max_job_pixels,
        max_pages=s.max_job_pages,
        max_decoded_pixels=s.max_pixels,
    )


async def compute_job(
    runner: JobRunner,
    record: JobRecord,
    progress: Progress,
    report: Callable[[], Awaitable[None]],
) -> ResultFile:
    settings = runner.settings
    output = record.params["output"]
    tta = int(record.params.get("tta", 1))
    source = await asyncio.to_thread(open_input, runner.files.input_path(record.id), settings)

    async def compute(tmp: Path) -> None:
        if streamed(output, tta):
            await _streamed(runner, source, output, tmp, progress)
        else:
            await _whole_pages(runner, record, source, tmp, progress)

    files = runner.files
    tmp = await asyncio.to_thread(files.result_part, record.id)
    task = asyncio.ensure_future(compute(tmp))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=settings.job_progress_s)
            if done:
                task.result()
                break
            await report()
        await asyncio.to_thread(files.commit_result, record.id)
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        files.discard_result(record.id)
        raise
    finally:
        source.close()
    path = files.result_path(record.id)
    return ResultFile(path.stat().st_size, "image/tiff", f"{output}.tif")


async def _page(runner: JobRunner, image, progress: Progress) -> Segmentation:
    """One page image through the tile queue as a background image; the progress counts
    its tiles as they are stitched."""
    queued = runner.service.submit_background(image)
    progress.page = image
    try:
        result = await queued.future
    finally:
        runner.service.batcher.cancel(queued)
        progress.page = None
    progress.finished_tiles += image.total
    progress.pages_done += 1
    return result


@contextlib.asynccontextmanager
async def _writing(open_result: Callable[[], SectionWriter]) -> AsyncIterator[SectionWriter]:
    """A result writer, opened, then closed (which waits for the last band to be compressed
    and written) or on any error aborted (which joins its thread and deletes the file): in
    threads, so the event loop never waits on the disk."""
    writer = await asyncio.to_thread(open_result)
    try:
        yield writer
    except BaseException:
        await asyncio.shield(asyncio.to_thread(writer.abort))
        raise
    await asyncio.to_thread(writer.close)


async def _streamed(runner, source, output, tmp, progress) -> None:
    segmenter = runner.service.segmenter
    tile_sizes = runner.service.info.tile_sizes
    opened = functools.partial(open_writer, tmp, source, segmenter.out_channels, output)
    async with _writing(opened) as writer:
        for page in range(source.pages):
            image = section_image(segmenter, source, page, writer, tile_sizes, output)
            await _page(runner, image, progress)


def _whole_pages_writer(
    path: Path, source: Source, output: str, out_channels: int, ids: type = np.uint32
) -> SectionWriter:
    """The result of a job computed page by page, laid out as `_page_output` makes pages:
    mask and probabilities as a streamed result, overlay RGB, instances `ids`."""
    samples, rgb = 1, False
    if output == "overlay":
        dtype, samples, rgb = np.dtype(np.uint8), 3, True
    elif output == "instances":
        dtype = np.dtype(ids)
    else:
        dtype, samples = result_layout(output, out_channels)
    return SectionWriter(
        path,
        pages=source.pages,
        height=source.height,
        width=source.width,
        dtype=dtype,
        samples=samples,
        rgb=rgb,
    )


async def _put(writer: SectionWriter, plane: np.ndarray) -> None:
    """One whole page to the writer, waiting (in a thread) until it has taken it: the writer
    holds at most the page it compresses while the next is computed."""
    writer.write_rows(plane)
    await asyncio.to_thread(writer.wait_for_room)


async def _whole_pages(runner, record, source, tmp, progress) -> None:
    service = runner.service
    out_channels = service.info.out_channels
    output = record.params["output"]
    tta = int(record.params.get("tta", 1))
    by_instance = output == "instances" or record.params.get("colour") == "instances"
    probabilities = output in ("probabilities", "instances") or by_instance
    labelled = output == "instances"
    target = tmp.with_name(LABELS_SPOOL) if labelled else tmp
    top_id = 0
    try:
        opened = functools.partial(_whole_pages_writer, target, source, output, out_channels)
        async with _writing(opened) as writer:
            for page in range(source.pages):
                pixels = await asyncio.to_thread(
                    source.read, page, 0, source.height, 0, source.width
                )
                image = await asyncio.to_thread(
                    service.segmenter.tiled, pixels, service.info.tile_sizes, probabilities, tta
                )
                result = await _page(runner, image, progress)
                labels = None
                if by_instance:
                    labels = await asyncio.to_thread(
                        service.segmenter.instances, result.probabilities
                    )
                plane = await asyncio.to_thread(
                    _page_output, output, pixels, result, labels, out_channels
                )
                if labelled:
                    top_id = max(top_id, int(await asyncio.to_thread(np.max, plane)))
                await _put(writer, plane)
        if labelled:
            await _labels_result(target, tmp, source, top_id)
    finally:
        if labelled:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


async def _labels_result(spool: Path, tmp: Path, source: Source, top_id: int) -> None:
    """The spooled 32-bit cell ids become the result: as they are when some id needs 32
    bits, else copied page by page as 16-bit."""
    ids = labels_dtype(top_id)
    if ids == np.uint32:
        await asyncio.to_thread(os.replace, spool, tmp)
        return
    tif = await asyncio.to_thread(tifffile.TiffFile, spool)
    try:
        opened = functools.partial(_whole_pages_writer, tmp, source, "instances", 1, ids.type)
        async with _writing(opened) as writer:
            for page in range(source.pages):
                await _put(writer, await asyncio.to_thread(_spooled_page, tif, page, ids))
    finally:
        tif.close()


def _spooled_page(tif: tifffile.TiffFile, index: int, dtype: np.dtype) -> np.ndarray:
    return tif.pages[index].asarray().astype(dtype)


def _page_output(output: str, pixels, result, labels, out_channels: int) -> np.ndarray:
    """A page of the result as the streamed results lay it out: (H, W) planes, samples
    last (RGB, or one per class)."""
    if output == "instances":
        return labels.astype(np.uint32)
    if output == "overlay":
        return overlay_rgb(pixels, result.mask, labels)
    if output == "probabilities":
        probs = result.probabilities
        return probs[0] if probs.shape[0] == 1 else np.ascontiguousarray(probs.transpose(1, 2, 0))
    return mask_pixels(result.mask, out_channels)
