"""Cross-request tile batching: one inference worker owns the model and fills each forward
pass with tiles from any number of requests.

Every image is planned into square overlap tiles (see `model.tiling`). Tiles of one size
share a shape whatever image they come from, so a batch can mix tiles of a 4096x4096 slice
and a 200x300 crop with no ragged batching. Each image gets one of a few tile sizes
("buckets", see `tile_buckets`): small images are not padded up to the full tile, and the few
sizes still batch together.

Flow: a request is decoded and validated first, then `submit` admits it (or refuses at once
when the queue is full) as a `Job`. The worker picks the oldest waiting job's tile size,
takes tiles of that size round-robin over the waiting jobs (one tile per job per turn, so a
huge image cannot starve small ones), waits at most `max_wait_s` for a batch to fill, and
runs the forward pass in its own thread so the event loop stays free. Tile inputs are cut and
normalised only when their batch is formed: a 100-megapixel image never has more than one
batch of tiles in memory. Results go back to each job, which stitches its own mask.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from app.metrics import Metrics
from model.engine import Segmenter
from model.geometry import Geometry
from model.tiling import Stitcher, Tile, TilePlan

log = logging.getLogger("app.batching")

# After an out-of-memory split, try a larger batch again after this many good passes, so a
# transient memory spike does not cost throughput forever.
OOM_PROBE_PASSES = 200


class QueueFullError(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the tile queue is full; retry later")
        self.retry_after = retry_after


class ShuttingDownError(Exception):
    """The batcher no longer accepts work (draining or stopped)."""


class TooManyTilesError(ValueError):
    """One image needs more tiles than the whole queue holds."""


class DeadlineExceededError(Exception):
    pass


class ClientGoneError(Exception):
    pass


class InferenceError(Exception):
    """A forward pass failed; only the requests with tiles in that batch see this."""


def tile_buckets(geometry: Geometry, max_tile: int) -> tuple[int, ...]:
    """Legal output tile sizes offered to images smaller than `max_tile`: about a quarter, a
    half and the full tile (for depth 4 and 516: 132, 260, 516)."""
    geometry.check_tile(max_tile)
    sizes = {max_tile}
    for fraction in (4, 2):
        wanted = max(math.ceil(max_tile / fraction), geometry.min_tile)
        size = geometry.smallest_output_covering(wanted)
        if size < max_tile:
            sizes.add(size)
    return tuple(sorted(sizes))


def choose_tile_size(height: int, width: int, buckets: tuple[int, ...], geometry: Geometry) -> int:
    """The bucket that computes the image with the least work: the network's cost is about
    proportional to the input area, so minimise tiles x (tile + shrink)^2. Small images get a
    small tile instead of being padded up; large ones get the largest, whose margins cost
    least per output pixel. Ties go to the larger tile (fewer tiles to schedule)."""

    def cost(size: int) -> int:
        plan = TilePlan(height, width, geometry, size)
        return len(plan) * plan.input_size**2

    return min(sorted(buckets, reverse=True), key=cost)


@dataclass
class SegmentResult:
    mask: np.ndarray  # (H, W) uint8
    probabilities: np.ndarray | None  # (K, H, W) float32
    tile_size: int
    tiles: int
    batches: int  # forward passes that held at least one of this image's tiles
    queue_s: float  # accepted -> first tile in a forward pass
    inference_s: float  # first forward pass -> last tile stitched


class Job:
    """One image in flight: its lazy tile iterator, its stitchers and its future."""

    def __init__(
        self,
        job_id: int,
        image: np.ndarray,
        plan: TilePlan,
        out_channels: int,
        probabilities: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = job_id
        self.image = image
        self.plan = plan
        self.total = len(plan)
        self._tiles = iter(plan)
        self.taken = 0  # tiles handed to the worker
        self.done = 0  # tiles stitched
        self.mask = Stitcher(plan, 1, np.uint8)
        self.probs = Stitcher(plan, out_channels, np.float32) if probabilities else None
        self.future: asyncio.Future[SegmentResult] = loop.create_future()
        self.accepted_at = time.monotonic()
        self.waiting_since = self.accepted_at  # last time the worker served this job
        self.first_batch_at: float | None = None
        self.batches = 0
        self.active = True

    @property
    def tile_size(self) -> int:
        return self.plan.tile_size

    @property
    def pending(self) -> int:
        """Tiles not yet handed to the worker."""
        return self.total - self.taken

    @property
    def outstanding(self) -> int:
        """Tiles not yet stitched: what this job holds of the queue's capacity."""
        return self.total - self.done

    def take(self) -> Tile:
        self.taken += 1
        return next(self._tiles)


