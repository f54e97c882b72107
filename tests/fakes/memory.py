"""An in-memory backend: the reference fake for the contract suite, the tests' runtimes and the
benchmarks' lower bound. It keeps nothing across restarts (``capabilities.persistent`` is False).

Where the data lives is a :class:`MemoryStores` the backend is given: instances given the same
one, with the same ``namespace``, share their store, as two clients of one real store would; an
instance given none has a store of its own. For ``type = "memory"`` in a configuration, a test
registers :func:`backend_class` bound to its own stores (``tests/conftest.py`` does, for every
test): no two tests ever see each other's data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from backends.base import Backend, BackendSettings, Capabilities
from rotator.errors import BackendConflict, NotFound
from rotator.model import Stage, StoredVersion, VersionInfo
from rotator.places import Place


class MemorySettings(BackendSettings):
    type: Literal["memory"] = "memory"
    namespace: str = "default"

    def location(self, environment: str) -> str:
        return f"memory://{self.namespace}/{environment}"

    location_key: ClassVar[str] = "namespace"

    def place(self, environment: str) -> Place:
        return Place(f"memory {self.namespace}", (environment,))


@dataclass
class _Credential:
    versions: dict[str, StoredVersion | None] = field(default_factory=dict)
    readable: dict[str, bool] = field(default_factory=dict)
    stages: dict[Stage, str] = field(default_factory=dict)


class MemoryStores:
    """The stores of one test (or one benchmark), by location."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._stores: dict[str, dict[str, _Credential]] = {}

    def store(self, location: str) -> dict[str, _Credential]:
        with self.lock:
            return self._stores.setdefault(location, {})


class MemoryBackend(Backend):
    kind = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(
        destroys=True, native_stages=False, persistent=False, local=True
    )
    Settings = MemorySettings

    def __init__(
        self, settings: BackendSettings, environment: str, *, stores: MemoryStores | None = None
    ) -> None:
        super().__init__(settings, environment)
        self.stores = stores or MemoryStores()
        self._lock = self.stores.lock
        self._store = self.stores.store(self.location)

    def _cred(self, credential: str) -> _Credential:
        return self._store.setdefault(credential, _Credential())

    def stage_pending(self, version: StoredVersion) -> None:
        if version.environment != self.environment:
            raise BackendConflict(
                f"refusing to store a version of environment {version.environment!r}",
                backend=self.name,
                location=self.location,
            )
        with self._lock:
            cred = self._cred(version.credential)
            if version.version_id in cred.versions:
                return
            cred.versions[version.version_id] = version.with_stage(None)
            cred.readable[version.version_id] = True
            cred.stages[Stage.PENDING] = version.version_id

    def promote(self, credential: str, version_id: str) -> None:
        with self._lock:
            cred = self._cred(credential)
            if cred.stages.get(Stage.CURRENT) == version_id:
                return
            if not cred.readable.get(version_id):
                raise NotFound(
                    f"cannot promote version {version_id}: this backend does not hold it",
                    where=f"{self.location}/{credential}",
                )
            old = cred.stages.get(Stage.CURRENT)
            if old is not None:
                cred.stages[Stage.PREVIOUS] = old
            cred.stages[Stage.CURRENT] = version_id
            if cred.stages.get(Stage.PENDING) == version_id:
                del cred.stages[Stage.PENDING]

    def _stage_of(self, cred: _Credential, version_id: str) -> Stage | None:
        for stage, vid in cred.stages.items():
            if vid == version_id:
                return stage
        return None

    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        with self._lock:
            cred = self._store.get(credential)
            vid = cred.stages.get(stage) if cred else None
            return self.read_version(credential, vid) if vid else None

    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        with self._lock:
            cred = self._store.get(credential)
            if cred is None or not cred.readable.get(version_id):
                return None
            version = cred.versions[version_id]
            assert version is not None
            return version.with_stage(self._stage_of(cred, version_id))

    def versions(self, credential: str) -> list[VersionInfo]:
        with self._lock:
            cred = self._store.get(credential)
            if cred is None:
                return []
            return [
                VersionInfo(vid, self._stage_of(cred, vid), cred.readable[vid])
                for vid in cred.versions
            ]

    def make_unreadable(self, credential: str, version_id: str) -> None:
        with self._lock:
            cred = self._store.get(credential)
            if cred is None or version_id not in cred.versions:
                return
            cred.readable[version_id] = False
            cred.versions[version_id] = None  # destroy the material, keep the record
            for stage in [s for s, v in cred.stages.items() if v == version_id]:
                del cred.stages[stage]

    def delete(self, credential: str) -> None:
        with self._lock:
            self._store.pop(credential, None)

    def credentials(self) -> list[str]:
        with self._lock:
            return sorted(self._store)

    def check(self) -> None:
        return None


def backend_class(stores: MemoryStores) -> type[MemoryBackend]:
    """The memory backend as the registry builds it (``backends.build``), on ``stores``."""

    class BoundMemoryBackend(MemoryBackend):
        def __init__(self, settings: BackendSettings, environment: str) -> None:
            super().__init__(settings, environment, stores=stores)

    return BoundMemoryBackend
