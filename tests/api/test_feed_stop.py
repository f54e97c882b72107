"""A replica feed's notification listener never holds up a shutdown: psycopg can lose a
cancellation that arrives while it connects (psycopg#1345), and ``serve`` then never exited."""

from __future__ import annotations

import asyncio
import contextlib

from rotator.api import feed


async def test_a_listener_that_loses_its_cancellation_is_left_after_a_bounded_wait() -> None:
    release, running = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # as a lost cancellation does
                await release.wait()

    listener = asyncio.ensure_future(stubborn())
    await running.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await feed.stop_listener(listener)
    assert loop.time() - started < feed.LISTENER_STOP_S + 1
    assert not listener.done()  # left behind, not waited for
    release.set()
    await listener


async def test_a_listener_that_stops_is_waited_for() -> None:
    running = asyncio.Event()

    async def listening() -> None:
        running.set()
        await asyncio.Event().wait()

    listener = asyncio.ensure_future(listening())
    await running.wait()
    await feed.stop_listener(listener)
    assert listener.cancelled()
