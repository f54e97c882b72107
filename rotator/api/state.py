"""What the API's routes share: the runtime and the objects built around it for serving."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rotator.api.cache import TokenCache
from rotator.keys import KeyIndex
from rotator.metrics import Metrics
from rotator.readers import ReadRecorder

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime
    from rotator.settings import ApiSettings


@dataclass
class ApiState:
    runtime: Runtime
    keys: KeyIndex
    cache: TokenCache
    reads: ReadRecorder
    metrics: Metrics
    webhook_wake: asyncio.Event = field(default_factory=asyncio.Event)
    credentials: dict[str, frozenset[str]] = field(default_factory=dict)
    """credential names per served environment"""

    @classmethod
    def build(cls, runtime: Runtime) -> ApiState:
        settings = runtime.config.api
        state = cls(
            runtime=runtime,
            keys=KeyIndex(),
            cache=TokenCache(runtime, max_age_s=settings.cache_max_age.total_seconds()),
            reads=ReadRecorder(),
            metrics=Metrics(runtime.config, runtime.journal),
        )
        state.credentials = {
            env: frozenset(c.name for c in rt.settings.credentials)
            for env, rt in runtime.environments.items()
        }
        state.cache.on_backend_error = lambda env, backend: state.metrics.backend_errors.labels(
            env, backend
        ).inc()
        return state

    @property
    def settings(self) -> ApiSettings:
        return self.runtime.config.api

    def env_label(self, env: str) -> str:
        """An environment as a metric label: only served ones (bounded cardinality)."""
        return env if env in self.credentials else "-"
