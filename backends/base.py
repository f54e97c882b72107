"""The backend interface: where versions of a credential are stored.

A backend is synchronous (the engine runs it in worker threads) and speaks only in
:class:`~rotator.model.StoredVersion`. Every method maps its vendor's exceptions to
:class:`~rotator.errors.BackendError` subclasses. Every write is idempotent: the engine retries
a step after a crash without knowing how far the previous attempt got.

Stage semantics every backend honours (the contract suite in ``tests/backends`` checks them):

* ``stage_pending(v)``: store ``v`` labelled pending. Writing the same version id again is a
  no-op; a different version that was pending loses the label.
* ``promote(cred, vid)``: ``vid`` becomes current, the old current becomes previous, the old
  previous loses its label but stays readable by id until made unreadable. Already current: no-op.
  Promoting a version the backend does not hold raises :class:`~rotator.errors.NotFound`.
* ``make_unreadable(cred, vid)``: the value can no longer be read (destroyed, disabled or
  deleted, per ``capabilities.destroys``). Unknown version: success.
* ``delete(cred)``: remove everything of the credential. Unknown credential: success.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from rotator.crypto import KeySource
from rotator.model import Stage, StoredVersion, VersionInfo
from rotator.places import Place

T = TypeVar("T")
R = TypeVar("R")

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the engine and the contract suite read these, never the kind."""

    destroys: bool
    """``make_unreadable`` removes the material for good (False: it is disabled, recoverable)."""
    native_stages: bool
    """Stages are the store's own labels (AWS staging labels) rather than our metadata."""
    persistent: bool = True
    """Survives a restart of the process (False for the in-memory fake)."""
    local: bool = False
    """Reads are served on this machine (a folder, memory), with no network round trip to
    wait on: reading many credentials in several threads only adds contention for the
    interpreter lock, so they are read in one."""


def read_many(
    tasks: Sequence[T], run: Callable[[T], R], *, local: Callable[[T], bool], workers: int
) -> list[R]:
    """``run`` over ``tasks``, the results in their order: the tasks that read remote backends
    in a pool of up to ``workers`` threads (each read waits on the network), those ``local``
    says read only local ones (:attr:`Capabilities.local`) in this thread meanwhile, where more
    threads would only contend for the interpreter lock."""
    found: dict[int, R] = {}
    pooled = [(i, task) for i, task in enumerate(tasks) if not local(task)]
    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(pooled)))) as pool:
        futures = [(i, pool.submit(run, task)) for i, task in pooled]
        for i, task in enumerate(tasks):
            if local(task):
                found[i] = run(task)
        for i, future in futures:
            found[i] = future.result()
    return [found[i] for i in range(len(tasks))]


class BackendSettings(BaseModel):
    """Settings common to every backend; each backend subclasses with ``type: Literal[...]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="Label in status and errors."
    )

    def resolve_paths(self, base: Path) -> BackendSettings:
        """Return a copy with relative paths made absolute against ``base`` (the config's dir)."""
        return self

    location_key: ClassVar[str] = "type"
    """The setting that most decides :meth:`place` (``path``, ``path_prefix``...): errors about
    two places that clash name it (``environments.dev.backends[0].path``)."""

    def location(self, environment: str) -> str:
        """Where this backend writes for ``environment``, as shown to people and in errors."""
        raise NotImplementedError

    def place(self, environment: str) -> Place:
        """The canonical form of :meth:`location`: the configuration refuses two environments
        whose places are the same or one inside the other. A backend that knows no better is
        compared by its location string."""
        return Place(f"{self.type} {self.location(environment)}")

    def key_sources(self) -> dict[str, KeySource]:
        """The keys this backend holds itself, by setting name (the file backend's ``key``):
        named in errors, and never shared with another environment."""
        return {}

    def display_name(self) -> str:
        return self.name or self.type


class Backend(ABC):
    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Settings: ClassVar[type[BackendSettings]]

    def __init__(self, settings: BackendSettings, environment: str) -> None:
        self.settings = settings
        self.environment = environment
        self.name = settings.display_name()
        self.location = settings.location(environment)

    @classmethod
    def available(cls) -> None:
        """Raise :class:`~rotator.errors.NotSupported` saying why this backend cannot run here
        (e.g. its optional dependency is not installed)."""
        return None

    @abstractmethod
    def stage_pending(self, version: StoredVersion) -> None: ...

    @abstractmethod
    def promote(self, credential: str, version_id: str) -> None: ...

    @abstractmethod
    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        """The version holding ``stage``, or ``None``."""

    def current_version_id(self, credential: str) -> str | None:
        """The id of the version holding the current stage, or ``None``: what ``status`` and
        the backends-agree check compare with the journal. A backend that can tell it without
        opening the token overrides this; by default the current version is read."""
        version = self.read(credential, Stage.CURRENT)
        return None if version is None else version.version_id

    @abstractmethod
    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        """A readable version by id (with its stage), or ``None``."""

    @abstractmethod
    def versions(self, credential: str) -> list[VersionInfo]:
        """Every version the backend still knows of, readable or not, oldest first."""

    @abstractmethod
    def make_unreadable(self, credential: str, version_id: str) -> None: ...

    @abstractmethod
    def delete(self, credential: str) -> None: ...

    @abstractmethod
    def credentials(self) -> list[str]:
        """Names of the credentials this backend holds for its environment."""

    @abstractmethod
    def check(self) -> None:
        """Raise a :class:`~rotator.errors.BackendError` unless reachable and usable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.location}>"
