"""What the rotation core tells the layers above it, without knowing them.

Three channels: ``promoted`` (a version became current), ``revoked`` (an emergency revoke made a
version unreadable) and ``result`` (a drive ended). The serving layer subscribes (its cache, its
metrics); the core only publishes. A listener that raises is logged and the others still run:
a listener never stops a rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, ParamSpec

import structlog

if TYPE_CHECKING:
    from rotator.model import StoredVersion
    from rotator.rotation.work import RotationResult

log = structlog.get_logger("rotator.engine")
P = ParamSpec("P")


class Channel(Generic[P]):
    """One kind of event and the listeners subscribed to it."""

    def __init__(self, failure_event: str) -> None:
        self._failure_event = failure_event
        self._listeners: list[Callable[P, None]] = []

    def subscribe(self, listener: Callable[P, None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[P, None]) -> None:
        self._listeners.remove(listener)

    def publish(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for listener in list(self._listeners):
            try:
                listener(*args, **kwargs)
            except Exception:
                log.exception(self._failure_event)


class Events:
    """The core's events: ``promoted(environment, credential, version)``,
    ``revoked(environment, credential, version_id)``, ``result(result)``."""

    def __init__(self) -> None:
        self.promoted: Channel[[str, str, StoredVersion]] = Channel("listener.failed")
        self.revoked: Channel[[str, str, str]] = Channel("revoke_listener.failed")
        self.result: Channel[[RotationResult]] = Channel("result_listener.failed")
