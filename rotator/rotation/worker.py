"""Where the engine and the revoke run blocking work, off the event loop.

Two kinds of work, named by what they touch:

* :meth:`Worker.call`: anything blocking (a backend call), on the worker threads;
* :meth:`Worker.journal`: a function that touches nothing but the journal; :meth:`Worker.read`:
  a quick read-only look at it (a lease, a row).

How journal work runs is this module's business alone: on SQLite it joins the journal writer's
current batch (no worker thread in between), and quick reads run inline, where reading the local
file costs less than handing the call to a thread; on other databases both run on a worker
thread, each write a transaction of its own.

A cancelled call still waits for its thread's call to return: nothing a drive started outside
the process runs on once the drive has stopped (and its lease may be given back).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rotator.journal import Journal

T = TypeVar("T")
B = TypeVar("B")


class Worker:
    def __init__(self, journal: Journal, *, threads: int) -> None:
        self._store = journal
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rotator-io")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work on a worker thread; cancelled, it waits for the call to return."""
        call = functools.partial(fn, *args, **kwargs)
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    async def journal(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a function that touches nothing but the journal; its result once durable."""
        call = functools.partial(fn, *args, **kwargs)
        future = self._store.submit_async(call)
        if future is None:
            return await self.call(call)
        return await future

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A quick read-only look at the journal (a lease, a row)."""
        if self._store.is_sqlite:
            return fn(*args)
        return await self.call(fn, *args)

    async def each(self, items: Sequence[B], fn: Callable[[B], T]) -> list[T]:
        """Run ``fn`` on every item (every backend of an environment) at once; raise the first
        error after all have finished."""
        results = await asyncio.gather(*(self.call(fn, i) for i in items), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Wait for the calls in progress, then stop the threads."""
        self._executor.shutdown(wait=True)
