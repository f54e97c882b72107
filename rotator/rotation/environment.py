"""One environment's live objects: its backends, its Makini client and its sealing key."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import Backend
from rotator.crypto import KeyRing
from rotator.errors import RotationError, RotatorError
from rotator.makini import MakiniClient
from rotator.settings import EnvironmentSettings


@dataclass
class EnvironmentRuntime:
    """Everything one environment needs at run time; built from its settings.

    The Makini client and the sealing key are only needed to rotate; where their secret is
    missing the runtime still serves reads (status, get) and raises the stored ConfigError,
    which names the missing variable, when a rotation touches them.
    """

    name: str
    settings: EnvironmentSettings
    backends: list[Backend]
    makini_client: MakiniClient | None = None
    sealing_keys: KeyRing | None = None
    missing: RotatorError | None = None

    @property
    def primary(self) -> Backend:
        return self.backends[0]

    @property
    def makini(self) -> MakiniClient:
        if self.makini_client is None:
            raise self.missing or RotationError(f"environment {self.name} has no Makini client")
        return self.makini_client

    @property
    def sealer(self) -> KeyRing:
        if self.sealing_keys is None:
            raise self.missing or RotationError(f"environment {self.name} has no sealing key")
        return self.sealing_keys
