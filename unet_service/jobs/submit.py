"""A section job accepted, or refused before it is: the one way in for a job, whatever brings
its input. An upload goes to disk as it arrives; an OME-Zarr image named by location is read
where it is, if the operator allows that location. Either is checked (format, sizes, pages,
its values, the limits of outputs held page by page, room for it and its result) before the
job's row exists; a refused job leaves nothing behind. Raises `unet_service.errors` and
`imaging.errors`, which `api.errors` answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from unet_service.errors import ConflictError, InvalidRequestError
from unet_service.imaging.decode import match_channels, media_type_of
from unet_service.imaging.location import location_exists
from unet_service.imaging.sources import Source, open_zarr
from unet_service.jobs.compute import open_input
from unet_service.jobs.runner import JobRunner
from unet_service.jobs.table.records import JobRecord
from unet_service.locations import allowed_location
from unet_service.pipeline.outputs import (
    STORE_OUTPUTS,
    ResultFormat,
    SegmentRequest,
    result_nbytes,
    store_nbytes,
)
from unet_service.pipeline.to_store import plan_volume
from unet_service.serving.limits import check_instances, check_job, check_measured

ZARR_MEDIA_TYPE = "application/vnd.ome-zarr"


def check_format(request: SegmentRequest, result_format: ResultFormat) -> None:
    """OME-Zarr results are computed block by block: masks, probabilities and cell ids."""
    if result_format != "zarr":
        return
    (output,) = request.outputs
    if output not in STORE_OUTPUTS or request.tta != 1:
        raise InvalidRequestError(
            f"format=zarr gives {', '.join(STORE_OUTPUTS)} without tta; "
            f"ask format=tiff for output={output}{' with tta=8' if request.tta != 1 else ''}"
        )


async def submit_job(
    runner: JobRunner,
    request: SegmentRequest,
    chunks: AsyncIterator[bytes],
    *,
    model: str | None = None,
    caller: str | None,
    filename: Callable[[], str],
    declared_bytes: int | None = None,
    result_format: ResultFormat = "tiff",
) -> JobRecord:
    """Receive an upload (`chunks`; `filename()` is the name its sender gave it, known once
    it has arrived) and accept it as a job computing `request` with model `model` (None: the
    default one) into a `result_format` result, or refuse it."""
    service, settings, files = runner.service, runner.settings, runner.files
    name = service.models.entry(model).name  # an unknown model is refused before the upload
    check_format(request, result_format)
    if request.labels:
        check_instances(settings, service.models.info(name).out_channels)
    service.check_available()
    job_id = uuid.uuid4().hex
    try:
        size = await files.receive(
            job_id,
            chunks,
            settings.max_job_upload_bytes,
            expected_bytes=declared_bytes,
            reserved=await asyncio.to_thread(runner.table.reserved),
        )
        path = files.input_path(job_id)
        source = await asyncio.to_thread(open_input, path, settings)
        with source:
            record = await _record(runner, job_id, request, name, source, result_format, None)
        record.owner, record.input_name, record.input_bytes = caller, filename(), size
        record.input_type = await asyncio.to_thread(media_type_of, path)
        await _admit(runner, record, size)
    except BaseException:
        await asyncio.to_thread(files.remove, job_id)
        raise
    return record


async def submit_location_job(
    runner: JobRunner,
    request: SegmentRequest,
    location: str,
    *,
    output_location: str | None = None,
    model: str | None = None,
    caller: str | None,
    result_format: ResultFormat = "zarr",
) -> JobRecord:
    """Accept the OME-Zarr image at `location` (a path or URL the settings allow) as a job,
    its result an OME-Zarr store at `output_location` (allowed the same way, and empty) or
    in the job's folder, or a TIFF there; or refuse it."""
    service, settings = runner.service, runner.settings
    name = service.models.entry(model).name
    check_format(request, result_format)
    if request.labels:
        check_instances(settings, service.models.info(name).out_channels)
    where = allowed_location(settings, location, "input")
    store = None
    if output_location is not None:
        if result_format != "zarr":
            raise InvalidRequestError("output_location is for OME-Zarr results (format=zarr)")
        store = allowed_location(settings, output_location, "output location")
        if await asyncio.to_thread(location_exists, store):
            raise ConflictError(f"the output location {output_location} already exists")
    service.check_available()
    limits = {"max_pixels": settings.max_job_pixels, "max_pages": settings.max_job_pages}
    source = await asyncio.to_thread(lambda: open_zarr(where, **limits))
    with source:
        record = await _record(
            runner, uuid.uuid4().hex, request, name, source, result_format, store
        )
    record.params["input_location"] = where
    record.owner, record.input_name, record.input_type = caller, location, ZARR_MEDIA_TYPE
    await _admit(runner, record, 0)
    return record


async def _record(
    runner: JobRunner,
    job_id: str,
    request: SegmentRequest,
    model_name: str,
    source: Source,
    result_format: ResultFormat,
    store: str | None,
) -> JobRecord:
    """The job's record, its input checked against the limits and its result's size."""
    settings = runner.settings
    recipe = (await runner.service.models.get(model_name)).recipe
    out_channels = recipe.out_channels
    (output,) = request.outputs
    match_channels(source.read(0, 0, 1, 0, 1), recipe.in_channels)  # refuses what cannot fit
    params = {
        "model": model_name,
        "output": output,
        "colour": request.colour,
        "tta": request.tta,
        "width": source.width,
        "height": source.height,
        "format": result_format,
    }
    if result_format == "zarr":
        if request.labels:
            check_instances(settings, out_channels)
        check_measured(settings, source.height, source.width, recipe.measure is not None)
        volume = plan_volume(source, recipe, request.outputs, settings.zarr_block)
        tiles = volume.total_tiles(recipe.geometry)
        reserve = 0 if store else store_nbytes(source.pixels, output, out_channels)
        named = store is not None
        store = store or str(runner.files.store_path(job_id))
        params.update(block=settings.zarr_block, store=store, store_named=named)
    else:
        measured = recipe.measure is not None
        check_job(settings, request, out_channels, source.height, source.width, measured)
        reserve = result_nbytes(source.pixels, source.pages, output, out_channels)
        tiles = recipe.tiles(source.height, source.width, source.pages, request.tta)
    now = time.time()
    return JobRecord(
        id=job_id,
        owner=None,
        state="queued",
        params=params,
        input_name="",
        input_bytes=0,
        input_type="",
        created_at=now,
        started_at=None,
        finished_at=None,
        updated_at=now,
        pages_total=source.pages,
        tiles_total=tiles,
        reserved_bytes=reserve,
    )


async def _admit(runner: JobRunner, record: JobRecord, input_bytes: int) -> None:
    """The room check and the job's row as one step on this replica: two jobs submitted
    together cannot both take the last room."""
    async with runner.admission:
        reserved = await asyncio.to_thread(runner.table.reserved)
        await asyncio.to_thread(
            runner.files.check_room, input_bytes, record.reserved_bytes, reserved
        )
        await asyncio.to_thread(runner.table.create, record)
    runner.wake()
    await runner.refresh_metrics()
