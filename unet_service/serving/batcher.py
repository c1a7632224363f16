"""Cross-request tile batching: one worker fills each batch with tiles from any number of
requests and hands it to its lane's batch callable (a lane per model: a batch holds one
model's tiles; the lanes with work are served in turn).

The batcher schedules and knows nothing of the model: each request is a queue entry
(`pipeline.tiled_image`: plan, tile cutting, stitching) and the callable
(`core.runner.BatchRunner`) turns a list of (image, tile) into outputs and owns the device, its
precision and its out-of-memory splitting. Tiles of one size share a shape, so a batch can mix
tiles of a 4096x4096 slice and a 200x300 crop. `submit` admits a planned image (or refuses it
at once when the queue is full); the worker takes the oldest waiting image's tile size, tiles
of that size round-robin over the waiting images (a huge image cannot starve small ones), waits
at most `max_wait_s` for a batch to fill (only while other requests are still arriving), and
runs the callable in its own thread. Tiles are cut only when their batch runs, and outputs go
back to each image, which stitches them; any failure on the way fails exactly the images with
tiles in that batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from unet_service.core.runner import BatchItem, TileOutput
from unet_service.core.tiling import Tile
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TileGroup
from unet_service.serving.events import wait_event
from unet_service.serving.metrics import Metrics
from unet_service.serving.queued import (
    Lane,
    QueuedImage,
    ShuttingDownError,
    batch_failure,
    check_room,
    next_line,
    take_round_robin,
    wait_for_job,
)

log = logging.getLogger("unet_service.serving.batcher")

BatchCallable = Callable[[Sequence[BatchItem]], list[TileOutput]]


class TileBatcher:
    """The tile queue and its single worker. Everything but the batch callable runs on the
    event loop, so the bookkeeping needs no locks."""

    def __init__(
        self,
        run_batch: BatchCallable | None,
        batch_limit: Callable[[], int],
        *,
        background_batch_limit: Callable[[], int] = lambda: 1,
        max_wait_s: float,
        max_queue_tiles: int,
        metrics: Metrics | None = None,
    ) -> None:
        # For images submitted without a lane of their own (a batcher serving one model).
        self.lane = Lane("", run_batch, batch_limit, background_batch_limit) if run_batch else None
        self._served: dict[Lane, int] = {}  # lane -> number of the batch that last served it
        self._batches = 0
        self.max_wait_s = max_wait_s
        self.max_queue_tiles = max_queue_tiles
        self.metrics = metrics
        self._ready: deque[QueuedImage] = deque()  # jobs with tiles not yet handed to the worker
        self._active: set[QueuedImage] = set()  # jobs not finished, failed or cancelled
        self.queued_tiles = 0  # requests' tiles not yet computed (what the queue limit counts)
        self._background_tiles = 0
        self._arriving = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._seconds_per_tile = 0.05
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-infer")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="unet-worker")

    async def drain(self, timeout: float) -> bool:
        """Let accepted work finish for up to `timeout` seconds, then stop. Returns False
        when work had to be abandoned. (The service stops admitting new work first.)"""
        finished = True
        if self._active:
            images, tiles = len(self._active), self.queued_tiles
            log.info("draining %d image(s), %d tile(s), for up to %.0f s", images, tiles, timeout)
            if not await wait_event(self._idle, timeout):
                finished = False
                log.warning("drain timeout: abandoning %d image(s)", len(self._active))
        await self.stop()
        return finished

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in list(self._active):
            self._fail(job, ShuttingDownError())
        if self._executor is not None:
            # A batch still running in the thread finishes on its own; nobody waits.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ----- requests' side --------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Held by a request while it is received, decoded and planned: the worker waits
        up to max_wait_s for a fuller batch only while some request is, so a lone request
        starts at once."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._arriving == 0:
                self._wakeup.set()

    @property
    def queued_images(self) -> int:
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the measured throughput."""
        return max(1, min(60, math.ceil(self.queued_tiles * self._seconds_per_tile)))

    def submit(
        self, image: TiledImage | TileGroup, *, background: bool = False, lane: Lane | None = None
    ) -> QueuedImage:
        """Admit an image or a stack (all its pages' tiles count), or raise at once:
        ShuttingDownError, TooManyTilesError, QueueFullError. A `background` image (a section
        job's page) is computed only when no request's tiles wait, `background_batch_limit()`
        tiles a batch (a request waits for at most one such batch), outside the queue limit."""
        if self._task is None:
            raise ShuttingDownError()
        n = image.total
        if not background:
            check_room(image, self.queued_tiles, self.max_queue_tiles, self.retry_after)
        lane = lane or self.lane
        assert lane is not None, "a batcher without a model of its own takes lanes"
        job = QueuedImage(image, asyncio.get_running_loop(), lane, background=background)
        self._active.add(job)
        self._ready.append(job)
        self._count(job, n)
        self._idle.clear()
        self._update_gauges()
        self._wakeup.set()
        return job

    def _count(self, job: QueuedImage, tiles: int) -> None:
        if job.background:
            self._background_tiles += tiles
        else:
            self.queued_tiles += tiles

    async def result(
        self,
        job: QueuedImage,
        timeout: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> Segmentation | list[Segmentation]:
        """Wait for a job (`disconnected()`: an awaitable that returns when the client goes
        away). On DeadlineExceededError, ClientGoneError or cancellation of the caller, the
        job's remaining tiles leave the queue before this returns."""
        try:
            return await wait_for_job(job, timeout, disconnected)
        finally:
            self.cancel(job)

    def cancel(self, job: QueuedImage) -> None:
        """Drop a job's remaining tiles (no-op for a finished job)."""
        if not job.active:
            return
        self._retire(job)
        if not job.future.done():
            job.future.cancel()

    # ----- worker side -----------------------------------------------------------------------

    def _retire(self, job: QueuedImage) -> None:
        job.active = False
        self._count(job, -job.image.outstanding)
        self._active.discard(job)
        with contextlib.suppress(ValueError):
            self._ready.remove(job)
        if not self._active:
            self._idle.set()
        self._update_gauges()

    def _fail(self, job: QueuedImage, error: Exception) -> None:
        if not job.active:
            return
        self._retire(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _finish(self, job: QueuedImage) -> None:
        # The result is built while the job is still active: if finalising fails, the
        # batch's failure handler can still fail this job instead of leaving it hanging.
        result = job.image.result()
        job.finished_at = time.monotonic()
        self._retire(job)
        if not job.future.done():
            job.future.set_result(result)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(self.queued_tiles, len(self._active), self._background_tiles)

    async def _run(self) -> None:
        while True:
            batch: list[tuple[QueuedImage, Tile]] = []
            try:
                size = await self._next_batch()
                self._pick(size, batch)
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Whatever failed, while the batch was formed, computed or stitched, fails
                # exactly the requests with tiles in it, at once; the worker goes on.
                self._fail_batch(batch, e)

    def _fail_batch(self, batch: list[tuple[QueuedImage, Tile]], error: Exception) -> None:
        jobs = list(dict.fromkeys(job for job, _ in batch))
        failure, reason = batch_failure(error, len(batch), len(jobs), self.metrics)
        for job in jobs:
            self._fail(job, failure(reason))

    def _line(self) -> tuple[list[QueuedImage], int]:
        return next_line(self._ready, self._served)

    async def _next_batch(self) -> int:
        """Wait for work, then for the batch to fill or the oldest job's wait to run out;
        returns the tile size of the batch to form."""
        while True:
            if not self._ready:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            line, limit = self._line()
            head = line[0]
            size = head.image.tile_size
            available = sum(job.image.pending for job in line if job.image.tile_size == size)
            wait = head.waiting_since + self.max_wait_s - time.monotonic()
            if head.background or available >= limit or wait <= 0 or self._arriving == 0:
                return size
            self._wakeup.clear()
            await wait_event(self._wakeup, wait)

    def _pick(self, size: int, picks: list[tuple[QueuedImage, Tile]]) -> None:
        """Fill `picks` round-robin (see `take_round_robin`); served jobs move to the back
        of the line, and jobs with nothing left leave it."""
        line, limit = self._line()
        served = take_round_robin(line, size, limit, picks)
        now = time.monotonic()
        for job in served:
            first = job.mark_served(now)
            if first and self.metrics is not None and not job.background:
                self.metrics.queue_wait.observe(job.queue_s)
        served_set = set(served)
        self._ready = deque(
            [job for job in self._ready if job not in served_set]
            + [job for job in served if job.image.pending > 0]
        )

    async def _process(self, picks: list[tuple[QueuedImage, Tile]]) -> None:
        loop = asyncio.get_running_loop()
        items = [(job.image, tile) for job, tile in picks]
        start = time.monotonic()
        lane = picks[0][0].lane
        self._batches += 1
        self._served[lane] = self._batches
        outputs = await loop.run_in_executor(self._executor, lane.run_batch, items)
        elapsed = time.monotonic() - start
        self._seconds_per_tile = 0.8 * self._seconds_per_tile + 0.2 * elapsed / len(picks)
        if self.metrics is not None:
            self.metrics.observe_batch(lane.name, len(picks), elapsed)
        for (job, tile), (probabilities, mask) in zip(picks, outputs, strict=True):
            if not job.active:  # cancelled or timed out while its batch ran
                continue
            job.image.add(tile, probabilities, mask)
            self._count(job, -1)
            if job.image.complete:
                self._finish(job)
        self._update_gauges()
