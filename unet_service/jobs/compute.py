"""One section job from its input to its result: the job's request and input (an upload in
its folder, or an OME-Zarr image at a location), computed with the service's tile queue (each
page's or block's tiles as background work, computed when no request's tiles wait) into a
TIFF (`pipeline.to_file`) or an OME-Zarr store (`pipeline.to_store`), its progress reported
while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_service.imaging.errors import ImageError
from unet_service.imaging.location import is_empty, location_exists, remove_location
from unet_service.imaging.sources import Source, open_source, open_zarr
from unet_service.imaging.zarr_result import ZarrResult
from unet_service.jobs.files import JobFiles, tree_bytes
from unet_service.jobs.table.records import JobRecord
from unet_service.pipeline.blocks import BlockJob
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.pipeline.to_file import Progress, segment_to_file
from unet_service.pipeline.to_store import (
    BlockRunner,
    create_results,
    plan_volume,
    segment_to_store,
    volume_of,
)
from unet_service.serving.models import LoadedModel
from unet_service.serving.service import InferenceService
from unet_service.settings import Settings

log = logging.getLogger("app.jobs")


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


def open_job_input(record: JobRecord, files: JobFiles, settings: Settings) -> Source:
    """The uploaded file, or the OME-Zarr image the job names."""
    location = record.params.get("input_location")
    if location is None:
        return open_input(files.input_path(record.id), settings)
    return open_zarr(location, max_pixels=settings.max_job_pixels, max_pages=settings.max_job_pages)


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
    """The job's result, its tiles queued on `service` as background work; `report` is
    awaited every UNET_JOB_PROGRESS_S while it runs (raising JobLost stops it)."""
    request = job_request(record.params)
    output = request.outputs[0]
    zarr = record.params.get("format") == "zarr"
    # A job from before the service served several models names none: the default one.
    async with service.models.hold(record.params.get("model")) as model:
        source = await asyncio.to_thread(open_job_input, record, files, settings)
        try:
            run = _run_store if zarr else _run
            await run(record, request, model, source, service, files, settings, progress, report)
        finally:
            source.close()
    if zarr:  # the bytes of a store in the job's folder count against the quota
        named = record.params.get("store_named")
        size = 0 if named else tree_bytes(Path(record.params["store"]))
        return ResultFile(size, "application/zip", f"{output}.zarr")
    path = files.result_path(record.id)
    return ResultFile(path.stat().st_size, "image/tiff", f"{output}.tif")


def _queue(service: InferenceService, model: LoadedModel):
    async def compute(entry):
        queued = service.submit_background(model, entry)
        try:
            return await queued.future
        finally:
            service.batcher.cancel(queued)

    return compute


async def _supervised(
    work: Awaitable[Any], settings: Settings, report: Callable[[], Awaitable[None]]
) -> Any:
    """`work`'s result, `report` awaited every UNET_JOB_PROGRESS_S meanwhile; the work is
    cancelled if reporting (or anything else) raises."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=settings.job_progress_s)
            if done:
                return task.result()
            await report()
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        raise


async def _run(record, request, model, source, service, files, settings, progress, report) -> None:
    tmp = await asyncio.to_thread(files.result_part, record.id)
    work = segment_to_file(
        source,
        request,
        model.recipe,
        tmp,
        compute=_queue(service, model),
        progress=progress,
        instances=model.segmenter.instances if request.labels else None,
    )
    try:
        await _supervised(work, settings, report)
        await asyncio.to_thread(files.commit_result, record.id)
    except BaseException:
        files.discard_result(record.id)
        raise


def _store(record: JobRecord, location: str, source: Source, model: LoadedModel) -> ZarrResult:
    """The job's result store: the one an earlier attempt began, or a new one (where an
    attempt was stopped before it had made one)."""
    if location_exists(location):
        try:
            result = ZarrResult.open(location)
        except ImageError:
            result = None
        if result is not None and result.info.get("job") == record.id:
            return result
        if record.params.get("store_named") and not is_empty(location):
            raise ImageError(f"{location} holds another result than this job's")
        remove_location(location)
    # The model's card, or a bioimage.io package's description of itself.
    request, card = job_request(record.params), model.info
    volume = plan_volume(source, model.recipe, request.outputs, record.params["block"])
    info = {
        "job": record.id,
        "input": record.params.get("input_location") or record.input_name,
        "model": model.name,
        "card": {
            "name": card.name,
            "threshold": card.threshold,
            "classes": card.class_names,
            "platform": card.platform,
        },
        "settings": {
            "output": request.outputs[0],
            "tile_size": volume.tile_size,
            "block": list(volume.block),
            "precision": getattr(model.segmenter, "precision", "fp32"),
        },
    }
    (output,) = request.outputs
    return create_results({output: location}, source, model.recipe, volume, info)[output]


def _cluster(
    record: JobRecord,
    job: BlockJob,
    service: InferenceService,
    files: JobFiles,
    settings: Settings,
) -> BlockRunner | None:
    """The job's blocks on the Dask cluster UNET_DASK_SCHEDULER names (None: in this
    server, through its tile queue)."""
    if not settings.dask_scheduler:
        return None
    from unet_service.serving.cluster import BlockTask, ModelSpec, on_cluster

    location = record.params.get("input_location")
    model = ModelSpec(
        str(service.models.entry(record.params.get("model")).weights),
        device=settings.device,
        precision=settings.precision,
        backend=settings.backend,
        max_pixels=settings.max_pixels,
        batch_cpu=settings.job_batch_tiles_for("cpu"),
        batch_cuda=settings.batch_tiles_for("cuda"),
    )
    task = BlockTask(
        record.id,
        location or str(files.input_path(record.id)),
        location is not None,
        {output: result.location for output, result in job.results.items()},
        model,
        job.labeller is not None,
        job.tag,
    )
    return on_cluster(settings.dask_scheduler, task)


async def _run_store(
    record, request, model, source, service, files, settings, progress, report
) -> None:
    location = record.params["store"]
    (output,) = request.outputs
    try:
        result = await asyncio.to_thread(_store, record, location, source, model)
        job = BlockJob(
            volume_of(result),
            source,
            model.recipe,
            {output: result},
            model.segmenter.instances if request.labels else None,
            tag=max(1, record.attempts),
        )
        work = segment_to_store(
            job,
            compute=_queue(service, model),
            runner=_cluster(record, job, service, files, settings),
            progress=progress,
            name=Path(record.input_name.rstrip("/")).name or record.id,
            class_names=model.info.class_names,
        )
        counts = await _supervised(work, settings, report)
    except Exception as e:
        # A failed job's store in its folder goes (an interrupted one stays, to resume).
        if not isinstance(e, JobLost) and not record.params.get("store_named"):
            files.discard_store(record.id)
        raise
    if counts.skipped:
        log.info(
            "job %s: %d of %d blocks were written before this attempt; computed %d",
            *(record.id, counts.skipped, counts.total, counts.computed),
        )
