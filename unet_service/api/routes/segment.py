"""`POST /v1/segment`: an image in, its mask (or probabilities, or an overlay) out; a
multi-page TIFF in, the same pages out."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from unet_service.api.auth import require_api_key
from unet_service.api.errors import ERROR_RESPONSE
from unet_service.api.routes.common import arrival, get_service, timing_headers, wait_for_disconnect
from unet_service.api.uploads import image_upload_body, read_image_upload
from unet_service.errors import InvalidRequestError
from unet_service.imaging.encode import encode_output, slices
from unet_service.pipeline.outputs import Colour, Output, SegmentRequest
from unet_service.serving.segment import segment as segment_image

router = APIRouter(tags=["segmentation"])


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
    401: {
        "description": "Missing or wrong bearer token (when UNET_API_KEY is set).",
        **ERROR_RESPONSE,
    },
    413: {"description": "Upload or image larger than the limits.", **ERROR_RESPONSE},
    415: {"description": "Not an image in a supported format.", **ERROR_RESPONSE},
    422: {
        "description": "Empty, truncated or unusable image; missing `file` field.",
        **ERROR_RESPONSE,
    },
    503: {"description": "Queue full or server not ready (see Retry-After).", **ERROR_RESPONSE},
    504: {"description": "Not done within UNET_REQUEST_TIMEOUT_S.", **ERROR_RESPONSE},
}

REQUEST_BODY = image_upload_body(
    "The image as multipart field `file` (PNG, JPEG, TIFF incl. 16-bit, BMP, "
    "WebP, GIF). A multi-page TIFF is a stack: every page (one size) is segmented and the "
    "answer has the same pages. The raw image bytes with `Content-Type: image/...` or "
    "`application/octet-stream` work too."
)


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
    output: Annotated[
        Output,
        Query(
            description="`mask`: PNG, 0/255 for one class, the class index for several. "
            "`probabilities`: float32 .npy, (H, W) for one class, (K, H, W) for several. "
            "`overlay`: RGB PNG of the mask tinted over the image. "
            "`instances`: cell labels (0 = background/membrane, 1..N = cells) from a seeded "
            "watershed of the probabilities, as a 16-bit PNG (a 32-bit TIFF beyond 65535 "
            "cells). For a stack of D pages: (D, H, W) TIFF volumes with ImageJ metadata "
            "(8-bit mask, RGB overlay (D, H, W, 3), 16-bit instances or 32-bit beyond 65535 "
            "cells, each page labelled on its own) and probabilities (D, H, W) or "
            "(D, K, H, W).",
        ),
    ] = "mask",
    colour: Annotated[
        Colour | None,
        Query(
            description="For `output=overlay`: tint each class, or each cell instance in a "
            "colour of its own."
        ),
    ] = None,
    tta: Annotated[
        int | None,
        Query(
            description="Test-time augmentation: 8 averages the probabilities of the image's "
            "8 rotations and mirrorings (8 times the computation), 1 is off; default: the "
            "server's UNET_TTA.",
            json_schema_extra={"enum": [1, 8]},
        ),
    ] = None,
    model: ModelName = None,
) -> Response:
    service = get_service(request)
    ask = segment_request((output,), colour, service.settings.tta if tta is None else tta)

    async def read() -> tuple[SegmentRequest, list[np.ndarray]]:
        data = await read_image_upload(request, service.settings.max_upload_bytes)
        return ask, await service.decode(data)

    result = await segment_image(
        service,
        model,
        read,
        started=arrival(request),
        disconnected=lambda: wait_for_disconnect(request),
    )
    body, media, filename = await asyncio.to_thread(
        encode_output,
        output,
        result.images,
        result.pages,
        result.labels,
        result.out_channels,
    )
    headers = timing_headers(request, result, result.height, result.width, result.model)
    headers["X-Pages"] = str(len(result.pages))
    headers["Content-Disposition"] = f'inline; filename="{filename}"'
    headers["Content-Length"] = str(len(body))
    return StreamingResponse(slices(body), media_type=media, headers=headers)


# `?model=NAME`: which of the server's models (GET /v2/models lists them; default:
# UNET_DEFAULT_MODEL).
ModelName = Annotated[
    str | None,
    Query(
        description="The model to use, by name (POST /v2/repository/index lists them); "
        "default: the server's default model (UNET_DEFAULT_MODEL)."
    ),
]


def segment_request(outputs: tuple[str, ...], colour: str | None, tta: int) -> SegmentRequest:
    """The request the query parameters describe (422 when they do not go together)."""
    try:
        return SegmentRequest(outputs, colour, tta)  # type: ignore[arg-type]
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
