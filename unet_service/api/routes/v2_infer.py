"""KServe v2 inference: `POST /v2/models/{name}/infer` with JSON tensors or Triton's binary
tensor data extension (see `api.v2_tensors` for the tensors themselves)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from unet_service.api.auth import require_api_key
from unet_service.api.errors import ApiError
from unet_service.api.routes.common import arrival, timing_headers, wait_for_disconnect
from unet_service.api.routes.v2 import MODEL_VERSION, find_model
from unet_service.api.uploads import read_body
from unet_service.api.v2_tensors import (
    DEFAULT_OUTPUTS,
    LAYOUTS,
    OUTPUT_DATATYPES,
    OUTPUTS,
    STACK_LAYOUTS,
    InferInput,
    InferRequest,
    RequestedOutput,
    encode_reply,
    json_reply_bytes,
    output_array,
    parse_request,
    tensor_to_pages,
)
from unet_service.pipeline.outputs import TTA_VIEWS as VARIANTS
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.serving.segment import SegmentResult, segment
from unet_service.serving.service import InferenceService

router = APIRouter(prefix="/v2", tags=["KServe v2"])

# The binary tensor data extension (Triton's, used by tritonclient by default).
HEADER_LENGTH = "Inference-Header-Content-Length"

INFER_EXAMPLE = {
    "id": "42",
    "inputs": [
        {"name": "image", "shape": [2, 3], "datatype": "UINT8", "data": [0, 64, 128, 192, 255, 32]}
    ],
    "outputs": [{"name": "mask"}],
}


@router.post(
    "/models/{name}/infer",
    summary="Inference (JSON tensors)",
    description="One input tensor, the image: [H, W], [H, W, C] or [1, C, H, W]. A stack of "
    'pages is [D, H, W] or [D, H, W, C] with the request parameter "layout": "DHW" or "DHWC" '
    "(without it a 3-D tensor is [H, W, C]); its outputs then have a leading D axis. The "
    "binary tensor data extension (Inference-Header-Content-Length) works too.",
    dependencies=[Depends(require_api_key)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": InferRequest.model_json_schema(),
                    "example": INFER_EXAMPLE,
                }
            },
        }
    },
    responses={
        404: {"description": "Unknown model."},
        413: {"description": "Body or image too large."},
        422: {"description": "Bad tensor shape, datatype or data."},
        503: {"description": "Queue full or not ready."},
        504: {"description": "Deadline exceeded."},
    },
)
@router.post(
    "/models/{name}/versions/{model_version}/infer",
    include_in_schema=False,
    dependencies=[Depends(require_api_key)],
)
async def infer(request: Request, name: str, model_version: str | None = None) -> Response:
    service = find_model(request, name, model_version)
    parsed: dict[str, Any] = {}

    async def read() -> tuple[SegmentRequest, list[np.ndarray]]:
        payload, as_binary, pages = await _parse_request(request, service, name)
        parsed.update(payload=payload, as_binary=as_binary)
        tta = _tta(payload.parameters)
        outputs = tuple(as_binary)
        # Each output is one of the model's (checked by _parse_request).
        ask = SegmentRequest(outputs, None, service.settings.tta if tta is None else tta)  # type: ignore[arg-type]
        return ask, pages

    result = await segment(
        service,
        name,
        read,
        started=arrival(request),
        disconnected=lambda: wait_for_disconnect(request),
    )
    payload, as_binary = parsed["payload"], parsed["as_binary"]
    stack = _layout(payload.parameters) in STACK_LAYOUTS
    pieces, length, header_length = await asyncio.to_thread(
        _reply, service, payload, as_binary, result, stack
    )
    headers = timing_headers(request, result, result.height, result.width, result.model)
    headers["X-Pages"] = str(len(result.pages))
    if length is not None:
        headers["Content-Length"] = str(length)
    if header_length is None:
        return StreamingResponse(pieces, media_type="application/json", headers=headers)
    # Binary tensor extension: the JSON header, then the raw outputs in order.
    headers[HEADER_LENGTH] = str(header_length)
    return StreamingResponse(pieces, media_type="application/octet-stream", headers=headers)


async def _parse_request(
    request: Request, service: InferenceService, name: str
) -> tuple[InferRequest, dict[str, bool], list[np.ndarray]]:
    """Body -> (the request, which outputs go back as binary, the image's pages: one but
    for a stack); ApiError if bad.
    JSON is parsed and converted in a worker thread, in pieces short enough that the
    event loop keeps answering (health probes above all) meanwhile."""
    settings = service.settings
    binary_extension = HEADER_LENGTH.lower() in request.headers
    if binary_extension:
        body = await read_body(request, settings.max_upload_bytes)
    else:
        body = await read_body(request, settings.max_json_bytes, too_large=_json_too_large)
    header, binary = _split_binary(request, body, settings.max_json_bytes)
    payload = await asyncio.to_thread(parse_request, header)
    del header
    if len(payload.inputs) != 1:
        raise ApiError(
            422, f"expected exactly one input tensor (the image), got {len(payload.inputs)}"
        )
    tensor = payload.inputs[0]
    raw = _binary_input(tensor, binary)
    requested = payload.outputs or [RequestedOutput(name=n) for n in DEFAULT_OUTPUTS]
    info = service.models.info(name)
    offered = [n for n in OUTPUTS if n != "instances" or info.out_channels == 1]
    unknown = sorted({o.name for o in requested} - set(offered))
    if unknown:
        raise ApiError(422, f"unknown output(s) {unknown}; this model has {offered}")
    binary_default = _flag(payload.parameters, "binary_data_output", False)
    as_binary = {o.name: _flag(o.parameters, "binary_data", binary_default) for o in requested}
    layout = _layout(payload.parameters)
    _check_channels(tensor.shape, layout, info.in_channels)
    pages = await asyncio.to_thread(
        tensor_to_pages, tensor, settings.max_pixels, raw, layout, settings.max_pages
    )
    tensor.data = None  # the parsed list can be far bigger than the image
    _check_json_reply(service, info.out_channels, pages, as_binary)
    return payload, as_binary, pages


def _layout(parameters: dict[str, Any] | None) -> str | None:
    """The request parameter "layout" (see api.v2_tensors.LAYOUTS); absent: by rank."""
    value = (parameters or {}).get("layout")
    if value is not None and value not in LAYOUTS:
        raise ApiError(422, f"parameter 'layout' must be one of {list(LAYOUTS)}, got {value!r}")
    return value


def _check_channels(shape: list[int], layout: str | None, in_channels: int) -> None:
    """A 3-D tensor without a layout is [H, W, C], as it always was; when its last axis
    cannot be channels, the client most likely meant a stack: say how to send one."""
    if layout is None and len(shape) == 3 and shape[2] not in (1, 3, in_channels):
        raise ApiError(
            422,
            f"shape {shape} is read as [H, W, C] with {shape[2]} channels, the model takes "
            f"{in_channels}; for a stack of {shape[0]} pages send the request parameter "
            '"layout": "DHW"',
        )


def _json_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the JSON body is larger than the limit of {limit / 2**20:g} MiB (UNET_MAX_JSON_MB): "
        "send large tensors with the binary tensor data extension "
        f"({HEADER_LENGTH} header; tritonclient's default), which needs no parsing",
    )


def _check_json_reply(
    service: InferenceService, channels: int, pages: list[np.ndarray], as_binary: dict[str, bool]
) -> None:
    """Refuse before computing a reply whose JSON could pass UNET_MAX_JSON_REPLY_MB (all
    pages of a stack count)."""
    image = pages[0]
    pixels = image.shape[0] * image.shape[1] * len(pages)
    values = {
        name: pixels * (channels if name == "probabilities" else 1)
        for name, binary in as_binary.items()
        if not binary
    }
    size = json_reply_bytes(values)
    limit = service.settings.max_json_reply_bytes
    if size > limit:
        what = f"{image.shape[1]}x{image.shape[0]} image"
        what = f"a {what}" if len(pages) == 1 else f"a stack of {len(pages)} pages of {what}s"
        raise ApiError(
            413,
            f"the JSON reply for {', '.join(values)} of {what} could reach "
            f"{size / 2**20:.0f} MiB, over the limit of {limit / 2**20:g} "
            "MiB (UNET_MAX_JSON_REPLY_MB): ask for binary outputs (parameter "
            '"binary_data_output": true, or "binary_data": true per output)',
        )


def _tta(parameters: dict[str, Any] | None) -> int | None:
    """The request parameter "tta": 1 or 8 views averaged; absent: the server's default."""
    value = (parameters or {}).get("tta")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value not in VARIANTS:
        raise ApiError(422, f"parameter 'tta' must be 1 or 8, got {value!r}")
    return int(value)


