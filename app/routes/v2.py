"""The Open Inference Protocol (KServe v2) REST endpoints: JSON tensors, and the binary
tensor data extension that Triton's clients use by default.

The single input is the image: UINT8, UINT16 or FP32 (taken as already in [0, 1]), shape
[H, W], [H, W, C] or [1, C, H, W], data row-major as a flat or nested list. Outputs: `mask`
(UINT8, [H, W]) and `probabilities` (FP32, [H, W] for one class, [K, H, W] for several).
"""

from __future__ import annotations

import asyncio
import json
import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import require_api_key
from app.batching import SegmentResult
from app.errors import ApiError
from app.routes.common import arrival, get_service, timing_headers, wait_for_disconnect
from app.service import InferenceService
from app.uploads import read_body

router = APIRouter(prefix="/v2", tags=["KServe v2"])

SERVER_NAME = "unet-service"
MODEL_VERSION = "1"
DATATYPES: dict[str, type[np.generic]] = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "FP32": np.float32,
}
OUTPUTS = ("mask", "probabilities")
# The binary tensor data extension (Triton's, used by tritonclient by default).
HEADER_LENGTH = "Inference-Header-Content-Length"

try:
    SERVER_VERSION = version("unet-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0+unknown"


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


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


def tensor_to_image(tensor: InferInput, max_pixels: int, raw: bytes | None = None) -> np.ndarray:
    """A v2 input tensor -> (H, W, C) image in the tensor's dtype, from its JSON `data` or,
    with the binary tensor extension, from `raw` little-endian bytes. Raises ApiError (422
    for bad shape, datatype or data; 413 for too many pixels)."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ApiError(
            422,
            f"input {tensor.name!r}: datatype {tensor.datatype!r} is not supported; use "
            f"{', '.join(DATATYPES)}",
        )
    shape = tensor.shape
    if any(s < 0 for s in shape) or len(shape) not in (2, 3, 4):
        raise ApiError(
            422,
            f"input {tensor.name!r}: shape {shape} is not an image; use [H, W], [H, W, C] or "
            "[1, C, H, W]",
        )
    if len(shape) == 4 and shape[0] != 1:
        raise ApiError(
            422,
            f"input {tensor.name!r}: shape {shape} holds {shape[0]} images; send one image "
            "per request (the server batches tiles across requests itself)",
        )
    height, width = (shape[2], shape[3]) if len(shape) == 4 else (shape[0], shape[1])
    if height * width == 0 or math.prod(shape) == 0:
        raise ApiError(422, f"input {tensor.name!r}: shape {shape} is empty")
    if height * width > max_pixels:
        raise ApiError(
            413,
            f"image is {width}x{height} = {height * width} pixels, more than the limit of "
            f"{max_pixels}",
        )
    values = _from_json(tensor, dtype) if raw is None else _from_binary(tensor, raw, dtype)
    image = values.astype(dtype, copy=False).reshape(shape)
    if len(shape) == 2:
        return image[:, :, None]
    if len(shape) == 4:
        return np.ascontiguousarray(image[0].transpose(1, 2, 0))
    return image


def _from_binary(tensor: InferInput, raw: bytes, dtype: type[np.generic]) -> np.ndarray:
    item = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(tensor.shape) * item.itemsize
    if len(raw) != expected:
        raise ApiError(
            422,
            f"input {tensor.name!r}: {len(raw)} bytes of binary data, shape {tensor.shape} of "
            f"{tensor.datatype} needs {expected}",
        )
    values = np.frombuffer(raw, dtype=item)
    if dtype is np.float32 and not np.isfinite(values).all():
        raise ApiError(422, f"input {tensor.name!r}: FP32 data must be finite")
    return values


def _from_json(tensor: InferInput, dtype: type[np.generic]) -> np.ndarray:
    if not isinstance(tensor.data, list):
        raise ApiError(422, f"input {tensor.name!r}: data must be a (flat or nested) list")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):
        raise ApiError(422, f"input {tensor.name!r}: data is ragged or not numeric") from None
    shape = tensor.shape
    if values.size != math.prod(shape):
        raise ApiError(
            422,
            f"input {tensor.name!r}: data has {values.size} values, shape {shape} needs "
            f"{math.prod(shape)}",
        )
    if values.dtype.kind not in "iuf" or (dtype is not np.float32 and values.dtype.kind == "f"):
        if dtype is np.float32:
            kind = "numbers"
        else:
            info = np.iinfo(dtype)
            kind = f"integers in {info.min}..{info.max}"
        raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} data must be {kind}")
    if dtype is np.float32:
        # Checked as float32: a finite JSON number beyond its range (1e300) becomes inf.
        with np.errstate(over="ignore"):
            values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise ApiError(
                422, f"input {tensor.name!r}: FP32 data must be finite and within FP32 range"
            )
    else:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ApiError(
                422,
                f"input {tensor.name!r}: values outside the {tensor.datatype} range "
                f"{info.min}..{info.max}",
            )
    return values


def _json(
    content: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    # json.dumps directly: FastAPI's encoder walks every element of multi-megapixel lists.
    return Response(
        json.dumps(content, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


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
    card = service.segmenter.card
    k = card.out_channels
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
                    "channels": card.in_channels,
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
            "description": card.description,
            "class_names": card.class_names,
            "threshold": card.threshold,
            # Validation metrics of the card (pixel error, Dice, IoU, Rand error), if any.
            "metrics": card.metrics.get("overall", {}),
            "depth": card.depth,
            "tile_sizes": list(service.buckets),
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
    result = await service.segment(
        image,
        probabilities="probabilities" in as_binary,
        started=arrival(request),
        disconnected=lambda: wait_for_disconnect(request),
    )
    height, width = image.shape[:2]
    content, blobs = await asyncio.to_thread(_response, service, payload, as_binary, result)
    headers = timing_headers(request, result, height, width, service.model_name)
    if not blobs:
        return _json(content, headers=headers)
    # Binary tensor extension: the JSON header, then the raw outputs in order.
    head = json.dumps(content, separators=(",", ":")).encode()
    headers[HEADER_LENGTH] = str(len(head))
    return Response(
        b"".join([head, *blobs]), media_type="application/octet-stream", headers=headers
    )


async def _parse_request(
    request: Request, service: InferenceService
) -> tuple[InferRequest, dict[str, bool], np.ndarray]:
    """Body -> (the request, which outputs go back as binary, the image); ApiError if bad."""
    body = await read_body(request, service.settings.max_upload_bytes)
    header, binary = _split_binary(request, body)
    try:
        payload = InferRequest.model_validate_json(header)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, f"invalid inference request: {loc}: {first.get('msg')}") from None
    del body, header
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
    image = await asyncio.to_thread(tensor_to_image, tensor, service.settings.max_pixels, raw)
    tensor.data = None  # the parsed list can be far bigger than the image
    return payload, as_binary, image


def _flag(parameters: dict[str, Any] | None, name: str, default: bool) -> bool:
    """A boolean request parameter; the string "false" must not count as true."""
    value = (parameters or {}).get(name, default)
    if not isinstance(value, bool):
        raise ApiError(422, f"parameter {name!r} must be true or false, got {value!r}")
    return value


def _split_binary(request: Request, body: bytes) -> tuple[bytes, bytes | None]:
    """(JSON header, binary part): with the binary tensor extension the JSON is the first
    Inference-Header-Content-Length bytes of the body."""
    declared = request.headers.get(HEADER_LENGTH)
    if declared is None:
        return body, None
    try:
        length = int(declared)
    except ValueError:
        length = -1
    if not 0 < length <= len(body):
        raise ApiError(422, f"invalid {HEADER_LENGTH} header: {declared!r}")
    return body[:length], body[length:]


def _binary_input(tensor: InferInput, binary: bytes | None) -> bytes | None:
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


def _response(
    service: InferenceService,
    payload: InferRequest,
    as_binary: dict[str, bool],
    result: SegmentResult,
) -> tuple[dict[str, Any], list[bytes]]:
    outputs, blobs = [], []
    for name, binary in as_binary.items():
        if name == "mask":
            array, datatype = result.mask, "UINT8"
        else:
            assert result.probabilities is not None
            probs = result.probabilities
            array, datatype = (probs[0] if probs.shape[0] == 1 else probs), "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    content: dict[str, Any] = {
        "model_name": service.model_name,
        "model_version": MODEL_VERSION,
        "outputs": outputs,
        "parameters": {"tile_size": result.tile_size, "tiles": result.tiles},
    }
    if payload.id is not None:
        content["id"] = payload.id
    return content, blobs
