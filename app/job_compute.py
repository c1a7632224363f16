"""One section job from its input file to its result file, page by page through the tile
queue. Two ways, chosen by the output:

- streamed (mask, probabilities): each page is a `model.section` image whose tiles are read
  from the input file as they are computed and whose output rows are written to a tiled,
  compressed TIFF as soon as they are stitched: memory stays flat in the image's size.
- whole pages (instances, overlay, and test-time augmentation): each page is decoded and
  segmented in memory like a /v1/segment request (so within UNET_MAX_INSTANCE_PIXELS /
  UNET_MAX_PIXELS per page), then appended to the result TIFF, one page at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from app.encoding import overlay_rgb
from model.section import open_writer, section_image
from model.section_source import SectionSource, open_section
from model.tiled_image import Segmentation, mask_pixels

if TYPE_CHECKING:
    from app.job_runner import JobRunner, Progress
    from app.jobtable import JobRecord
    from app.settings import Settings

STREAMED_OUTPUTS = ("mask", "probabilities")
RESULT_COMPRESSION = "zlib"


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


def open_input(path: Path, settings: Settings) -> SectionSource:
    """The job's input, checked (sizes, pages, corruption): the route calls this before it
    answers 202, so a bad upload is a 4xx and never a failed job. Formats other than TIFF
    cannot be read by window and are decoded whole, up to UNET_MAX_PIXELS."""
    s = settings
    return open_section(
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


async def _streamed(runner, source, output, tmp, progress) -> None:
    segmenter = runner.service.segmenter
    tile_sizes = runner.service.info.tile_sizes
    writer = await asyncio.to_thread(open_writer, tmp, source, segmenter.out_channels, output)
    # Closing waits for the last band to be compressed and written: in a thread, as is the
    # abort (which joins the writer's thread), so the event loop never waits on the disk.
    try:
        for page in range(source.pages):
            image = section_image(segmenter, source, page, writer, tile_sizes, output)
            await _page(runner, image, progress)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(writer.abort))
        raise
    await asyncio.to_thread(writer.close)


async def _whole_pages(runner, record, source, tmp, progress) -> None:
    service = runner.service
    output = record.params["output"]
    tta = int(record.params.get("tta", 1))
    by_instance = output == "instances" or record.params.get("colour") == "instances"
    probabilities = output in ("probabilities", "instances") or by_instance
    with tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        for page in range(source.pages):
            pixels = await asyncio.to_thread(source.read, page, 0, source.height, 0, source.width)
            image = await asyncio.to_thread(
                service.segmenter.tiled, pixels, service.info.tile_sizes, probabilities, tta
            )
            result = await _page(runner, image, progress)
            labels = None
            if by_instance:
                labels = await asyncio.to_thread(service.segmenter.instances, result.probabilities)
            plane = await asyncio.to_thread(
                _page_output, output, pixels, result, labels, service.info.out_channels
            )
            await asyncio.to_thread(
                writer.write,
                plane,
                compression=RESULT_COMPRESSION,
                tile=(256, 256),
                photometric="rgb" if output == "overlay" else "minisblack",
                planarconfig="contig",
            )


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