def _flag(parameters: dict[str, Any] | None, name: str, default: bool) -> bool:
    """A boolean request parameter; the string "false" must not count as true."""
    value = (parameters or {}).get(name, default)
    if not isinstance(value, bool):
        raise ApiError(422, f"parameter {name!r} must be true or false, got {value!r}")
    return value


def _split_binary(
    request: Request, body: bytes, max_header: int
) -> tuple[memoryview, memoryview | None]:
    """(JSON header, binary part), as views of the body (no copies): with the binary tensor
    extension the JSON is the first Inference-Header-Content-Length bytes of the body."""
    view = memoryview(body)
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return view, None
    try:
        length = int(declared)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise ApiError(422, f"invalid {HEADER_LENGTH} header: {declared!r}")
    if length > max_header:
        raise _json_too_large(max_header)
    return view[:length], view[length:]


def _binary_input(tensor: InferInput, binary: memoryview | None) -> memoryview | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise ApiError(422, f"input {tensor.name!r} has neither data nor binary_data_size")
        return None
    if binary is None or not isinstance(size, int) or size != len(binary):
        have = "no binary part" if binary is None else f"{len(binary)} bytes of binary data"
        raise ApiError(
            422, f"input {tensor.name!r}: binary_data_size is {size!r}, the request has {have}"
        )
    return binary


def _reply(
    service: InferenceService,
    payload: InferRequest,
    as_binary: dict[str, bool],
    result: SegmentResult,
    stack: bool,
):
    """Runs in a worker thread: (body pieces, length or None, binary header length). A
    stack's outputs have a leading page axis."""
    outputs = []
    for name, binary in as_binary.items():
        arrays = [
            output_array(name, page.mask, page.probabilities, labels)
            for page, labels in zip(
                result.pages, result.labels or [None] * len(result.pages), strict=True
            )
        ]
        array = np.stack(arrays) if stack else arrays[0]
        datatype = OUTPUT_DATATYPES[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        outputs.append((entry, array, binary))
    content: dict[str, Any] = {"model_name": result.model, "model_version": MODEL_VERSION}
    if payload.id is not None:
        content["id"] = payload.id
    content["parameters"] = {"tile_size": result.tile_size, "tiles": result.tiles}
    if stack:
        content["parameters"]["pages"] = len(result.pages)
    return encode_reply(content, outputs)
