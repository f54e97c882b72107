"""A stop signal that arrives before its handler is ready is kept, not fatal.

A forked ``run-due`` worker opens its runtime before :class:`rotator.service.Stopper` installs
the drain's handlers. :func:`hold` keeps a SIGTERM passed on in that window; the Stopper
:func:`take` s it on entry and drains at once, so the share is parked, not lost.
"""

from __future__ import annotations

import signal
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
