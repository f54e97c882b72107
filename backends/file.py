"""The local ``file`` backend (being written)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from backends.base import Backend, BackendSettings, Capabilities
from rotator.crypto import KeySource


class FileSettings(BackendSettings):
    type: Literal["file"] = "file"
    path: Path
    key: KeySource

    def resolve_paths(self, base: Path) -> FileSettings:
        path = self.path if self.path.is_absolute() else (base / self.path).resolve()
        return self.model_copy(update={"path": path, "key": self.key.resolve_paths(base)})

    def location(self, environment: str) -> str:
        return f"file://{self.path}"


class FileBackend(Backend):
    kind = "file"
    capabilities: ClassVar[Capabilities] = Capabilities(destroys=True, native_stages=False)
    Settings = FileSettings
