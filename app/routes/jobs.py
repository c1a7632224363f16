"""`/v1/jobs`: asynchronous section jobs, for stacks and images beyond the synchronous
limits. The upload goes to disk as it arrives, is checked (format, sizes, pages) before the
202, and is computed in the background by whichever replica claims it (app.job_runner)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from app.auth import Caller
from app.errors import ApiError
from app.job_compute import open_input, streamed
from app.job_views import job_json, media_type_of
from app.jobtable import JobRecord
from app.routes.common import get_service
from app.routes.segment import REQUEST_BODY, Output
from app.service import image_error
from app.upload_stream import StreamedUpload
from model.imageio import ImageError
from model.tiled_image import VARIANTS
from model.tiling import plan_image

router = APIRouter(tags=["section jobs"])

_ERROR = {"content": {"application/json": {"example": {"error": "..."}}}}
JobId = Path(description="The job's id, as POST /v1/jobs returned it.")


def get_runner(request: Request):
    runner = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
    return runner


async def find_job(request: Request, job_id: str, caller: str | None) -> JobRecord:
    """The caller's job, or 404 (also for another key's job: its existence is not told)."""
    record = await asyncio.to_thread(get_runner(request).table.get, job_id)
    if record is None or record.owner != caller:
        raise ApiError(404, f"no job {job_id}")
    return record


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Start a section job",
    description="Upload an image or a multi-page TIFF stack (multipart field `file`, or the "
    "raw bytes) of any size up to UNET_MAX_JOB_PIXELS; it is segmented in the background. "
    "Answers 202 with the job (and `Location`); poll `GET /v1/jobs/{id}` for progress and "
    "fetch `GET /v1/jobs/{id}/result` when its state is `done`. Results are TIFF files "
    "(tiled, compressed, BigTIFF when large), one page per input page.",
    responses={
        401: {"description": "Missing or wrong bearer token.", **_ERROR},
        413: {"description": "Upload, image or stack beyond the job limits.", **_ERROR},
        415: {"description": "Not an image in a supported format.", **_ERROR},
        422: {"description": "Truncated, corrupt or unusable image or stack.", **_ERROR},
        507: {"description": "Job storage is full (UNET_JOBS_QUOTA_GB).", **_ERROR},
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def create_job(
    request: Request,
    caller: Caller,
    output: Output = Query(  # noqa: B008
        Output.mask,
        description="As for /v1/segment, written as one (D, H, W) TIFF volume with ImageJ "
        "metadata: `mask` (uint8, 0/255 for one class), `probabilities` (float32; (D, H, W, K) "
        "without ImageJ metadata for several classes), `instances` (cell ids, uint16 while "
        "they fit, else uint32) or `overlay` (RGB). "
        "`instances`, `overlay` and `tta=8` compute each page whole, so each page must fit "
        "the synchronous limits (UNET_MAX_INSTANCE_PIXELS, UNET_MAX_PIXELS).",
    ),
    colour: Literal["classes", "instances"] | None = Query(
        None, description="For `output=overlay`: tint each class, or each cell instance."
    ),
    tta: int = Query(
        1,
        description="1 (off) or 8 (average the 8 rotations and mirrorings).",
        json_schema_extra={"enum": [1, 8]},
    ),
) -> JSONResponse:
    service = get_service(request)
    runner = get_runner(request)
    settings = service.settings
    if tta not in VARIANTS:
        raise ApiError(422, f"tta must be 1 or 8, got {tta}")
    if colour is not None and output is not Output.overlay:
        raise ApiError(422, "colour applies to output=overlay only")
    if output is Output.instances or colour == "instances":
        service.check_instances()
    service.check_available()
    job_id = uuid.uuid4().hex
    files = runner.files
    upload = StreamedUpload(request, settings.max_job_upload_bytes)
    raw = not request.headers.get("content-type", "").lower().startswith("multipart/")
    try:
        size = await files.receive(
            job_id,
            upload.chunks(),
            settings.max_job_upload_bytes,
            expected_bytes=_declared_length(request) if raw else None,
        )
        path = files.input_path(job_id)
        try:
            source = await asyncio.to_thread(open_input, path, settings)
        except ImageError as e:
            raise image_error(e) from None
        with source:
            _check_page_limits(service, source, output, colour, tta)
        media_type = await asyncio.to_thread(media_type_of, path)
    except BaseException:
        await asyncio.to_thread(files.remove, job_id)
        raise
    now = time.time()
    record = JobRecord(
        id=job_id,
        owner=caller,
        state="queued",
        params={
            "output": output.value,
            "colour": colour,
            "tta": tta,
            "width": source.width,
            "height": source.height,
        },
        input_name=upload.filename,
        input_bytes=size,
        input_type=media_type,
        created_at=now,
        started_at=None,
        finished_at=None,
        updated_at=now,
        pages_total=source.pages,
        tiles_total=source.pages
        * tta
        * len(
            plan_image(
                source.height, source.width, service.segmenter.geometry, service.info.tile_sizes
            )
        ),
    )
    await asyncio.to_thread(runner.table.create, record)
    runner.wake()
    await runner.refresh_metrics()
    location = f"/v1/jobs/{job_id}"
    return JSONResponse(job_json(record), status_code=202, headers={"Location": location})


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _check_page_limits(service, source, output: Output, colour, tta: int) -> None:
    """Whole-page outputs hold each page in memory like a request: the same limits."""
    if streamed(output.value, tta):
        return
    pixels = source.height * source.width
    if output is Output.instances or colour == "instances":
        limit, name = service.settings.max_instance_pixels, "UNET_MAX_INSTANCE_PIXELS"
    else:
        limit, name = service.settings.max_pixels, "UNET_MAX_PIXELS"
    if pixels > limit:
        raise ApiError(
            413,
            f"output={output.value}{' with tta=8' if tta > 1 else ''} computes each page "
            f"whole, and a {source.width}x{source.height} page is more than {name} "
            f"({limit}) pixels; mask and probabilities without tta are computed tile by tile "
            "at any size",
        )


@router.get("/v1/jobs", summary="List your section jobs")
async def list_jobs(request: Request, caller: Caller) -> dict:
    records = await asyncio.to_thread(get_runner(request).table.list, caller)
    return {"jobs": [job_json(r) for r in records]}


@router.get(
    "/v1/jobs/{job_id}",
    summary="A section job's state and progress",
    responses={404: {"description": "No such job (for this key).", **_ERROR}},
)
async def get_job(request: Request, caller: Caller, job_id: str = JobId) -> dict:
    return job_json(await find_job(request, job_id, caller))


@router.get(
    "/v1/jobs/{job_id}/result",
    summary="Download a finished job's result",
    response_class=Response,
    responses={
        200: {"description": "The result TIFF.", "content": {"image/tiff": {}}},
        404: {"description": "No such job (for this key).", **_ERROR},
        409: {"description": "The job is not done (yet, or it failed or was cancelled).", **_ERROR},
    },
)
async def get_result(request: Request, caller: Caller, job_id: str = JobId) -> Response:
    record = await find_job(request, job_id, caller)
    if record.state != "done":
        detail = f": {record.error}" if record.error else ""
        raise ApiError(409, f"job {job_id} is {record.state}, it has no result{detail}")
    path = get_runner(request).files.result_path(job_id)
    if not path.exists():
        raise ApiError(404, f"the result of job {job_id} is gone (expired or deleted)")
    return FileResponse(
        path,
        media_type=record.result_type or "image/tiff",
        filename=f"{job_id}-{record.result_name or 'result.tif'}",
        content_disposition_type="attachment",
    )


@router.delete(
    "/v1/jobs/{job_id}",
    summary="Cancel and delete a section job",
    responses={404: {"description": "No such job (for this key).", **_ERROR}},
)
async def delete_job(request: Request, caller: Caller, job_id: str = JobId) -> dict:
    runner = get_runner(request)
    record = await find_job(request, job_id, caller)
    cancelled = await asyncio.to_thread(runner.table.cancel, job_id)
    await asyncio.to_thread(runner.table.delete, job_id)
    # A replica working on it sees the job gone at its next progress report and stops;
    # the files go now (its temporary result goes when it stops).
    await asyncio.to_thread(runner.files.remove, job_id)
    await runner.refresh_metrics()
    final = cancelled or record
    return {"id": job_id, "deleted": True, "state": final.state}
