"""The Open Inference Protocol (KServe v2) REST endpoints: JSON tensors, and the binary
tensor data extension that Triton's clients use by default.

The single input is the image: UINT8, UINT16 or FP32 (taken as already in [0, 1]), shape
[H, W], [H, W, C] or [1, C, H, W], data row-major as a flat or nested list. Outputs: `mask`
(UINT8, [H, W]) and `probabilities` (FP32, [H, W] for one class, [K, H, W] for several).
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from app.auth import require_api_key
from app.errors import ApiError
from app.routes.common import arrival, get_service, timing_headers, wait_for_disconnect
from app.service import InferenceService, SegmentResult
from app.uploads import read_body
from app.v2_tensors import (
    DATATYPES,
    OUTPUTS,
    InferInput,
    InferRequest,
    RequestedOutput,
    encode_reply,
    json_reply_bytes,
    output_array,
    parse_request,
    tensor_to_image,
)

router = APIRouter(prefix="/v2", tags=["KServe v2"])

SERVER_NAME = "unet-service"
MODEL_VERSION = "1"
# The binary tensor data extension (Triton's, used by tritonclient by default).
HEADER_LENGTH = "Inference-Header-Content-Length"

try:
    SERVER_VERSION = version("unet-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0+unknown"


INFER_EXAMPLE = {
    "id": "42",
    "inputs": [
        {"name": "image", "shape": [2, 3], "datatype": "UINT8", "data": [0, 64, 128, 192, 255, 32]}
    ],
    "outputs": [{"name": "mask"}],
}


def _model(request: Request, name: str, model_version: str | None = None) -> InferenceService:
    service = get_service(request)
    if name != service.model_name or model_version not in (None, MODEL_VERSION):
        shown = name if model_version is None else f"{name}/versions/{model_version}"
        raise ApiError(
            404,
            f"model {shown!r} not found; this server serves {service.model_name!r} "
            f"version {MODEL_VERSION}",
        )
    return service


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


# HEAD too: some load balancers and probes check health with HEAD requests.
@router.get("/health/live", summary="Liveness: the process is up")
@router.head("/health/live", include_in_schema=False)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness: the model is loaded and warm and the server accepts work",
    responses={503: {"description": "Not ready (loading or shutting down)."}},
)
@router.head("/health/ready", include_in_schema=False)
async def ready(request: Request) -> JSONResponse:
    service = getattr(request.app.state, "service", None)
    is_ready = service is not None and service.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" is not a boolean
    ready: bool = False


@router.post(
    "/repository/index",
    summary="Models served (Triton's model-repository index)",
    dependencies=[Depends(require_api_key)],
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    """What `tritonclient`'s `get_model_repository_index()` asks: every model this server
    serves, with its version and state. The body is empty or `{"ready": true}` (list only
    models that are ready)."""
    body = await read_body(request, 64 * 1024)
    try:
        query = RepositoryIndexRequest.model_validate_json(body or b"{}")
    except ValidationError:
        raise ApiError(422, 'the body must be empty or {"ready": true|false}') from None
    service = get_service(request)
    if query.ready and not service.ready:
        return []
    entry = {"name": service.model_name, "version": MODEL_VERSION}
    if service.ready:
        return [{**entry, "state": "READY"}]
    return [{**entry, "state": "UNAVAILABLE", "reason": "loading or shutting down"}]


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{model_version}/ready", include_in_schema=False)
async def model_ready(
    request: Request, name: str, model_version: str | None = None
) -> JSONResponse:
    service = _model(request, name, model_version)
    return JSONResponse(
        {"name": name, "ready": service.ready}, status_code=200 if service.ready else 503
    )


@router.get("/models/{name}", summary="Model metadata", dependencies=[Depends(require_api_key)])
@router.get(
    "/models/{name}/versions/{model_version}",
    include_in_schema=False,
    dependencies=[Depends(require_api_key)],
)
async def model_metadata(
    request: Request, name: str, model_version: str | None = None
) -> dict[str, Any]:
    service = _model(request, name, model_version)
    info = service.info
    k = info.out_channels
    return {
        "name": service.model_name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [-1, -1, -1],
                "parameters": {
                    "datatypes": list(DATATYPES),
                    "layouts": ["[H, W]", "[H, W, C]", "[1, C, H, W]"],
                    "channels": info.in_channels,
                },
            }
        ],
        "outputs": [
            {"name": "mask", "datatype": "UINT8", "shape": [-1, -1]},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [-1, -1] if k == 1 else [k, -1, -1],
            },
        ],
        "parameters": {
            "description": info.description,
            "class_names": info.class_names,
            "threshold": info.threshold,
            # Validation metrics of the card (pixel error, Dice, IoU, Rand error), if any.
            "metrics": info.metrics,
            "depth": info.depth,
            "tile_sizes": list(info.tile_sizes),
        },
    }


@router.post(
    "/models/{name}/infer",
    summary="Inference (JSON tensors)",
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
    service = _model(request, name, model_version)
    service.check_available()
    with service.arriving():
        payload, as_binary, image = await _parse_request(request, service)
        job = await service.submit(image, probabilities="probabilities" in as_binary)
    result = await service.result(
        job, started=arrival(request), disconnected=lambda: wait_for_disconnect(request)
    )
    height, width = image.shape[:2]
    pieces, length, header_length = await asyncio.to_thread(
        _reply, service, payload, as_binary, result
    )
    headers = timing_headers(request, result, height, width, service.model_name)
    if length is not None:
        headers["Content-Length"] = str(length)
    if header_length is None:
        return StreamingResponse(pieces, media_type="application/json", headers=headers)
    # Binary tensor extension: the JSON header, then the raw outputs in order.
    headers[HEADER_LENGTH] = str(header_length)
    return StreamingResponse(pieces, media_type="application/octet-stream", headers=headers)


async def _parse_request(
    request: Request, service: InferenceService
) -> tuple[InferRequest, dict[str, bool], np.ndarray]:
    """Body -> (the request, which outputs go back as binary, the image); ApiError if bad.
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
    requested = payload.outputs or [RequestedOutput(name=n) for n in OUTPUTS]
    unknown = sorted({o.name for o in requested} - set(OUTPUTS))
    if unknown:
        raise ApiError(422, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    binary_default = _flag(payload.parameters, "binary_data_output", False)
    as_binary = {o.name: _flag(o.parameters, "binary_data", binary_default) for o in requested}
    image = await asyncio.to_thread(tensor_to_image, tensor, settings.max_pixels, raw)
    tensor.data = None  # the parsed list can be far bigger than the image
    _check_json_reply(service, image, as_binary)
    return payload, as_binary, image


def _json_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the JSON body is larger than the limit of {limit / 2**20:g} MiB (UNET_MAX_JSON_MB): "
        "send large tensors with the binary tensor data extension "
        f"({HEADER_LENGTH} header; tritonclient's default), which needs no parsing",
    )


