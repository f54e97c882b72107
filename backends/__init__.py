"""Secret backends, discovered through the ``rotator.backends`` entry-point group.

Registration is explicit (one entry point per backend in ``pyproject.toml``, or
:func:`register` for a backend no distribution installs, such as a test's fake); a duplicate
name is refused. A backend whose optional dependency is missing still registers, so that its
settings validate, and says why it cannot run when it is built.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from backends.base import Backend, BackendSettings, Capabilities
from rotator.errors import ConfigError

GROUP = "rotator.backends"

__all__ = [
    "Backend", "BackendSettings", "Capabilities", "build", "register", "registry", "unregister",
]

_registered: dict[str, type[Backend]] = {}


def registry() -> dict[str, type[Backend]]:
    """Every backend by kind: the installed entry points', then those :func:`register` added."""
    return {**_installed(), **_registered}


def register(cls: type[Backend]) -> None:
    """Add a backend that no entry point names; refused if its kind is taken already."""
    if cls.kind in registry():
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
def _installed() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found:
            raise ConfigError(
                f"two backends register the name {ep.name!r}",
                where=f"entry points {GROUP}",
                hint="uninstall one of the packages providing it",
            )
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Backend)) or cls.kind != ep.name:
            raise ConfigError(
                f"entry point {ep.name!r} does not name a Backend of kind {ep.name!r}",
                where=f"entry points {GROUP}: {ep.value}",
            )
        found[ep.name] = cls
    if not found:
        raise ConfigError(
            "no backend is registered",
            where=f"entry points {GROUP}",
            hint="install the package (pip install -e .) so its entry points exist",
        )
    return found


def build(settings: BackendSettings, environment: str) -> Backend:
    cls = registry()[settings.type]
    cls.available()
    return cls(settings, environment)
