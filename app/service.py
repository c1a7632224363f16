"""The service behind the routes: the loaded model, its warm-up, the tile batcher, and the
mapping of every failure onto one HTTP status code."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.batching import (
    ClientGoneError,
    DeadlineExceededError,
    InferenceError,
    Job,
    QueueFullError,
    SegmentResult,
    ShuttingDownError,
    TileBatcher,
    TooManyTilesError,
    choose_tile_size,
    tile_buckets,
)
from app.errors import ApiError
from app.metrics import Metrics
from app.settings import Settings
from model.engine import Segmenter
from model.imageio import (
    TIFF_MAGIC,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
)

log = logging.getLogger("app.service")


# File signatures of the formats we read, for files whose header Pillow itself refuses
# (a PNG declaring zero width is a broken PNG, not an unknown format).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def _format_recognised(data: bytes) -> bool:
    """Whether the bytes start like an image we support (header only, no decoding)."""
    if data[:4] in TIFF_MAGIC or data.startswith(_SIGNATURES):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def image_error(e: ImageError, data: bytes | None = None) -> ApiError:
    """415 for bytes that are not an image we read; 422 for an image that is empty, broken
    or truncated, or has the wrong channels; 413 for too many pixels."""
    if isinstance(e, ImageTooLargeError):
        return ApiError(413, str(e))
    if isinstance(e, EmptyImageError):
        return ApiError(422, str(e))
    if isinstance(e, UnsupportedImageError):
        if data is not None and _format_recognised(data):
            return ApiError(422, f"the image is truncated or corrupt: {e}")
        return ApiError(415, str(e))
    return ApiError(422, str(e))


class InferenceService:
    def __init__(self, settings: Settings, segmenter: Segmenter, metrics: Metrics) -> None:
        settings.check_tile_size(segmenter.geometry)
        self.settings = settings
        self.segmenter = segmenter
        self.metrics = metrics
        self.buckets = tile_buckets(segmenter.geometry, settings.tile_size)
        self.batcher = TileBatcher(
            segmenter,
            max_batch_tiles=settings.batch_tiles_for(segmenter.device),
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_tiles=settings.max_queue_tiles,
            metrics=metrics,
        )
        self.ready = False
        self.draining = False

    @property
    def model_name(self) -> str:
        return self.segmenter.card.name

    async def start(self) -> None:
        """Warm up every tile size (and, for compiled graphs, every batch shape), then start
        the worker and report ready."""
        started = time.monotonic()
        await asyncio.to_thread(self._warm_up)
        self.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)
        seg = self.segmenter
        log.info(
            "model %r ready on %s (%s, %s) in %.1f s: depth %d, tile sizes %s, batch <= %d tiles",
            self.model_name,
            seg.device,
            seg.backend.name,
            seg.precision,
            time.monotonic() - started,
            seg.geometry.depth,
            "/".join(map(str, self.buckets)),
            self.batcher.max_batch_tiles,
        )

    def _warm_up(self) -> None:
        self.segmenter.warm_up(self.buckets, self.batcher.max_batch_tiles)

    def begin_drain(self) -> None:
        """Called on SIGTERM: refuse new work at once, keep serving what was accepted."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        self.batcher.stop_accepting()

    async def shutdown(self, timeout: float) -> None:
        self.begin_drain()
        await self.batcher.drain(timeout)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being received, decoded, queued): the worker waits
        up to UNET_MAX_WAIT_MS for a fuller batch only while one is, so a lone request
        starts at once."""
        self.batcher.arriving += 1
        try:
            yield
        finally:
            self.batcher.arriving -= 1
            if self.batcher.arriving == 0:
                self.batcher.wake()

    def check_available(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"})
        if not self.ready:
            raise ApiError(503, "the model is still loading", {"Retry-After": "5"})

    async def decode(self, data: bytes) -> np.ndarray:
        """Upload bytes -> (H, W, C) image, off the event loop; errors as ApiError."""
        try:
            return await asyncio.to_thread(decode_image, data, self.settings.max_pixels)
        except ImageError as e:
            raise image_error(e, data) from None

    async def segment(
        self,
        image: np.ndarray,
        *,
        probabilities: bool,
        started: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> SegmentResult:
        """Segment a decoded (H, W, C) image through the shared batcher. `started` is the
        request's arrival (time.monotonic()); the deadline counts from there."""
        self.check_available()
        height, width = image.shape[:2]
        if height * width > self.settings.max_pixels:
            raise ApiError(
                413,
                f"image is {width}x{height} = {height * width} pixels, more than the limit of "
                f"{self.settings.max_pixels}",
            )
        with self.arriving():
            try:
                prepared = await asyncio.to_thread(self.segmenter.prepare, image)
            except ImageError as e:
                raise ApiError(422, str(e)) from None
            tile_size = choose_tile_size(height, width, self.buckets, self.segmenter.geometry)
            job = self._submit(prepared, tile_size, probabilities)
        batcher = self.batcher
        timeout = self.settings.request_timeout_s
        remaining = started + timeout - time.monotonic()
        try:
            return await batcher.result(job, remaining, disconnected)
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

    def _submit(self, image: np.ndarray, tile_size: int, probabilities: bool) -> Job:
        try:
            return self.batcher.submit(image, tile_size, probabilities)
        except QueueFullError as e:
            raise ApiError(
                503, "the queue is full; retry later", {"Retry-After": str(e.retry_after)}
            ) from None
        except TooManyTilesError as e:
            raise ApiError(413, str(e)) from None
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
