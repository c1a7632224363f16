"""A stop that arrives together with a wake-up still stops a worker loop (Python 3.11's
`asyncio.wait_for` loses such a cancellation; a job queued just as the service shut down
hung its shutdown)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from conftest import isbi_slice
from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner
from unet_service.serving.batcher import TileBatcher
from unet_service.serving.events import wait_event
from unet_service.serving.queued import ShuttingDownError

HANG_BOUND_S = 60  # against a hang only: a working stop takes milliseconds


@pytest.mark.anyio
async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0)
    event.set()
    assert await wait_event(event, 0)


@pytest.mark.anyio
async def test_a_cancel_in_the_same_iteration_as_the_wake_up_is_kept() -> None:
    event = asyncio.Event()
    rounds = 0

    async def worker() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            event.clear()
            await wait_event(event, 30)

    task = asyncio.ensure_future(worker())
    while rounds == 0:
        await asyncio.sleep(0)
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=HANG_BOUND_S)
    assert done, "the worker ignored its cancellation"
    assert task.cancelled()


def test_the_batcher_stops_when_work_arrives_with_the_stop(tiny_weights: Path) -> None:
    seg = Segmenter.from_weights(tiny_weights, device="cpu", backend="torch")
    image = isbi_slice(0)[:96, :96, None]
    jobs = []

    async def scenario() -> None:
        batcher = TileBatcher(BatchRunner(seg, 8), lambda: 8, max_wait_s=600, max_queue_tiles=99)
        batcher.start()
        with batcher.arriving():  # a request on its way: the worker waits for a fuller batch
            jobs.append(batcher.submit(seg.tiled(image)))
            for _ in range(100):  # the worker reaches its wait on the event loop alone
                await asyncio.sleep(0)
            jobs.append(batcher.submit(seg.tiled(image)))  # wakes the worker ...
            await batcher.stop()  # ... as the stop arrives

    # In a thread of its own, so that a stop that hangs fails the test instead of hanging it.
    errors: list[BaseException] = []
    thread = threading.Thread(
        target=lambda: errors.extend(run_catching(scenario)), daemon=True, name="scenario"
    )
    thread.start()
    thread.join(HANG_BOUND_S)
    assert not thread.is_alive(), "the batcher's stop hung: the worker lost its cancellation"
    assert not errors, errors
    for job in jobs:
        assert isinstance(job.future.exception(), ShuttingDownError)


def run_catching(scenario: Callable[[], Awaitable[None]]) -> list[BaseException]:
    try:
        asyncio.run(scenario())
    except BaseException as e:
        return [e]
    return []
