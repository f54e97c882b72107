"""The clock every time-dependent part reads: passed in, so tests can move time instead of
sleeping through it.

``now()`` is wall-clock UTC (what the journal stores and compares: lease expiry, due dates,
retire times); ``monotonic()`` measures intervals inside one process (lease confirmations,
timeouts). ``SYSTEM`` is the real clock; tests pass ``tests.clock.FakeClock``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM: Clock = SystemClock()
