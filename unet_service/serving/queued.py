"""A request's image in the tile queue (a `QueuedImage`: one synchronous request's or one
section job's image), and the ways its wait can end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from unet_service.core.tiling import Tile
from unet_service.errors import (
    ClientGoneError,
    DeadlineExceededError,
    InferenceError,
    LimitError,
    UnavailableError,
    UnreadableImageError,
)
from unet_service.imaging.errors import ImageError
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TiledStack, TileGroup
from unet_service.serving.metrics import Metrics

log = logging.getLogger("unet_service.serving.batcher")


class QueueFullError(UnavailableError):
    """The tile queue has no room for the request now (retry after `retry_after`)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the queue is full; retry later", retry_after=retry_after)


class ShuttingDownError(UnavailableError):
    """The batcher is not running (not started, draining or stopped)."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down", retry_after=5)


class TooManyTilesError(LimitError):
    """One image needs more tiles than the whole queue holds."""


def failure_reason(error: Exception) -> str:
    """What the requests of a failed batch are told."""
    # A section's input is read tile by tile, so a chunk broken inside its compressed data
    # is only found when its tile is cut: that is the upload's fault, and the message says so.
    if isinstance(error, ImageError):
        return f"the image could not be read: {error}"
    return f"inference failed ({type(error).__name__})"


def batch_failure(
    error: Exception, tiles: int, requests: int, metrics: Metrics | None
) -> tuple[type[InferenceError], str]:
    """(the error, the reason) the requests of a failed batch get, logged as its cause
    deserves: a tile cut from a corrupt file (a section job's) is the upload's fault, a
    warning; anything else is the worker's, logged with its traceback and counted."""
    reason = failure_reason(error)
    if isinstance(error, ImageError):
        log.warning("a batch of %d tile(s) failed: %s", tiles, reason)
        return UnreadableImageError, reason
    log.error(
        "a batch of %d tile(s) failed (%s: %s); failing %d request(s)",
        tiles,
        type(error).__name__,
        error,
        requests,
        exc_info=error,
    )
    if metrics is not None:
        metrics.worker_errors.inc()
    return InferenceError, reason


def check_room(
    image: TiledImage | TileGroup, queued: int, limit: int, retry_after: Callable[[], int]
) -> None:
    """Refuse a request's image (or stack: all its pages' tiles count) that the tile queue,
    holding `queued` of at most `limit` tiles, has no room for: TooManyTilesError when it
    could never fit, QueueFullError (with a Retry-After) when it does not fit now."""
    n = image.total
    if n > limit:
        size = image.tile_size
        pages = image.pages if isinstance(image, TiledStack) else None
        what = f"the stack of {len(pages)} pages" if pages else "the image"
        raise TooManyTilesError(
            f"{what} needs {n} tiles of {size}x{size}, more than the queue holds "
            f"({limit}; raise UNET_MAX_QUEUE_TILES)"
        )
    if queued + n > limit:
        raise QueueFullError(retry_after())


@dataclass(frozen=True, eq=False)
class Lane:
    """One model's way through the batcher: the callable that computes its batches and its
    batch limits (read before every batch: they may shrink and grow). A batch holds the
    tiles of one lane only; the worker serves the lanes that have work in turn."""

    name: str
    run_batch: Callable[[Sequence[Any]], list[Any]]
    batch_limit: Callable[[], int]
    background_batch_limit: Callable[[], int] = lambda: 1


class QueuedImage:
    """One request's image (or stack of pages, as one entry) in the queue: the TiledImage
    or TiledStack, its future and its timings."""

    def __init__(
        self,
        image: TiledImage | TileGroup,
        loop: asyncio.AbstractEventLoop,
        lane: Lane,
        *,
        background: bool = False,
    ) -> None:
        self.image = image
        self.lane = lane
        self.background = background  # a section job's page: computed when requests are not
        # A TiledStack's result is the list of its pages' segmentations.
        self.future: asyncio.Future[Segmentation | list[Segmentation]] = loop.create_future()
        self.accepted_at = time.monotonic()
        self.waiting_since = self.accepted_at  # last time the worker served this job
        self.first_batch_at: float | None = None
        self.finished_at: float | None = None
        self.batches = 0  # batches that held at least one of its tiles
        self.active = True

    def mark_served(self, now: float) -> bool:
        """Note that a batch took tiles of this image at `now`; True for its first batch."""
        self.batches += 1
        self.waiting_since = now
        first = self.first_batch_at is None
        if first:
            self.first_batch_at = now
        return first

    @property
    def queue_s(self) -> float:
        """Accepted -> first tile in a batch."""
        return (self.first_batch_at or self.accepted_at) - self.accepted_at

    @property
    def inference_s(self) -> float:
        """First batch -> last tile stitched."""
        end = self.finished_at or time.monotonic()
        return end - (self.first_batch_at or end)


def next_line(
    ready: Iterable[QueuedImage], last_served: dict[Lane, int]
) -> tuple[list[QueuedImage], int]:
    """The jobs the next batch is taken from, and its size limit: of the lane served least
    recently among those with work (so a flood for one model cannot starve another), its
    requests' images whenever any wait, else its background images (section jobs' pages)
    in batches of their own (small) limit. Requests of any lane go before background work."""
    ready = list(ready)
    pool = [job for job in ready if not job.background] or ready
    lanes = list(dict.fromkeys(job.lane for job in pool))  # oldest work first
    lane = min(lanes, key=lambda lane: last_served.get(lane, -1))
    line = [job for job in pool if job.lane is lane]
    return line, lane.batch_limit() if not line[0].background else lane.background_batch_limit()


def take_round_robin(
    line: Iterable[QueuedImage], size: int, limit: int, picks: list[tuple[QueuedImage, Tile]]
) -> list[QueuedImage]:
    """Append to `picks` up to `limit` tiles of one size from the jobs in `line`, one per
    job per turn, oldest first, so a huge image cannot starve small ones. `picks` is filled
    in place, so a failure midway still knows whom it touched. Returns the jobs served."""
    eligible = [job for job in line if job.image.tile_size == size]
    while eligible and len(picks) < limit:
        for job in list(eligible):
            if len(picks) == limit:
                break
            picks.append((job, job.image.take()))
            if job.image.pending == 0:
                eligible.remove(job)
    return list(dict.fromkeys(job for job, _ in picks))


async def wait_for_job(
    job: QueuedImage, timeout: float, disconnected: Callable[[], Awaitable[object]] | None
) -> Segmentation | list[Segmentation]:
    """The job's result, or DeadlineExceededError after `timeout` seconds, or
    ClientGoneError as soon as the awaitable `disconnected()` makes returns."""
    watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    try:
        waiting: set[asyncio.Future[object]] = {job.future}
        if watcher is not None:
            waiting.add(watcher)
        done, _ = await asyncio.wait(
            waiting, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
        )
        if job.future in done:
            return job.future.result()
        if watcher is not None and watcher in done:
            raise ClientGoneError("the client closed the connection")
        raise DeadlineExceededError(f"the request took longer than {timeout:.1f} s")
    finally:
        if watcher is not None:
            watcher.cancel()
