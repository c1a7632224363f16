"""`GET /v1/models`: the models this server serves, their states and which one a request
without `?model=` gets (the web page's model picker reads it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from unet_service.api.auth import require_api_key
from unet_service.api.routes.common import get_service

router = APIRouter(tags=["segmentation"])


@router.get(
    "/v1/models",
    summary="Models served, and the default one",
    dependencies=[Depends(require_api_key)],
)
async def models(request: Request) -> dict[str, Any]:
    """`default`: the model used when a request names none (UNET_DEFAULT_MODEL); `models`:
    every model of the repository, as `POST /v2/repository/index` lists them (`name`,
    `version`, `state`: READY, LOADING, UNAVAILABLE (loaded on first use) or FAILED, with
    the `reason` when there is one). Each one's card: `GET /v2/models/NAME`."""
    service = get_service(request)
    return {"default": service.models.default, "models": service.model_index()}