class TileBatcher:
    """The tile queue and its single inference worker. All methods except the forward pass
    run on the event loop, so the bookkeeping needs no locks."""

    def __init__(
        self,
        segmenter: Segmenter,
        *,
        max_batch_tiles: int,
        max_wait_s: float,
        max_queue_tiles: int,
        metrics: Metrics | None = None,
        forward: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_s
        self.max_queue_tiles = max_queue_tiles
        self.metrics = metrics
        # Public so tests and profilers can wrap the real forward pass (to time it, or to
        # inject a failure); the batcher calls whatever is here.
        self.forward_fn: Callable[[np.ndarray], np.ndarray] = forward or segmenter.forward
        self._batch_limit = max_batch_tiles  # lowered after an out-of-memory error
        self._passes_since_oom = 0
        self._ready: deque[Job] = deque()  # jobs with tiles not yet handed to the worker
        self._active: set[Job] = set()  # jobs not finished, failed or cancelled
        self._queued_tiles = 0
        self._ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._seconds_per_tile = 0.05
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.accepting = False
        # Requests being received or decoded (kept by the service): a batch is worth
        # waiting for only while one is on its way.
        self.arriving = 0

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already running")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unet-infer")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="unet-worker")
        self.accepting = True

    def wake(self) -> None:
        """Let the worker look at the queue again (e.g. nothing more is on its way)."""
        self._wakeup.set()

    def stop_accepting(self) -> None:
        self.accepting = False

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let accepted work finish for up to `timeout` seconds, then stop.
        Returns False when work had to be abandoned."""
        self.accepting = False
        finished = True
        if self._active:
            log.info(
                "draining %d image(s), %d tile(s), for up to %.0f s",
                len(self._active),
                self._queued_tiles,
                timeout,
            )
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                finished = False
                log.warning("drain timeout: abandoning %d image(s)", len(self._active))
        await self.stop()
        return finished

    async def stop(self) -> None:
        self.accepting = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in list(self._active):
            self._fail(job, ShuttingDownError("the server is shutting down"))
        if self._executor is not None:
            # A forward pass still running in the thread finishes on its own; nobody waits.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ----- requests' side --------------------------------------------------------------------

    @property
    def batch_limit(self) -> int:
        """Tiles per forward pass now: max_batch_tiles, or less after out-of-memory errors."""
        return self._batch_limit

    @property
    def queued_tiles(self) -> int:
        return self._queued_tiles

    @property
    def queued_images(self) -> int:
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the measured throughput."""
        return max(1, min(60, math.ceil(self._queued_tiles * self._seconds_per_tile)))

    def submit(self, image: np.ndarray, tile_size: int, probabilities: bool = False) -> Job:
        """Admit a prepared (H, W, C) image, or raise at once: ShuttingDownError,
        TooManyTilesError, QueueFullError."""
        if not self.accepting:
            raise ShuttingDownError("the server is not accepting work")
        plan = self.segmenter.plan(image.shape[0], image.shape[1], tile_size)
        n = len(plan)
        if n > self.max_queue_tiles:
            raise TooManyTilesError(
                f"the image needs {n} tiles of {tile_size}x{tile_size}, more than the queue "
                f"holds ({self.max_queue_tiles}; raise UNET_MAX_QUEUE_TILES)"
            )
        if self._queued_tiles + n > self.max_queue_tiles:
            raise QueueFullError(self.retry_after())
        job = Job(
            next(self._ids),
            image,
            plan,
            self.segmenter.out_channels,
            probabilities,
            asyncio.get_running_loop(),
        )
        self._active.add(job)
        self._ready.append(job)
        self._queued_tiles += n
        self._idle.clear()
        self._update_gauges()
        self._wakeup.set()
        return job

    async def result(
        self,
        job: Job,
        timeout: float,
        disconnected: Callable[[], Awaitable[object]] | None = None,
    ) -> SegmentResult:
        """Wait for a job; `disconnected()` makes an awaitable that returns when the client
        goes away. On timeout (DeadlineExceededError), client disconnect
        (ClientGoneError) or cancellation of the caller, the job's remaining tiles leave the
        queue before this returns."""
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
            self.cancel(job)

    def cancel(self, job: Job) -> None:
        """Drop a job's remaining tiles (no-op for a finished job)."""
        if not job.active:
            return
        self._retire(job)
        if not job.future.done():
            job.future.cancel()

    # ----- worker side -----------------------------------------------------------------------

    def _retire(self, job: Job) -> None:
        job.active = False
        self._queued_tiles -= job.outstanding
        self._active.discard(job)
        with contextlib.suppress(ValueError):
            self._ready.remove(job)
        if not self._active:
            self._idle.set()
        self._update_gauges()

    def _fail(self, job: Job, error: Exception) -> None:
        if not job.active:
            return
        self._retire(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _finish(self, job: Job) -> None:
        # The result is built while the job is still active: if finalising fails, the
        # batch's failure handler can still fail this job instead of leaving it hanging.
        now = time.monotonic()
        first = job.first_batch_at if job.first_batch_at is not None else now
        result = SegmentResult(
            mask=job.mask.finalize()[0],
            probabilities=job.probs.finalize() if job.probs is not None else None,
            tile_size=job.tile_size,
            tiles=job.total,
            batches=job.batches,
            queue_s=first - job.accepted_at,
            inference_s=now - first,
        )
        self._retire(job)
        if not job.future.done():
            job.future.set_result(result)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_tiles.set(self._queued_tiles)
            self.metrics.queue_images.set(len(self._active))

    async def _run(self) -> None:
        while True:
            batch: list[tuple[Job, Tile]] = []
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

    def _fail_batch(self, batch: list[tuple[Job, Tile]], error: Exception) -> None:
        jobs = list(dict.fromkeys(job for job, _ in batch))
        log.error(
            "a batch of %d tile(s) failed (%s: %s); failing %d request(s)",
            len(batch),
            type(error).__name__,
            error,
            len(jobs),
            exc_info=error,
        )
        if self.metrics is not None:
            self.metrics.worker_errors.inc()
        for job in jobs:
            self._fail(job, InferenceError(f"inference failed ({type(error).__name__})"))

    async def _next_batch(self) -> int:
        """Wait for work, then for the batch to fill or the oldest job's wait to run out;
        returns the tile size of the batch to form."""
        while True:
            if not self._ready:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._ready[0]
            size = head.tile_size
            available = sum(job.pending for job in self._ready if job.tile_size == size)
            wait = head.waiting_since + self.max_wait_s - time.monotonic()
            if available >= self._batch_limit or wait <= 0 or self.arriving == 0:
                return size
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), wait)

    def _pick(self, size: int, picks: list[tuple[Job, Tile]]) -> None:
        """Fill `picks` with up to the batch limit of tiles of one size, one per job per turn,
        oldest first (filled in place, so a failure midway knows whom it touched). Served
        jobs move to the back of the line; jobs with nothing left leave it."""
        eligible = [job for job in self._ready if job.tile_size == size]
        while eligible and len(picks) < self._batch_limit:
            for job in list(eligible):
                if len(picks) == self._batch_limit:
                    break
                picks.append((job, job.take()))
                if job.pending == 0:
                    eligible.remove(job)
        served = list(dict.fromkeys(job for job, _ in picks))
        served_set = set(served)
        now = time.monotonic()
        for job in served:
            job.batches += 1
            job.waiting_since = now
            if job.first_batch_at is None:
                job.first_batch_at = now
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - job.accepted_at)
        self._ready = deque(
            [job for job in self._ready if job not in served_set]
            + [job for job in served if job.pending > 0]
        )

    async def _process(self, picks: list[tuple[Job, Tile]]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        probs, masks = await loop.run_in_executor(self._executor, self._compute, picks)
        elapsed = time.monotonic() - start
        self._seconds_per_tile = 0.8 * self._seconds_per_tile + 0.2 * elapsed / len(picks)
        if self.metrics is not None:
            self.metrics.forward_passes.inc()
            self.metrics.tiles.inc(len(picks))
            self.metrics.batch_tiles.observe(len(picks))
            self.metrics.forward_seconds.observe(elapsed)
        for (job, tile), values, mask in zip(picks, probs, masks, strict=True):
            if not job.active:  # cancelled or timed out while its batch ran
                continue
            job.mask.aggregate(mask[None], tile)
            if job.probs is not None:
                job.probs.aggregate(values, tile)
            job.done += 1
            self._queued_tiles -= 1
            if job.done == job.total:
                self._finish(job)
        self._update_gauges()

    def _compute(self, picks: list[tuple[Job, Tile]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runs in the worker thread: cut and normalise the tiles, forward, threshold."""
        seg = self.segmenter
        batch = np.stack([seg.tile_input(job.plan, job.image, tile) for job, tile in picks])
        probs = self._forward_splitting(batch)
        return probs, [seg.to_mask(p) for p in probs]

    def _forward_splitting(self, batch: np.ndarray) -> np.ndarray:
        """Forward; on an out-of-memory error halve the batch limit (down to one tile) and
        run the batch in pieces of that size."""
        try:
            out = self.forward_fn(batch)
        except torch.OutOfMemoryError:
            n = len(batch)
            if n == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Plain int store from the worker thread; the event loop only reads it.
            self._batch_limit = max(1, min(self._batch_limit, n // 2))
            self._passes_since_oom = 0
            if self.metrics is not None:
                self.metrics.oom_splits.inc()
            log.warning(
                "out of memory on a batch of %d tiles; retrying %d at a time", n, self._batch_limit
            )
            # Read the limit on every step: an inner retry may have lowered it again.
            parts, start = [], 0
            while start < n:
                stop = start + self._batch_limit
                parts.append(self._forward_splitting(batch[start:stop]))
                start = stop
            return np.concatenate(parts)
        if self._batch_limit < self.max_batch_tiles:
            self._passes_since_oom += 1
            if self._passes_since_oom >= OOM_PROBE_PASSES:
                self._batch_limit = min(self.max_batch_tiles, self._batch_limit * 2)
                self._passes_since_oom = 0
        return out
