"""Waiting for an event (a lease given back or expired, a request inside Makini, a log line),
never for a guessed length of time. Each polls what it waits for and fails with what it was."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from rotator.journal import Journal

ISSUE_ROUTE = "POST /api/system/connections/{id}/token"
"""The simulator's route of a request for a connection token (``SimServer.inflight()``)."""


def wait_until(what: str, check: Any, timeout_s: float = 30.0, every_s: float = 0.05) -> Any:
    """Poll ``check()`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


async def until(what: str, check: Any, timeout_s: float = 30.0, every_s: float = 0.02) -> Any:
    """:func:`wait_until` in a coroutine (``check`` may be a coroutine function)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def highest(count: Callable[[], int], every_s: float = 0.01) -> AsyncIterator[list[int]]:
    """While the block runs, sample ``count()`` (in a thread) every ``every_s``; the list
    yielded holds the highest value seen once the block is over. A peak over a stretch of time
    has no event to wait for: it is sampled, as the journal's rows are what it counts."""
    peak = [0]

    async def watch() -> None:
        while True:
            peak[0] = max(peak[0], await asyncio.to_thread(count))
            await asyncio.sleep(every_s)

    watcher = asyncio.ensure_future(watch())
    try:
        yield peak
    finally:
        watcher.cancel()


def asked(rows: list[Any]) -> int:
    """How many of these rotation rows record a request for a token as sent (``asked_at``)."""
    return sum(r.asked_at is not None for r in rows)


def lease_free(journal_url: str, *names: str) -> bool:
    """No live holder has any of these credential leases (``env/name``): each was given back,
    or its holder stopped renewing it and it expired."""
    journal = Journal(journal_url, migrate="off")
    try:
        return all(journal.lock_holder(name) is None for name in names)
    finally:
        journal.close()


def issuing(sim: Any) -> bool:
    """Makini (the simulator) is answering a request for a connection token right now."""
    return any(r["route"] == ISSUE_ROUTE for r in sim.inflight())


def waiting_in(function: str) -> bool:
    """A thread of this process is inside ``function`` now (for example blocked on the lock it
    takes): how a test knows another thread reached the point it waits at."""
    for frame in sys._current_frames().values():
        at: Any = frame
        while at is not None:
            if at.f_code.co_name == function:
                return True
            at = at.f_back
    return False


def tasks_awaiting_in(function: str) -> int:
    """How many asyncio tasks of the running loop are suspended inside ``function`` (anywhere in
    their chain of awaits): how a test knows a task on its own loop reached the point it waits
    at, as :func:`waiting_in` does for threads."""
    count = 0
    for task in asyncio.all_tasks():
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None and frame.f_code.co_name == function:
                count += 1
                break
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return count
