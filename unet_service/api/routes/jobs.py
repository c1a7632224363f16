"""`POST /v1/jobs`: asynchronous section jobs, for stacks and images beyond the synchronous
limits. The upload goes to disk as it arrives, is checked (format, sizes, pages, room for
its result) before the 202, and is computed in the background by whichever replica claims
it (jobs.runner). `job_access.py` has the routes that follow, fetch and delete jobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from unet_service.api.auth import Caller
from unet_service.api.errors import ApiError
from unet_service.api.job_views import job_json, media_type_of
from unet_service.api.routes.common import get_service
from unet_service.api.routes.segment import REQUEST_BODY, Output
from unet_service.api.upload_stream import StreamedUpload
from unet_service.core.tiling import plan_image
from unet_service.imaging.errors import ImageError
from unet_service.jobs.compute import open_input
from unet_service.jobs.table import JobRecord
from unet_service.pipeline.outputs import TTA_VIEWS as VARIANTS
from unet_service.pipeline.outputs import SegmentRequest, result_nbytes
from unet_service.serving.service import image_error

ERROR = {"content": {"application/json": {"example": {"error": "..."}}}}


def job_router() -> APIRouter:
    """A router for job routes: every one takes the caller's key when the server has keys
    (UNET_API_KEY, UNET_API_KEYS), so every one may answer 401."""
    unauthorised = "Missing or wrong bearer token (when UNET_API_KEY is set)."
    return APIRouter(tags=["section jobs"], responses={401: {"description": unauthorised, **ERROR}})


router = job_router()


def get_runner(request: Request):
    runner = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
    return runner


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
        413: {"description": "Upload, image or stack beyond the job limits.", **ERROR},
        415: {"description": "Not an image in a supported format.", **ERROR},
        422: {"description": "Truncated, corrupt or unusable image or stack.", **ERROR},
        507: {
            "description": "The upload and its result would not fit in the job storage "
            "(UNET_JOBS_QUOTA_GB, or the disk), counting the results unfinished jobs will "
            "write.",
            **ERROR,
        },
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
            reserved=await asyncio.to_thread(runner.table.reserved),
        )
        path = files.input_path(job_id)
        try:
            source = await asyncio.to_thread(open_input, path, settings)
        except ImageError as e:
            raise image_error(e) from None
        with source:
            _check_page_limits(service, source, output, colour, tta)
            reserve = result_nbytes(
                source.pixels, source.pages, output.value, service.segmenter.out_channels
            )
        media_type = await asyncio.to_thread(media_type_of, path)
        now = time.time()
        plan = plan_image(
            source.height, source.width, service.segmenter.geometry, service.info.tile_sizes
        )
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
            tiles_total=source.pages * tta * len(plan),
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
    location = f"/v1/jobs/{job_id}"
    return JSONResponse(job_json(record), status_code=202, headers={"Location": location})


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _check_page_limits(service, source, output: Output, colour, tta: int) -> None:
    """Whole-page outputs hold each page in memory like a request: the same limits."""
    if SegmentRequest((output.value,), colour, tta).streamed:
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
