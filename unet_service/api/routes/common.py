"""Helpers shared by the inference routes."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from unet_service.api.errors import ApiError
from unet_service.api.uploads import arrival
from unet_service.serving.segment import SegmentResult
from unet_service.serving.service import InferenceService

__all__ = ["arrival", "get_service", "timing_headers", "wait_for_disconnect"]


def get_service(request: Request) -> InferenceService:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
    return service


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. Only call once the body has been read: from then
    on the server's next message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0)


def timing_headers(
    request: Request, result: SegmentResult, height: int, width: int, model: str
) -> dict[str, str]:
    total_ms = (time.monotonic() - arrival(request)) * 1000
    return {
        "X-Model-Name": model,
        "X-Image-Width": str(width),
        "X-Image-Height": str(height),
        "X-Tile-Size": str(result.tile_size),
        "X-Tiles": str(result.tiles),
        "X-Batches": str(result.batches),
        "X-Queue-Ms": f"{result.queue_s * 1000:.1f}",
        "X-Inference-Ms": f"{result.inference_s * 1000:.1f}",
        "X-Total-Ms": f"{total_ms:.1f}",
    }
