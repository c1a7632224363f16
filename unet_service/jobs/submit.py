"""A section job accepted, or refused before it is: the one way in for a job, whatever brings
the upload. The upload goes to disk as it arrives and is checked (format, sizes, pages, its
values, the limits of outputs held page by page, room for it and its result) before the job's
row exists; a refused upload leaves nothing behind. Raises `unet_service.errors` and
`imaging.errors`, which `api.errors` answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

from unet_service.imaging.decode import media_type_of
from unet_service.jobs.compute import open_input
from unet_service.jobs.runner import JobRunner
from unet_service.jobs.table.records import JobRecord
from unet_service.pipeline.outputs import SegmentRequest, result_nbytes
from unet_service.serving.limits import check_instances, check_job


async def submit_job(
    runner: JobRunner,
    request: SegmentRequest,
    chunks: AsyncIterator[bytes],
    *,
    model: str | None = None,
    caller: str | None,
    filename: Callable[[], str],
    declared_bytes: int | None = None,
) -> JobRecord:
    """Receive an upload (`chunks`; `filename()` is the name its sender gave it, known once
    it has arrived) and accept it as a job computing `request` with model `model` (None: the
    default one), or refuse it."""
    service, settings, files = runner.service, runner.settings, runner.files
    name = service.models.entry(model).name  # an unknown model is refused before the upload
    info = service.models.info(name)
    out_channels = info.out_channels
    if request.labels:
        check_instances(settings, out_channels)
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
            recipe = (await service.models.get(name)).recipe
            measured = recipe.measure is not None
            check_job(settings, request, out_channels, source.height, source.width, measured)
            (output,) = request.outputs
            reserve = result_nbytes(source.pixels, source.pages, output, out_channels)
            tiles = recipe.tiles(source.height, source.width, source.pages, request.tta)
        now = time.time()
        record = JobRecord(
            id=job_id,
            owner=caller,
            state="queued",
            params={
                "model": name,
                "output": output,
                "colour": request.colour,
                "tta": request.tta,
                "width": source.width,
                "height": source.height,
            },
            input_name=filename(),
            input_bytes=size,
            input_type=await asyncio.to_thread(media_type_of, path),
            created_at=now,
            started_at=None,
            finished_at=None,
            updated_at=now,
            pages_total=source.pages,
            tiles_total=tiles,
            reserved_bytes=reserve,
        )
        # The room check and the job's row as one step on this replica: two uploads that
        # finish together cannot both take the last room.
        async with runner.admission:
            reserved = await asyncio.to_thread(runner.table.reserved)
            await asyncio.to_thread(files.check_room, size, reserve, reserved)
            await asyncio.to_thread(runner.table.create, record)
    except BaseException:
        await asyncio.to_thread(files.remove, job_id)
        raise
    runner.wake()
    await runner.refresh_metrics()
    return record
