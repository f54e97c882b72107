"""Cancel-safe waits: a cancellation that arrives as the awaited thing completes is kept."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from rotator.aio import within, woken
from tests.wait import tasks_awaiting_in, until


async def cancelled_as_woken(wait: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    """Run ``wait`` in a loop, set its event and cancel it in the same loop iteration: whether
    the loop ended (the cancellation was kept) within 2 s."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait(event)
            event.clear()

    task = asyncio.ensure_future(loop())
    await until("the loop to wait on the event", lambda: tasks_awaiting_in("wait"))
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:
        task.cancel()  # the event is clear now: this one is kept
        await asyncio.wait({task})
    return bool(done)


async def test_woken_keeps_a_cancellation_that_arrives_as_the_event_is_set() -> None:
    assert await cancelled_as_woken(lambda e: woken(e, 60))


async def test_within_keeps_a_cancellation_that_arrives_as_the_awaitable_completes() -> None:
    assert await cancelled_as_woken(lambda e: within(e.wait(), 60))


async def test_asyncio_wait_for_loses_that_cancellation_before_python_3_12() -> None:
    """Why ``asyncio.wait_for`` is banned here (ruff TID251); on 3.11 it also proves that the
    race above is the real one (3.12 rewrote wait_for on asyncio.timeout)."""
    kept = await cancelled_as_woken(lambda e: asyncio.wait_for(e.wait(), 60))
    assert kept == (sys.version_info >= (3, 12))


async def test_woken_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert not await woken(event, 0.01)
    event.set()
    assert await woken(event, 60)


async def test_within_times_out() -> None:
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)
