"""The service behind the routes: the loaded model and what routes may know of it, its
lifecycle, the tile batcher, and the mapping of every failure onto one HTTP status code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from app.batching import TileBatcher
from app.errors import ApiError
from app.metrics import Metrics
from app.queued import (
    ClientGoneError,
    DeadlineExceededError,
    InferenceError,
    QueuedImage,
    QueueFullError,
    ShuttingDownError,
    TooManyTilesError,
)
from app.settings import Settings
from model.engine import Segmenter
from model.imageio import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
)
from model.runner import BatchRunner
from model.tiling import tile_sizes

log = logging.getLogger("app.service")


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
    metrics: dict[str, float]  # the card's validation metrics, if any


@dataclass
class SegmentResult:
    mask: np.ndarray  # (H, W) uint8
    probabilities: np.ndarray | None  # (K, H, W) float32
    tile_size: int
    tiles: int
    batches: int  # forward passes that held at least one of this image's tiles
    queue_s: float  # accepted -> first tile in a forward pass
    inference_s: float  # first forward pass -> last tile stitched


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
            metrics=dict(card.metrics.get("overall", {})),
        )
        self.runner = BatchRunner(
            segmenter,
            settings.batch_tiles_for(segmenter.device.type),
            on_oom_split=metrics.oom_splits.inc,
        )
        self.batcher = TileBatcher(
            self.runner,
            lambda: self.runner.limit,
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

    async def decode(self, data: bytes) -> np.ndarray:
        """Upload bytes -> (H, W, C) image, off the event loop; errors as ApiError."""
        try:
            return await asyncio.to_thread(decode_image, data, self.settings.max_pixels)
        except ImageError as e:
            raise image_error(e) from None

    async def submit(
        self, image: np.ndarray, *, probabilities: bool, tta: int | None = None
    ) -> QueuedImage:
        """Prepare and plan a decoded (H, W, C) image and queue it, or refuse at once.
        `tta`: 1 or 8 views averaged (None: the server's UNET_TTA)."""
        self.check_available()
        height, width = image.shape[:2]
        if height * width > self.settings.max_pixels:
            raise ApiError(
                413,
                f"image is {width}x{height} = {height * width} pixels, more than the limit of "
                f"{self.settings.max_pixels}",
            )
        try:
            tiled = await asyncio.to_thread(
                self.segmenter.tiled,
                image,
                self.info.tile_sizes,
                probabilities,
                self.settings.tta if tta is None else tta,
            )
        except ImageError as e:
            raise ApiError(422, str(e)) from None
        self.check_available()  # the state may have changed while the image was prepared
        try:
            return self.batcher.submit(tiled)
        except QueueFullError as e:
            raise ApiError(
                503, "the queue is full; retry later", {"Retry-After": str(e.retry_after)}
            ) from None
        except TooManyTilesError as e:
            raise ApiError(413, str(e)) from None
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None

    def check_instances(self, image: np.ndarray | None = None) -> None:
        """Refuse instances that the model cannot give, or that would take more memory than
        UNET_MAX_INSTANCE_PIXELS allows, before anything is computed."""
        if self.info.out_channels != 1:
            raise ApiError(422, "instances need a one-class model (foreground probabilities)")
        if image is None:
            return
        pixels = image.shape[0] * image.shape[1]
        limit = self.settings.max_instance_pixels
        if pixels > limit:
            raise ApiError(
                413,
                f"cell instances of a {image.shape[1]}x{image.shape[0]} image ({pixels} pixels) "
                f"need more memory than UNET_MAX_INSTANCE_PIXELS ({limit}) allows (instances "
                "peak at about 6 bytes per pixel); ask for the mask or probabilities, or "
                "segment the image in parts",
            )

    async def instances(self, result: SegmentResult) -> np.ndarray:
        """(H, W) uint32 cell labels of a result submitted with probabilities."""
        self.check_instances()
        if result.probabilities is None:
            raise ApiError(422, "instances need the request's probabilities")
        return await asyncio.to_thread(self.segmenter.instances, result.probabilities)

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
            mask=segmentation.mask,
            probabilities=segmentation.probabilities,
            tile_size=job.image.tile_size,
            tiles=job.image.total,
            batches=job.batches,
            queue_s=job.queue_s,
            inference_s=job.inference_s,
        )
