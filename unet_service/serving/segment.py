"""The one way an image or a stack is segmented on request, whatever the transport: v1 and v2
parse their input into a `SegmentRequest` and a way to read the image, call `segment`, and
encode what comes back (LitServe's decode -> predict -> encode, the middle step shared). It
raises `unet_service.errors` and `imaging.errors`; `api.errors` makes answers of them.

The flow: while the image is read (the transport's own `read`: an upload decoded, a tensor
parsed) and planned, the request counts as arriving, so the batcher waits a little for its
tiles before running a batch without them; its limits are checked before any pixel is
computed; its stack is one queue entry (`pipeline.recipe`); the wait ends with the result,
the deadline (counted from the request's arrival), the client going away, or a failure of a
batch holding its tiles. Cell instances, when asked for, are labelled page by page after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from unet_service.errors import DeadlineExceededError
from unet_service.pipeline.outputs import SegmentRequest
from unet_service.pipeline.sinks import Segmentation
from unet_service.serving.limits import check_instances, check_stack
from unet_service.serving.models import LoadedModel
from unet_service.serving.queued import QueuedImage
from unet_service.serving.service import InferenceService


@dataclass
class SegmentResult:
    model: str  # the name of the model that segmented it
    out_channels: int  # its classes
    images: list[np.ndarray]  # the decoded pages, (H, W, C) each (one for a plain image)
    pages: list[Segmentation]  # one per page
    labels: list[np.ndarray] | None  # (H, W) uint32 cell ids per page, when asked for
    tile_size: int
    tiles: int  # of all pages
    batches: int  # forward passes that held at least one of this upload's tiles
    queue_s: float  # accepted -> first tile in a forward pass
    inference_s: float  # first forward pass -> last tile stitched

    @property
    def height(self) -> int:
        return self.images[0].shape[0]

    @property
    def width(self) -> int:
        return self.images[0].shape[1]

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8 mask of the first (for a plain image, the only) page."""
        return self.pages[0].mask

    @property
    def probabilities(self) -> np.ndarray | None:
        """(K, H, W) float32 probabilities of the first page, when asked for."""
        return self.pages[0].probabilities


async def segment(
    service: InferenceService,
    model: str | None,
    read: Callable[[], Awaitable[tuple[SegmentRequest, list[np.ndarray]]]],
    *,
    started: float,
    disconnected: Callable[[], Awaitable[object]] | None = None,
) -> SegmentResult:
    """Read what is asked and the image (its pages, each (H, W, C) of one size), segment it
    so with model `model` (None: the default one), and return everything asked for.
    `started`: the request's arrival (time.monotonic()), from which its deadline counts."""
    service.check_available()
    async with service.models.hold(model) as loaded:
        with service.arriving():
            request, images = await read()
            height, width = images[0].shape[:2]
            if request.labels:  # per page, before the stack's limits (the sharper reason)
                out_channels = loaded.info.out_channels
                check_instances(service.settings, out_channels, height, width)
            check_stack(service.settings, len(images), height, width)
            entry = await asyncio.to_thread(
                loaded.recipe.for_images,
                images,
                probabilities=request.probabilities,
                tta=request.tta,
            )
            queued = service.submit(loaded, entry)
        result = await _wait(service, loaded, queued, images, started, disconnected)
        if request.labels:
            result.labels = await asyncio.to_thread(service.label, loaded, result.pages)
    return result


async def _wait(
    service: InferenceService,
    model: LoadedModel,
    queued: QueuedImage,
    images: list[np.ndarray],
    started: float,
    disconnected: Callable[[], Awaitable[object]] | None,
) -> SegmentResult:
    timeout = service.settings.request_timeout_s
    remaining = started + timeout - time.monotonic()
    try:
        segmentation = await service.batcher.result(queued, remaining, disconnected)
    except DeadlineExceededError:
        raise DeadlineExceededError(
            f"the request did not finish within {timeout:g} s (UNET_REQUEST_TIMEOUT_S)"
        ) from None
    return SegmentResult(
        model=model.name,
        out_channels=model.info.out_channels,
        images=images,
        pages=segmentation if isinstance(segmentation, list) else [segmentation],
        labels=None,
        tile_size=queued.image.tile_size,
        tiles=queued.image.total,
        batches=queued.batches,
        queue_s=queued.queue_s,
        inference_s=queued.inference_s,
    )
