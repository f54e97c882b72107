"""Backoff for transient Makini failures: exponential, full jitter, bounded in attempts and time.

Only :class:`~rotator.errors.MakiniTransient` errors are retried, and never an ``ambiguous`` one
(a token-creating request Makini may have processed). A ``Retry-After`` longer than the jittered
delay wins. Time spent waiting is accounted for even when ``sleep`` does not really sleep (tests),
so the total budget holds either way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable

from rotator.errors import MakiniError, MakiniTransient
from rotator.settings import RetrySettings

Sleep = Callable[[float], Awaitable[None]]


class RetryBudget:
    """The retry state of one logical request."""

    def __init__(self, settings: RetrySettings, sleep: Sleep, rng: random.Random) -> None:
        self._settings = settings
        self._sleep = sleep
        self._rng = rng
        self._start = time.monotonic()
        self._unslept = 0.0  # waits the injected sleep did not spend in real time

    def elapsed_s(self) -> float:
        return time.monotonic() - self._start + self._unslept

    def delay_s(self, attempt: int, error: MakiniError) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up and raise."""
        if not isinstance(error, MakiniTransient) or error.ambiguous:
            return None
        if attempt >= self._settings.max_attempts:
            return None
        cap = min(self._settings.max_delay_s, self._settings.base_delay_s * 2 ** (attempt - 1))
        delay = self._rng.uniform(0, cap)
        if error.retry_after_s is not None:
            delay = max(delay, error.retry_after_s)
        if self.elapsed_s() + delay > self._settings.total_timeout_s:
            return None
        return delay

    async def wait(self, delay_s: float) -> None:
        before = time.monotonic()
        await self._sleep(delay_s)
        self._unslept += max(0.0, delay_s - (time.monotonic() - before))
