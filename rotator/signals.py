"""Signals a process handles for itself, outside the drain.

A stop signal that arrives before its handler is ready is kept, not fatal: a forked ``run-due``
worker opens its runtime before :class:`rotator.service.Stopper` installs the drain's handlers.
:func:`hold` keeps a SIGTERM passed on in that window; the Stopper :func:`take` s it on entry
and drains at once, so the share is parked, not lost.

SIGUSR1 (:func:`dump_on_usr1`) prints where the process waits, to stderr: every thread's stack
(faulthandler, at once, even if Python is stuck) and every asyncio task's (as soon as the main
thread runs Python). Function names and lines only, never a value.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from types import FrameType

_held: list[int] = []


def _keep(signum: int, _frame: FrameType | None) -> None:
    _held.append(signum)


def hold(*signals: signal.Signals) -> None:
    """Keep ``signals`` (SIGTERM if none named) until a Stopper takes them."""
    for sig in signals or (signal.SIGTERM,):
        signal.signal(sig, _keep)


def take() -> int | None:
    """The first signal held since the last call, if any."""
    if not _held:
        return None
    first = _held[0]
    _held.clear()
    return first


def dump_on_usr1() -> None:
    if not hasattr(signal, "SIGUSR1"):
        return
    signal.signal(signal.SIGUSR1, _dump_tasks)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)


def _dump_tasks(_signum: int, _frame: FrameType | None) -> None:
    asyncio = sys.modules.get("asyncio")  # not imported: no task to show (and none to import)
    try:
        loop = asyncio.get_running_loop() if asyncio is not None else None
    except RuntimeError:
        loop = None
    if asyncio is None or loop is None:
        return  # no loop in this thread: the threads' stacks say it all
    tasks = asyncio.all_tasks(loop)
    print(f"\nasyncio: {len(tasks)} tasks", file=sys.stderr)
    for task in tasks:
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()
