"""The service behind the routes: the loaded model and what routes may know of it, its
lifecycle, the tile batcher, and the mapping of every failure onto one HTTP status code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from unet_service.api.errors import ApiError
from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner
from unet_service.core.tiling import tile_sizes
from unet_service.imaging.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from unet_service.imaging.pages import decode_pages
from unet_service.imaging.sources import ArraySource, check_values
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.serving.batcher import TileBatcher
from unet_service.serving.limits import check_instances, check_pages
from unet_service.serving.metrics import Metrics
from unet_service.serving.queued import (
    ClientGoneError,
    DeadlineExceededError,
    InferenceError,
    QueuedImage,
    QueueFullError,
    ShuttingDownError,
    TooManyTilesError,
)
from unet_service.settings import Settings

log = logging.getLogger("unet_service.serving.service")


class State(StrEnum):
    """The service's one lifecycle state: starting -> ready -> draining -> stopped."""

    starting = "starting"
    ready = "ready"
    draining = "draining"
    stopped = "stopped"


@dataclass(frozen=True)
class ModelInfo:
    """What the routes show of the model (from its card) and of how it is served."""

    name: str
    description: str
    class_names: list[str]
    threshold: float
    depth: int
    in_channels: int
    out_channels: int
    tile_sizes: tuple[int, ...]
    # The card's headline validation figures, each defined (core.card_metrics); {} if none.
    metrics: dict[str, dict[str, Any]]


