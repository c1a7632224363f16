"""One section job from its input file to its result file: the job's request and input,
computed by `pipeline.to_file` with the service's tile queue (each page's tiles as background
work, computed when no request's tiles wait), its progress reported while it runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from unet_service.imaging.sources import Source, open_source
from unet_service.jobs.files import JobFiles
from unet_service.jobs.table.records import JobRecord
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.pipeline.to_file import Progress, segment_to_file
from unet_service.serving.service import InferenceService
from unet_service.settings import Settings


class JobLost(Exception):
    """The job was cancelled, deleted or taken over by another replica while it ran."""


@dataclass
class ResultFile:
    bytes: int
    media_type: str
    name: str


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


def job_request(params: dict) -> SegmentRequest:
    """The request a job's record holds."""
    return SegmentRequest((params["output"],), params.get("colour"), int(params.get("tta", 1)))


async def compute_job(
    record: JobRecord,
    *,
    service: InferenceService,
    files: JobFiles,
    settings: Settings,
    progress: Progress,
    report: Callable[[], Awaitable[None]],
) -> ResultFile:
    """The job's result, its pages' tiles queued on `service` as background work; `report`
    is awaited every UNET_JOB_PROGRESS_S while it runs (raising JobLost stops it)."""
    request = job_request(record.params)
    # A job from before the service served several models names none: the default one.
    async with service.models.hold(record.params.get("model")) as model:
        source = await asyncio.to_thread(open_input, files.input_path(record.id), settings)
        try:
            await _run(record, request, model, source, service, files, settings, progress, report)
        finally:
            source.close()
    path = files.result_path(record.id)
    return ResultFile(path.stat().st_size, "image/tiff", f"{request.outputs[0]}.tif")


async def _run(record, request, model, source, service, files, settings, progress, report) -> None:
    async def compute(entry):
        queued = service.submit_background(model, entry)
        try:
            return await queued.future
        finally:
            service.batcher.cancel(queued)

    tmp = await asyncio.to_thread(files.result_part, record.id)
    work = segment_to_file(
        source,
        request,
        model.recipe,
        tmp,
        compute=compute,
        progress=progress,
        instances=model.segmenter.instances if request.labels else None,
    )
    task = asyncio.ensure_future(work)
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
