"""`POST /v1/segment`: an image in, its mask (or probabilities, or an overlay) out; a
multi-page TIFF in, the same pages out."""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from unet_service.api.auth import require_api_key
from unet_service.api.errors import ApiError
from unet_service.api.routes.common import arrival, get_service, timing_headers, wait_for_disconnect
from unet_service.api.uploads import read_image_upload
from unet_service.imaging.encode import (
    instances_image,
    instances_tiff,
    mask_png,
    mask_tiff,
    overlay_png,
    overlay_tiff,
    probabilities_npy,
    probabilities_npy_pages,
    slices,
)
from unet_service.pipeline.outputs import TTA_VIEWS as VARIANTS
from unet_service.serving.service import InferenceService, SegmentResult

router = APIRouter(tags=["segmentation"])


class Output(StrEnum):
    mask = "mask"
    probabilities = "probabilities"
    overlay = "overlay"
    instances = "instances"


_ERROR = {"content": {"application/json": {"example": {"error": "..."}}}}
_HEADERS = {
    "X-Model-Name": "Name of the model (from its card).",
    "X-Image-Width": "Width of the input image, pixels.",
    "X-Image-Height": "Height of the input image, pixels.",
    "X-Pages": "Pages of the input (a multi-page TIFF's count; 1 for any other image).",
    "X-Tile-Size": "Output tile size used for this image.",
    "X-Tiles": "Number of overlap tiles computed.",
    "X-Batches": "Forward passes that held this image's tiles (shared with other requests).",
    "X-Queue-Ms": "Wait from acceptance to the first forward pass.",
    "X-Inference-Ms": "From the first forward pass to the last tile stitched.",
    "X-Total-Ms": "From arrival to the response being ready.",
}

RESPONSES = {
    200: {
        "description": "The segmentation, as asked for by `output`.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/tiff": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            name: {"description": d, "schema": {"type": "string"}} for name, d in _HEADERS.items()
        },
    },
    401: {"description": "Missing or wrong bearer token (when UNET_API_KEY is set).", **_ERROR},
    413: {"description": "Upload or image larger than the limits.", **_ERROR},
    415: {"description": "Not an image in a supported format.", **_ERROR},
    422: {"description": "Empty, truncated or unusable image; missing `file` field.", **_ERROR},
    503: {"description": "Queue full or server not ready (see Retry-After).", **_ERROR},
    504: {"description": "Not done within UNET_REQUEST_TIMEOUT_S.", **_ERROR},
}

REQUEST_BODY = {
    "required": True,
    "description": "The image as multipart field `file` (PNG, JPEG, TIFF incl. 16-bit, BMP, "
    "WebP, GIF). A multi-page TIFF is a stack: every page (one size) is segmented and the "
    "answer has the same pages. The raw image bytes with `Content-Type: image/...` or "
    "`application/octet-stream` work too.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The image."}
                },
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


