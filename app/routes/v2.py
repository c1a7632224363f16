"""The Open Inference Protocol (KServe v2) REST endpoints, JSON tensors.

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


def tensor_to_image(tensor: InferInput, max_pixels: int) -> np.ndarray:
    """A v2 input tensor -> (H, W, C) image in the tensor's dtype. Raises ApiError (422 for
    bad shape, datatype or data; 413 for too many pixels)."""
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
    if not isinstance(tensor.data, list):
        raise ApiError(422, f"input {tensor.name!r}: data must be a (flat or nested) list")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):
        raise ApiError(422, f"input {tensor.name!r}: data is ragged or not numeric") from None
    if values.size != math.prod(shape):
        raise ApiError(
            422,
            f"input {tensor.name!r}: data has {values.size} values, shape {shape} needs "
            f"{math.prod(shape)}",
        )
    if values.dtype.kind not in "iuf" or (dtype is not np.float32 and values.dtype.kind == "f"):
        kind = "numbers" if dtype is np.float32 else "integers"
        raise ApiError(422, f"input {tensor.name!r}: {tensor.datatype} data must be {kind}")
    if dtype is np.float32:
        if not np.isfinite(values).all():
            raise ApiError(422, f"input {tensor.name!r}: FP32 data must be finite")
    else:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ApiError(
                422,
                f"input {tensor.name!r}: values outside the {tensor.datatype} range "
                f"{info.min}..{info.max}",
            )
    image = values.astype(dtype).reshape(shape)
    if len(shape) == 2:
        return image[:, :, None]
    if len(shape) == 4:
        return np.ascontiguousarray(image[0].transpose(1, 2, 0))
    return image


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
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}


@router.get("/health/live", summary="Liveness: the process is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness: the model is loaded and warm and the server accepts work",
    responses={503: {"description": "Not ready (loading or shutting down)."}},
)
async def ready(request: Request) -> JSONResponse:
    service = getattr(request.app.state, "service", None)
    is_ready = service is not None and service.ready
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


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
    body = await read_body(request, service.settings.max_upload_bytes)
    try:
        payload = InferRequest.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(422, f"invalid inference request: {loc}: {first.get('msg')}") from None
    del body
    if len(payload.inputs) != 1:
        raise ApiError(
            422, f"expected exactly one input tensor (the image), got {len(payload.inputs)}"
        )
    wanted = [o.name for o in payload.outputs] if payload.outputs else list(OUTPUTS)
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise ApiError(422, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    image = await asyncio.to_thread(tensor_to_image, payload.inputs[0], service.settings.max_pixels)
    payload.inputs[0].data = None  # the parsed list can be far bigger than the image
    result = await service.segment(
        image,
        probabilities="probabilities" in wanted,
        started=arrival(request),
        disconnected=lambda: wait_for_disconnect(request),
    )
    height, width = image.shape[:2]
    content = await asyncio.to_thread(_response, service, payload, wanted, result)
    return _json(
        content, headers=timing_headers(request, result, height, width, service.model_name)
    )


def _response(
    service: InferenceService, payload: InferRequest, wanted: list[str], result: SegmentResult
) -> dict[str, Any]:
    outputs = []
    for out in wanted:
        if out == "mask":
            outputs.append(
                {
                    "name": "mask",
                    "datatype": "UINT8",
                    "shape": list(result.mask.shape),
                    "data": result.mask.ravel().tolist(),
                }
            )
        else:
            probs = result.probabilities
            if probs.shape[0] == 1:
                probs = probs[0]
            outputs.append(
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": probs.ravel().tolist(),
                }
            )
    content: dict[str, Any] = {
        "model_name": service.model_name,
        "model_version": MODEL_VERSION,
        "outputs": outputs,
        "parameters": {"tile_size": result.tile_size, "tiles": result.tiles},
    }
    if payload.id is not None:
        content["id"] = payload.id
    return content
