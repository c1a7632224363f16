"""`POST /v1/preview`: an upload as the web page shows it, a PNG of one page, computed on the
CPU beside the tile queue (it never waits behind inference). The image is decoded as for
`/v1/segment` and stretched as the overlay stretches it; a mask or instances answer of this
service, sent back, is rendered in the overlay's colours."""

from __future__ import annotations

import asyncio
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request, Response
from PIL import Image

from unet_service.api.auth import require_api_key
from unet_service.api.errors import ERROR_RESPONSE, ApiError
from unet_service.api.routes.common import get_service
from unet_service.api.routes.segment import ModelName
from unet_service.api.uploads import image_upload_body, read_image_upload
from unet_service.imaging.display import cell_ids, cells_view, classes_view, image_view
from unet_service.imaging.encode import png_bytes

router = APIRouter(tags=["segmentation"])

DEFAULT_MAX_SIDE = 2048
MIN_MAX_SIDE = 16
MAX_MAX_SIDE = 8192

_HEADERS = {
    "X-Image-Width": "Width of the upload, pixels (before any scaling down).",
    "X-Image-Height": "Height of the upload, pixels (before any scaling down).",
    "X-Pages": "Pages of the upload (a multi-page TIFF's count; 1 for any other image).",
    "X-Page": "The page shown (1-based).",
}
RESPONSES = {
    200: {
        "description": "The page as a PNG: 8-bit grey or RGB for an image, RGBA for `colour`.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
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
        "description": "Empty, truncated or unusable image; missing `file` field; `page` "
        "beyond the upload's pages; `max_side` out of range; `colour` with an upload that "
        "holds no labels.",
        **ERROR_RESPONSE,
    },
    503: {"description": "Server not ready or shutting down (see Retry-After).", **ERROR_RESPONSE},
}
REQUEST_BODY = image_upload_body(
    "The image as multipart field `file`, in any format `/v1/segment` reads "
    "(a multi-page TIFF's pages are chosen with `page`), or a mask or instances answer of "
    "`/v1/segment` with `colour`. The raw bytes with `Content-Type: image/...` or "
    "`application/octet-stream` work too."
)


@router.post(
    "/v1/preview",
    summary="Render an image for display",
    description="Upload an image; get one page of it as a PNG for display, as the web page "
    "shows it: decoded as `/v1/segment` decodes it (the same formats, limits and errors), "
    "8-bit shown as is, 16-bit and float stretched from their minimum to their maximum (as "
    "the overlay shows them), grey or RGB, scaled down (never up) so that its longer side "
    "is at most `max_side`, each pixel the average of those it covers. With `colour`, the "
    "upload is a mask or instances answer of `/v1/segment` (a stack's TIFF too), rendered "
    "as RGBA in the overlay's colours: each class above 0, or each cell, opaque in its "
    "colour, the rest transparent, and scaled down by taking the pixel under each one's "
    "centre (labels are never averaged). Computed on the CPU, beside the tile queue: it "
    "does not wait for inference.",
    dependencies=[Depends(require_api_key)],
    responses=RESPONSES,
    openapi_extra={"requestBody": REQUEST_BODY},
    response_class=Response,
)
async def preview(
    request: Request,
    page: int = Query(1, ge=1, description="The page to show (1-based), for a stack."),
    max_side: int = Query(
        DEFAULT_MAX_SIDE,
        ge=MIN_MAX_SIDE,
        le=MAX_MAX_SIDE,
        description="Longest side of the PNG, pixels; a larger page is scaled down.",
    ),
    colour: Literal["classes", "instances"] | None = Query(
        None,
        description="`classes`: the upload is a mask answer (0/255 for one class, the class "
        "index for several), each class above 0 in its overlay colour. `instances`: the "
        "upload is cell instances, each cell in the colour of the instance overlay "
        "(`output=overlay&colour=instances`). Without it: the image itself.",
    ),
    model: ModelName = None,
) -> Response:
    service = get_service(request)
    service.check_available()
    out_channels = service.models.info(service.models.entry(model).name).out_channels
    data = await read_image_upload(request, service.settings.max_upload_bytes)
    pages = await service.decode(data)
    # Only a 32-bit instances TIFF is read again (display.cell_ids); else the bytes can go.
    labels_file = data if colour == "instances" else b""
    del data
    if page > len(pages):
        count = f"{len(pages)} page{'s' if len(pages) > 1 else ''}"
        raise ApiError(422, f"page {page} asked for, but the upload has {count}")
    shown = pages[page - 1]
    height, width = shown.shape[:2]

    def render() -> bytes:
        if colour == "classes":
            pixels = classes_view(shown, out_channels, max_side)
        elif colour == "instances":
            pixels = cells_view(cell_ids(labels_file, shown, page - 1), max_side)
        else:
            pixels = image_view(shown, max_side)
        return png_bytes(Image.fromarray(np.ascontiguousarray(pixels)))

    body = await asyncio.to_thread(render)
    headers = {
        "X-Image-Width": str(width),
        "X-Image-Height": str(height),
        "X-Pages": str(len(pages)),
        "X-Page": str(page),
        "Content-Disposition": 'inline; filename="preview.png"',
    }
    return Response(body, media_type="image/png", headers=headers)
