"""`POST /v1/jobs`: asynchronous section jobs, for stacks and images beyond the synchronous
limits. The upload goes to disk as it arrives, is checked (format, sizes, pages, room for
its result) before the 202, and is computed in the background by whichever replica claims
it (jobs.runner). `job_access.py` has the routes that follow, fetch and delete jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from unet_service.api.auth import Caller
from unet_service.api.errors import ERROR_RESPONSE, ApiError
from unet_service.api.job_views import job_json
from unet_service.api.named_input import names_input, read_named_input
from unet_service.api.routes.common import get_service
from unet_service.api.routes.segment import REQUEST_BODY, ModelName, segment_request
from unet_service.api.upload_stream import StreamedUpload
from unet_service.jobs.submit import submit_job, submit_location_job
from unet_service.pipeline.outputs import Colour, Output, ResultFormat


def job_router() -> APIRouter:
    """A router for job routes: every one takes the caller's key when the server has keys
    (UNET_API_KEY, UNET_API_KEYS), so every one may answer 401."""
    unauthorised = "Missing or wrong bearer token (when UNET_API_KEY is set)."
    return APIRouter(
        tags=["section jobs"], responses={401: {"description": unauthorised, **ERROR_RESPONSE}}
    )


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
    "(tiled, compressed, BigTIFF when large), one page per input page, or OME-Zarr stores "
    "(`format=zarr`). Instead of an upload, a JSON body or form may name an OME-Zarr image "
    '(`{"input": "PATH_OR_URL", "output_location": "PATH_OR_URL"}`) under the locations '
    "the server allows (UNET_DATA_ROOTS, UNET_DATA_URLS).",
    responses={
        403: {"description": "A named location the server may not use.", **ERROR_RESPONSE},
        409: {"description": "The output location already exists.", **ERROR_RESPONSE},
        413: {"description": "Upload, image or stack beyond the job limits.", **ERROR_RESPONSE},
        415: {"description": "Not an image in a supported format.", **ERROR_RESPONSE},
        422: {"description": "Truncated, corrupt or unusable image or stack.", **ERROR_RESPONSE},
        507: {
            "description": "The upload and its result would not fit in the job storage "
            "(UNET_JOBS_QUOTA_GB, or the disk), counting the results unfinished jobs will "
            "write.",
            **ERROR_RESPONSE,
        },
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def create_job(
    request: Request,
    caller: Caller,
    output: Annotated[
        Output,
        Query(
            description="As for /v1/segment, written as one (D, H, W) TIFF volume with "
            "ImageJ metadata: `mask` (uint8, 0/255 for one class), `probabilities` (float32; "
            "(D, H, W, K) without ImageJ metadata for several classes), `instances` (cell "
            "ids, uint16 while they fit, else uint32) or `overlay` (RGB). `instances`, "
            "`overlay` and `tta=8` compute each page whole, so each page must fit the "
            "synchronous limits (UNET_MAX_INSTANCE_PIXELS, UNET_MAX_PIXELS).",
        ),
    ] = "mask",
    colour: Annotated[
        Colour | None,
        Query(description="For `output=overlay`: tint each class, or each cell instance."),
    ] = None,
    tta: Annotated[
        int,
        Query(
            description="1 (off) or 8 (average the 8 rotations and mirrorings).",
            json_schema_extra={"enum": [1, 8]},
        ),
    ] = 1,
    model: ModelName = None,
    result_format: Annotated[
        ResultFormat | None,
        Query(
            alias="format",
            description="`tiff` (the default for uploads) or `zarr` (the default for a named "
            "OME-Zarr input): an OME-Zarr store computed block by block, masks and cell ids "
            "as a labels image, probabilities float32, with a pyramid; downloaded zipped. "
            "Gives mask, probabilities or instances, without tta.",
        ),
    ] = None,
) -> JSONResponse:
    service = get_service(request)
    runner = get_runner(request)
    ask = segment_request((output,), colour, tta)
    if names_input(request):
        named = await read_named_input(request)
        record = await submit_location_job(
            runner,
            ask,
            named.input,
            output_location=named.output_location,
            model=model,
            caller=caller,
            result_format=result_format or "zarr",
        )
    else:
        upload = StreamedUpload(request, service.settings.max_job_upload_bytes)
        raw = not request.headers.get("content-type", "").lower().startswith("multipart/")
        record = await submit_job(
            runner,
            ask,
            upload.chunks(),
            model=model,
            caller=caller,
            filename=lambda: upload.filename,
            declared_bytes=_declared_length(request) if raw else None,
            result_format=result_format or "tiff",
        )
    location = f"/v1/jobs/{record.id}"
    return JSONResponse(job_json(record), status_code=202, headers={"Location": location})


def _declared_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None