def _check_json_reply(
    service: InferenceService, image: np.ndarray, as_binary: dict[str, bool]
) -> None:
    """Refuse before computing a reply whose JSON could pass UNET_MAX_JSON_REPLY_MB."""
    pixels = image.shape[0] * image.shape[1]
    channels = service.info.out_channels
    values = {
        name: pixels * (1 if name == "mask" else channels)
        for name, binary in as_binary.items()
        if not binary
    }
    size = json_reply_bytes(values)
    limit = service.settings.max_json_reply_bytes
    if size > limit:
        raise ApiError(
            413,
            f"the JSON reply for {', '.join(values)} of a {image.shape[1]}x{image.shape[0]} "
            f"image could reach {size / 2**20:.0f} MiB, over the limit of {limit / 2**20:g} "
            "MiB (UNET_MAX_JSON_REPLY_MB): ask for binary outputs (parameter "
            '"binary_data_output": true, or "binary_data": true per output)',
        )


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
):
    """Runs in a worker thread: (body pieces, length or None, binary header length)."""
    outputs = []
    for name, binary in as_binary.items():
        array = output_array(name, result.mask, result.probabilities)
        datatype = "UINT8" if name == "mask" else "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        outputs.append((entry, array, binary))
    content: dict[str, Any] = {"model_name": service.model_name, "model_version": MODEL_VERSION}
    if payload.id is not None:
        content["id"] = payload.id
    content["parameters"] = {"tile_size": result.tile_size, "tiles": result.tiles}
    return encode_reply(content, outputs)