@dataclass
class SegmentResult:
    pages: list[Segmentation]  # one per page of the upload (one for a plain image)
    tile_size: int
    tiles: int  # of all pages
    batches: int  # forward passes that held at least one of this upload's tiles
    queue_s: float  # accepted -> first tile in a forward pass
    inference_s: float  # first forward pass -> last tile stitched

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8 mask of the first (for a plain image, the only) page."""
        return self.pages[0].mask

    @property
    def probabilities(self) -> np.ndarray | None:
        """(K, H, W) float32 probabilities of the first page, when asked for."""
        return self.pages[0].probabilities


def load_segmenter(settings: Settings) -> Segmenter:
    """The one way the service loads its model (at start-up, in production and in tests).
    Raises WeightsError or ValueError with a one-line reason."""
    segmenter = Segmenter.from_weights(
        settings.weights, settings.device, settings.precision, settings.backend, settings.compile
    )
    settings.check_tile_size(segmenter.geometry)
    return segmenter


def image_error(e: ImageError) -> ApiError:
    """413 for too many pixels; 415 for bytes that are not an image we read; 422 for an
    image that is empty, broken or truncated, or has unusable pixels."""
    if isinstance(e, ImageTooLargeError):
        return ApiError(413, str(e))
    if isinstance(e, UnsupportedImageError) and not isinstance(e, CorruptImageError):
        return ApiError(415, str(e))
    return ApiError(422, str(e))  # empty, corrupt or truncated, unusable pixels


class InferenceService:
    def __init__(self, settings: Settings, segmenter: Segmenter, metrics: Metrics) -> None:
        settings.check_tile_size(segmenter.geometry)
        self.settings = settings
        self.segmenter = segmenter
        self.metrics = metrics
        card = segmenter.card
        self.info = ModelInfo(
            name=card.name,
            description=card.description,
            class_names=list(card.class_names),
            threshold=card.threshold,
            depth=card.depth,
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            tile_sizes=tile_sizes(segmenter.geometry, settings.tile_size),
            metrics=card.metrics_summary(),
        )
        self.runner = BatchRunner(
            segmenter,
            settings.batch_tiles_for(segmenter.device.type),
            on_oom_split=metrics.oom_splits.inc,
        )
        self.batcher = TileBatcher(
            self.runner,
            lambda: self.runner.limit,
            background_batch_limit=lambda: min(
                self.runner.limit, settings.job_batch_tiles_for(segmenter.device.type)
            ),
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_tiles=settings.max_queue_tiles,
            metrics=metrics,
        )
        self.state = State.starting
        metrics.add_device_memory(segmenter.memory_stats)

    @property
    def model_name(self) -> str:
        return self.info.name

    @property
    def ready(self) -> bool:
        return self.state is State.ready

    async def start(self) -> None:
        """Warm up every tile size (and, for compiled graphs, every batch shape), then start
        the worker and report ready."""
        started = time.monotonic()
        seg = self.segmenter
        await asyncio.to_thread(seg.warm_up, self.info.tile_sizes, self.runner.max_batch)
        self.batcher.start()
        self._set_state(State.ready)
        log.info(
            "model %r ready on %s (%s, %s) in %.1f s: depth %d, tile sizes %s, batch <= %d tiles",
            self.model_name,
            seg.device,
            seg.backend.name,
            seg.precision,
            time.monotonic() - started,
            seg.geometry.depth,
            "/".join(map(str, self.info.tile_sizes)),
            self.runner.max_batch,
        )

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.ready.set(1 if state is State.ready else 0)

    def begin_drain(self) -> None:
        """Called on SIGTERM: refuse new work at once, keep serving what was accepted."""
        if self.state in (State.starting, State.ready):
            self._set_state(State.draining)

    async def shutdown(self, timeout: float) -> None:
        self.begin_drain()
        await self.batcher.drain(timeout)
        self._set_state(State.stopped)

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Hold while a request is received, decoded and submitted (once per request)."""
        return self.batcher.arriving()

    def check_available(self) -> None:
        if self.state is State.starting:
            raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
        if self.state is not State.ready:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"})

    async def decode(self, data: bytes) -> list[np.ndarray]:
        """Upload bytes -> its pages, each (H, W, C) (one for anything but a multi-page
        TIFF), off the event loop; errors as ApiError. UNET_MAX_PIXELS bounds all pages
        together, UNET_MAX_PAGES their count."""
        settings = self.settings
        try:
            return await asyncio.to_thread(
                decode_pages, data, settings.max_pixels, settings.max_pages
            )
        except ImageError as e:
            raise image_error(e) from None

    def check_pages(self, pages: Sequence[np.ndarray]) -> None:
        """413 for more pages, or more pixels in all pages together, than the limits."""
        check_pages(self.settings, pages)

    async def submit(
        self,
        image: np.ndarray | Sequence[np.ndarray],
        *,
        probabilities: bool,
        tta: int | None = None,
    ) -> QueuedImage:
        """Prepare and plan a decoded (H, W, C) image, or a stack's pages (a sequence of
        them, one size), and queue it, or refuse at once. A stack is one entry of the queue
        (a `TiledStack`): its pages' tiles batch with each other and with other requests',
        it counts as one line in the round-robin, and it fails, times out or is cancelled as
        a whole. `tta`: 1 or 8 views averaged (None: the server's UNET_TTA)."""
        self.check_available()
        pages = [image] if isinstance(image, np.ndarray) else list(image)
        self.check_pages(pages)
        variants = self.settings.tta if tta is None else tta

        def plan() -> TiledImage | TileGroup:
            check_values(ArraySource(pages))  # the check a job's file gets, stack-wide
            source = ArraySource([self.segmenter.prepare(page) for page in pages])
            recipe = self.segmenter.recipe(self.info.tile_sizes)
            return recipe.in_memory(source, probabilities=probabilities, tta=variants)

        try:
            queued = await asyncio.to_thread(plan)
        except ImageError as e:
            raise ApiError(422, str(e)) from None
        self.check_available()  # the state may have changed while the image was prepared
        try:
            return self.batcher.submit(queued)
        except QueueFullError as e:
            raise ApiError(
                503, "the queue is full; retry later", {"Retry-After": str(e.retry_after)}
            ) from None
        except TooManyTilesError as e:
            raise ApiError(413, str(e)) from None
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None

    def submit_background(self, image: TiledImage) -> QueuedImage:
        """Queue a section job's page image (prepared and planned by the job): computed when
        no request's tiles wait (see serving.batcher)."""
        try:
            return self.batcher.submit(image, background=True)
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None

    def check_instances(self, image: np.ndarray | Sequence[np.ndarray] | None = None) -> None:
        """Refuse instances that the model cannot give, or that would take more memory than
        UNET_MAX_INSTANCE_PIXELS allows (per page of a stack), before anything is computed."""
        check_instances(self.settings, self.info.out_channels, image)

    async def instances(self, result: SegmentResult) -> list[np.ndarray]:
        """(H, W) uint32 cell labels of each page of a result submitted with
        probabilities; each page is labelled on its own (ids start at 1 on every page)."""
        self.check_instances()
        if result.probabilities is None:
            raise ApiError(422, "instances need the request's probabilities")

        def label() -> list[np.ndarray]:
            return [self.segmenter.instances(page.probabilities) for page in result.pages]

        return await asyncio.to_thread(label)

    async def result(
        self,
        job: QueuedImage,
        *,
        started: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> SegmentResult:
        """Wait for a submitted job. `started` is the request's arrival (time.monotonic());
        the deadline counts from there."""
        timeout = self.settings.request_timeout_s
        remaining = started + timeout - time.monotonic()
        try:
            segmentation = await self.batcher.result(job, remaining, disconnected)
        except DeadlineExceededError:
            raise ApiError(
                504, f"the request did not finish within {timeout:g} s (UNET_REQUEST_TIMEOUT_S)"
            ) from None
        except ClientGoneError:
            # Nobody reads this response; 499 (nginx's "client closed request") keeps the
            # metrics honest.
            raise ApiError(499, "the client closed the connection") from None
        except InferenceError as e:
            raise ApiError(500, f"{e}; see the server log") from None
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
        return SegmentResult(
            pages=segmentation if isinstance(segmentation, list) else [segmentation],
            tile_size=job.image.tile_size,
            tiles=job.image.total,
            batches=job.batches,
            queue_s=job.queue_s,
            inference_s=job.inference_s,
        )
