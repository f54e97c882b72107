"""When a backend tries a call again: the one place that says what is retried, how often, how long.

Two kinds of error are tried again, each by one mechanism:

* **transient errors of the store** (throttling, 5xx, timeouts, a dropped connection) are retried
  by the vendor's SDK, configured here from each backend's settings: botocore's ``standard``
  mode (:func:`botocore_retries`, ``max_attempts``) and azure-core's ``RetryPolicy``
  (:func:`azure_retries`, ``retry_total``). Vault's hvac has no retry of its own and none is
  added: a step that fails is retried by the engine, from the journal. What still fails after
  the SDK's attempts surfaces as :class:`~rotator.errors.BackendUnavailable`.
* **a race the backend lost, or a wait for the store or a lock** is tried again with
  ``stamina`` under one of the policies below; the caller names the one exception that means
  "look again", and maps it to the project's error if the policy runs out.

The first try runs outside the retry machinery: the usual case, no race, costs nothing extra
(stamina is not even imported until a first try fails). A try again is logged at debug level
(``backends.retry``); stamina's own reporting (a warning per retry, a Prometheus counter in the
default registry) is replaced by that, for the process, when stamina is first used here:
stamina's hooks are process-wide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from stamina.instrumentation import RetryDetails

T = TypeVar("T")
Errors = type[Exception] | tuple[type[Exception], ...]

log = logging.getLogger("backends.retry")


def _report(details: RetryDetails) -> None:
    log.debug(
        "backend call tried again after %s (retry %d, waiting %.3f s)",
        type(details.caused_by).__name__, details.retry_num, details.wait_for,
    )


@cache
def _stamina() -> ModuleType:
    import stamina

    stamina.instrumentation.set_on_retry_hooks([_report])
    return stamina


@dataclass(frozen=True)
class Retry:
    """How often and how long to try a call again, and with what backoff between tries (an
    exponential from ``wait_initial_s`` up to ``wait_max_s``, plus up to ``wait_jitter_s``)."""

    attempts: int | None
    """Tries in all, the first included (None: bounded by ``timeout_s`` alone)."""
    timeout_s: float | None
    """Time for all the tries, from the first failure (None: bounded by ``attempts`` alone)."""
    wait_initial_s: float = 0.0
    wait_max_s: float = 0.0
    wait_jitter_s: float = 0.0

    def with_attempts(self, attempts: int) -> Retry:
        return replace(self, attempts=attempts)

    def with_timeout(self, timeout_s: float) -> Retry:
        return replace(self, timeout_s=timeout_s)

    def call(self, on: Errors, fn: Callable[[], T]) -> T:
        """``fn()``, tried again while it raises ``on``; the last ``on`` error propagates."""
        try:
            return fn()
        except on:
            if self.attempts == 1:
                raise
        caller = _stamina().RetryingCaller(
            attempts=None if self.attempts is None else self.attempts - 1,
            timeout=self.timeout_s,
            wait_initial=self.wait_initial_s,
            wait_max=self.wait_max_s,
            wait_jitter=self.wait_jitter_s,
        )
        result: T = caller.on(on)(fn)
        return result


CONFLICT = Retry(attempts=8, timeout_s=None)
"""Another writer changed what this call read (a check-and-set lost, a label moved): read again
and retry at once."""

LABEL_RACE = Retry(attempts=12, timeout_s=None, wait_initial_s=0.001, wait_max_s=0.02,
                   wait_jitter_s=0.005)
"""AWS staging labels moved by concurrent writers: retry on fresh state, after a short jittered
pause so that the writers fall out of step."""

SETTLING = Retry(attempts=None, timeout_s=30.0, wait_initial_s=0.02, wait_max_s=1.0)
"""The store finishes an operation in the background (Key Vault's delete before a purge):
poll, backing off up to a second; each backend sets the timeout from its settings."""

LOCK = Retry(attempts=None, timeout_s=30.0, wait_initial_s=0.0005, wait_max_s=0.02)
"""A lock another process holds (the file backend's per-credential ``flock``): poll, backing
off up to 20 ms; the backend sets the timeout from its settings."""


def botocore_retries(max_attempts: int) -> dict[str, Any]:
    """botocore's ``retries`` configuration: its ``standard`` mode (throttling, 5xx, timeouts and
    connection errors, exponential backoff with jitter), ``max_attempts`` tries in all."""
    return {"total_max_attempts": max_attempts, "mode": "standard"}


def azure_retries(retry_total: int) -> dict[str, Any]:
    """azure-core's ``RetryPolicy`` settings for a client: ``retry_total`` retries of
    throttling, 5xx, timeouts and connection errors (its own backoff, honouring Retry-After)."""
    return {"retry_total": retry_total}
