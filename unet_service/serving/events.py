"""Waiting for an asyncio event with a time limit, without losing a cancellation.

Python 3.11's `asyncio.wait_for` returns normally when the task waiting in it is cancelled
in the same loop iteration as the awaited event is set: the cancellation is lost. A worker
loop that waits for a wake-up that way can miss its stop, and whoever awaits the stopped
task then waits forever (a job queued just as the service shut down hung its shutdown).
`asyncio.timeout` keeps the cancellation."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True when `event` is set within `timeout` seconds, False when the time runs out;
    a cancellation of the caller always propagates."""
    try:
        async with asyncio.timeout(max(timeout, 0)):
            await event.wait()
    except TimeoutError:
        return False
    return True
