"""The Open Inference Protocol (KServe v2): server and model metadata, health, and Triton's
model-repository index. Inference itself is in `api.routes.v2_infer`.

The single input is the image: UINT8, UINT16 or FP32 (taken as already in [0, 1]), shape
[H, W], [H, W, C] or [1, C, H, W], data row-major as a flat or nested list. Outputs: `mask`
(UINT8, [H, W]) and `probabilities` (FP32, [H, W] for one class, [K, H, W] for several).
A stack of D pages is [D, H, W] or [D, H, W, C] with the request parameter "layout": "DHW"
or "DHWC" (a 3-D tensor without it stays [H, W, C]); its outputs get a leading D axis.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from unet_service.api.auth import require_api_key
from unet_service.api.errors import ApiError
from unet_service.api.routes.common import get_service
from unet_service.api.uploads import read_body
from unet_service.api.v2_tensors import DATATYPES, LAYOUTS
from unet_service.errors import NotFoundError
from unet_service.serving.service import InferenceService

router = APIRouter(prefix="/v2", tags=["KServe v2"])

SERVER_NAME = "unet-service"
MODEL_VERSION = "1"

try:
    SERVER_VERSION = version("unet-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "0+unknown"


def find_model(request: Request, name: str, model_version: str | None = None) -> InferenceService:
    """The service, once `name` (and the version, if given) is one of its models."""
    service = get_service(request)
    service.models.entry(name)  # NotFoundError naming the models
    if model_version not in (None, MODEL_VERSION):
        raise NotFoundError(
            f"model '{name}/versions/{model_version}' not found; {name!r} has version "
            f"{MODEL_VERSION}"
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
    rows = get_service(request).model_index()
    return [row for row in rows if row["state"] == "READY"] if query.ready else rows


@router.post(
    "/repository/models/{name}/load",
    summary="Load a model (Triton's repository extension)",
    dependencies=[Depends(require_api_key)],
)
async def load_model(request: Request, name: str) -> dict[str, Any]:
    """Load model `name` onto the device now (the least recently used idle model is
    unloaded first when UNET_MAX_LOADED_MODELS are loaded)."""
    await get_service(request).models.load(name)
    return {}


@router.post(
    "/repository/models/{name}/unload",
    summary="Unload a model (Triton's repository extension)",
    dependencies=[Depends(require_api_key)],
)
async def unload_model(request: Request, name: str) -> dict[str, Any]:
    """Unload model `name` from the device (not while a request or job holds it; never the
    default model). A request naming it later loads it again."""
    await get_service(request).models.unload(name)
    return {}


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{model_version}/ready", include_in_schema=False)
async def model_ready(
    request: Request, name: str, model_version: str | None = None
) -> JSONResponse:
    service = find_model(request, name, model_version)
    ready = service.ready and service.models.entry(name).state == "READY"
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{name}", summary="Model metadata", dependencies=[Depends(require_api_key)])
@router.get(
    "/models/{name}/versions/{model_version}",
    include_in_schema=False,
    dependencies=[Depends(require_api_key)],
)
async def model_metadata(
    request: Request, name: str, model_version: str | None = None
) -> dict[str, Any]:
    service = find_model(request, name, model_version)
    info = service.models.info(name)
    k = info.out_channels
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": info.platform,
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [-1, -1, -1],
                "parameters": {
                    "datatypes": list(DATATYPES),
                    "layouts": ["[H, W]", "[H, W, C]", "[1, C, H, W]"],
                    # A stack of pages: request parameter "layout": "DHW" or "DHWC"; each
                    # output then has a leading page axis D (mask [D, H, W], ...).
                    "layout_parameter": list(LAYOUTS),
                    "stack_layouts": ["[D, H, W]", "[D, H, W, C]"],
                    "max_pages": service.settings.max_pages,
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
            # Cell labels from a seeded watershed of the probabilities (one-class models).
            *([{"name": "instances", "datatype": "UINT32", "shape": [-1, -1]}] if k == 1 else []),
        ],
        "parameters": {
            "description": info.description,
            "class_names": info.class_names,
            "threshold": info.threshold,
            # The card's validation figures: the challenge's pixel error, the instances'
            # Rand error and the mismatch, each with its definition and slices (if any).
            "metrics": info.metrics,
            "depth": info.depth,
            "tile_sizes": list(info.tile_sizes),
        },
    }
