"""Read-only lookups of a revoke: which version is the target, read from whichever backend
answers (the primary first: a revoke must work when one backend is down)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from backends.base import Backend
from rotator.errors import BackendError
from rotator.model import Stage, StoredVersion


def first_readable(
    backends: Sequence[Backend], read: Callable[[Backend], StoredVersion | None]
) -> StoredVersion | None:
    """The first version a backend returns, primary first. Raises the first backend error only
    when no backend had it (the version may sit in the one that failed)."""
    error: BackendError | None = None
    for backend in backends:
        try:
            found = read(backend)
        except BackendError as exc:
            error = error or exc
            continue
        if found is not None:
            return found
    if error is not None:
        raise error
    return None


@dataclass(frozen=True)
class Target:
    current: StoredVersion | None
    version: StoredVersion | None
    stage: str | None
    """current | previous | other (a version id that holds no stage)"""
    missing: str = ""


def resolve_target(backends: Sequence[Backend], name: str, version: str | None) -> Target:
    """The version a revoke of ``name`` aims at: the current one (``None``/``"current"``), the
    previous one, or a version id."""
    current = first_readable(backends, lambda b: b.read(name, Stage.CURRENT))
    if version in (None, "current"):
        return Target(current, current, "current", "" if current else "no current version")
    if version == "previous":
        found = first_readable(backends, lambda b: b.read(name, Stage.PREVIOUS))
        missing = "no previous version (none, or already retired)"
    else:
        vid = str(version)
        found = first_readable(backends, lambda b: b.read_version(name, vid))
        missing = f"version {vid} is not readable in any backend (unknown or already purged)"
    if found is None:
        return Target(current, None, None, missing)
    if current is not None and found.version_id == current.version_id:
        stage = "current"
    elif version == "previous" or found.stage == Stage.PREVIOUS:
        stage = "previous"
    else:
        stage = "other"
    return Target(current, found, stage)


def read_by_id(backends: Sequence[Backend], name: str, version_id: str) -> StoredVersion | None:
    return first_readable(backends, lambda b: b.read_version(name, version_id))
