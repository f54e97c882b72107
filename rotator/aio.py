"""Waiting with a timeout, cancel-safe.

``asyncio.wait_for`` on Python 3.11 swallows a cancellation that arrives in the same loop
iteration as the awaited thing completes (python/cpython#86296, fixed in 3.12): it returns the
result instead of raising ``CancelledError``. A loop such as ``while True: await
wait_for(event.wait(), t)`` then never ends, and whoever cancelled it and awaits it waits for
ever; that is how ``serve`` hung at shutdown with its replica feed woken by a notification
at the moment of the cancel. ``asyncio.timeout`` has no such race, so waits go through here and
ruff bans ``asyncio.wait_for`` in the product (``TID251``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def woken(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` has passed: whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result, or ``TimeoutError`` after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        return await awaitable
