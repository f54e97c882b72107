"""Secret backends, discovered through the ``rotator.backends`` entry-point group.

Registration is explicit (one entry point per backend in ``pyproject.toml``, or
:func:`register` for a backend no distribution installs, such as a test's fake); a duplicate
name is refused. A backend whose optional dependency is missing still registers, so that its
settings validate, and says why it cannot run when it is built.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from backends.base import Backend, BackendSettings, Capabilities
from rotator.errors import ConfigError

GROUP = "rotator.backends"

__all__ = [
    "Backend", "BackendSettings", "Capabilities", "backend_class", "build", "kinds", "register",
    "registry", "unregister",
]

_registered: dict[str, type[Backend]] = {}


def kinds() -> list[str]:
    """Every backend's name, sorted, without importing any backend (for messages)."""
    return sorted({*_entry_points(), *_registered})


def registry() -> dict[str, type[Backend]]:
    """Every backend by kind: the installed entry points', then those :func:`register` added.
    Imports every backend's module; :func:`backend_class` imports one."""
    return {**{kind: _load(kind) for kind in _entry_points()}, **_registered}


def backend_class(kind: str) -> type[Backend]:
    """The backend named ``kind``, its module imported now (a command that reads a file
    backend does not import the cloud backends' modules). KeyError: no such backend."""
    if kind in _registered:
        return _registered[kind]
    if kind not in _entry_points():
        raise KeyError(kind)
    return _load(kind)


def register(cls: type[Backend]) -> None:
    """Add a backend that no entry point names; refused if its kind is taken already."""
    if cls.kind in kinds():
        raise ConfigError(
            f"two backends register the name {cls.kind!r}",
            where=f"backends.register({cls.__name__})",
            hint="unregister the other one first",
        )
    _registered[cls.kind] = cls


def unregister(kind: str) -> None:
    """Forget a backend :func:`register` added (no-op for any other kind)."""
    _registered.pop(kind, None)


@cache
def _entry_points() -> dict[str, EntryPoint]:
    """The installed backends' entry points by name (scanned once; nothing imported)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            raise ConfigError(
                f"two backends register the name {ep.name!r}",
                where=f"entry points {GROUP}",
                hint="uninstall one of the packages providing it",
            )
        found[ep.name] = ep
    if not found:
        raise ConfigError(
            "no backend is registered",
            where=f"entry points {GROUP}",
            hint="install the package (pip install -e .) so its entry points exist",
        )
    return found


@cache
def _load(kind: str) -> type[Backend]:
    ep = _entry_points()[kind]
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or cls.kind != ep.name:
        raise ConfigError(
            f"entry point {ep.name!r} does not name a Backend of kind {ep.name!r}",
            where=f"entry points {GROUP}: {ep.value}",
        )
    return cls


def build(settings: BackendSettings, environment: str) -> Backend:
    cls = backend_class(settings.type)
    cls.available()
    return cls(settings, environment)