@router.post(
    "/v1/segment",
    summary="Segment an image",
    description="Upload one image; get its segmentation mask. Large images are cut into "
    "overlap tiles whose results are stitched exactly (the result equals one pass over the "
    "whole image), and the tiles share forward passes with other requests' tiles. A "
    "multi-page TIFF (a stack) gives every page's result, as one (D, H, W) TIFF volume with "
    "ImageJ hyperstack metadata (mask, instances, overlay) or an .npy with a leading page "
    "axis (probabilities); each page equals that page sent alone.",
    dependencies=[Depends(require_api_key)],
    responses=RESPONSES,
    openapi_extra={"requestBody": REQUEST_BODY},
    response_class=Response,
)
async def segment(
    request: Request,
    output: Output = Query(  # noqa: B008
        Output.mask,
        description="`mask`: PNG, 0/255 for one class, the class index for several. "
        "`probabilities`: float32 .npy, (H, W) for one class, (K, H, W) for several. "
        "`overlay`: RGB PNG of the mask tinted over the image. "
        "`instances`: cell labels (0 = background/membrane, 1..N = cells) from a seeded "
        "watershed of the probabilities, as a 16-bit PNG (a 32-bit TIFF beyond 65535 cells). "
        "For a stack of D pages: (D, H, W) TIFF volumes with ImageJ metadata (8-bit mask, "
        "RGB overlay (D, H, W, 3), 16-bit instances or 32-bit beyond 65535 cells, each page "
        "labelled on its own) and probabilities (D, H, W) or (D, K, H, W).",
    ),
    colour: Literal["classes", "instances"] | None = Query(
        None,
        description="For `output=overlay`: tint each class, or each cell instance in a "
        "colour of its own.",
    ),
    tta: int | None = Query(
        None,
        description="Test-time augmentation: 8 averages the probabilities of the image's 8 "
        "rotations and mirrorings (8 times the computation), 1 is off; default: the "
        "server's UNET_TTA.",
        json_schema_extra={"enum": [1, 8]},
    ),
) -> Response:
    service = get_service(request)
    if tta is not None and tta not in VARIANTS:
        raise ApiError(422, f"tta must be 1 or 8, got {tta}")
    if colour is not None and output is not Output.overlay:
        raise ApiError(422, "colour applies to output=overlay only")
    service.check_available()
    with service.arriving():
        data = await read_image_upload(request, service.settings.max_upload_bytes)
        pages = await service.decode(data)
        del data
        by_instance = output is Output.overlay and colour == "instances"
        if output is Output.instances or by_instance:
            service.check_instances(pages)
        wants_probabilities = output in (Output.probabilities, Output.instances) or by_instance
        job = await service.submit(pages, probabilities=wants_probabilities, tta=tta)
    result = await service.result(
        job, started=arrival(request), disconnected=lambda: wait_for_disconnect(request)
    )
    image = pages[0]
    height, width = image.shape[:2]
    out_channels = service.info.out_channels
    if len(pages) > 1:
        body, media, filename = await _stack_body(service, output, by_instance, pages, result)
    elif output is Output.mask:
        body = await asyncio.to_thread(mask_png, result.mask, out_channels)
        media, filename = "image/png", "mask.png"
    elif output is Output.probabilities:
        assert result.probabilities is not None
        body = await asyncio.to_thread(probabilities_npy, result.probabilities)
        media, filename = "application/octet-stream", "probabilities.npy"
    elif output is Output.instances:
        labels = (await service.instances(result))[0]
        body, media, filename = await asyncio.to_thread(instances_image, labels)
    else:
        labels = (await service.instances(result))[0] if by_instance else None
        body = await asyncio.to_thread(overlay_png, image, result.mask, labels)
        media, filename = "image/png", "overlay.png"
    headers = timing_headers(request, result, height, width, service.model_name)
    headers["X-Pages"] = str(len(pages))
    headers["Content-Disposition"] = f'inline; filename="{filename}"'
    headers["Content-Length"] = str(len(body))
    return StreamingResponse(slices(body), media_type=media, headers=headers)


async def _stack_body(
    service: InferenceService,
    output: Output,
    by_instance: bool,
    pages: list[np.ndarray],
    result: SegmentResult,
) -> tuple[bytes, str, str]:
    """A stack's answer: (body, media type, file name), with the pages in upload order."""
    masks = [page.mask for page in result.pages]
    if output is Output.mask:
        body = await asyncio.to_thread(mask_tiff, masks, service.info.out_channels)
        return body, "image/tiff", "mask.tif"
    if output is Output.probabilities:
        probabilities = [page.probabilities for page in result.pages]
        body = await asyncio.to_thread(probabilities_npy_pages, probabilities)
        return body, "application/octet-stream", "probabilities.npy"
    if output is Output.instances:
        body = await asyncio.to_thread(instances_tiff, await service.instances(result))
        return body, "image/tiff", "instances.tif"
    labels = await service.instances(result) if by_instance else None
    body = await asyncio.to_thread(overlay_tiff, pages, masks, labels)
    return body, "image/tiff", "overlay.tif"
