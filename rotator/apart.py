"""Environments kept apart: no two share a place to store tokens or a key.

Places are compared in their canonical form (:mod:`rotator.places`): a dev backend reached
through ``..`` or a symbolic link to prod's folder, or a Vault prefix that is a parent of
prod's, is refused, as a mistake in one environment's configuration would otherwise break the
other. Keys are compared twice:

* by where they come from (:func:`storage_conflicts`, at load time, with nothing loaded): the
  same environment variable, the same key file (by its real path or, when it exists, its
  inode), or a key file inside another environment's backend folder;
* by what they are (:func:`inspect_keys`, at ``rotator config check`` and before a run writes
  anything): the SHA-256 of each key's bytes, so the same key in two files or two variables is
  found too. No key value, nor its fingerprint, is ever shown.

Key material may be shared within one environment (its sealing key and its file backends' keys
protect the same environment's tokens, and their associated data keep their blobs apart); it may
never be shared between two.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rotator.crypto import KeySource, KeyUnavailable, key_fingerprint, load_keys
from rotator.errors import ConfigError
from rotator.places import Place, file_place

if TYPE_CHECKING:
    from backends.base import BackendSettings

_WHY = "one environment could read or overwrite the other's tokens"


class Stores(Protocol):
    """One environment's places and keys (its settings, or what reading a token validated of
    them: :class:`rotator.readconfig.Storage`)."""

    @property
    def sealing_key(self) -> KeySource: ...

    @property
    def backend_settings(self) -> list[BackendSettings]: ...


class Environments(Protocol):
    """A configuration's environments (the whole one, or a reader's)."""

    @property
    def environments(self) -> Mapping[str, Stores]: ...

    @property
    def source(self) -> Path | None: ...


def named_keys(environments: Mapping[str, Stores]) -> Iterator[tuple[str, KeySource]]:
    """Every key of every environment (its sealing key, then its backends' own keys)."""
    for env_name, env in environments.items():
        yield env_name, env.sealing_key
        for backend in env.backend_settings:
            for source in backend.key_sources().values():
                yield env_name, source


def storage_conflicts(environments: Mapping[str, Stores]) -> list[str]:
    """What the configuration shares between environments, one sentence each (empty: nothing).

    ``environments`` have their paths resolved and their keys named (as the configuration
    holds them after loading)."""
    problems: list[str] = []
    seen: list[tuple[str, str, str, Place]] = []  # environment, key path, as written, place
    for env_name, env in environments.items():
        for index, backend in enumerate(env.backend_settings):
            key = f"environments.{env_name}.backends[{index}].{backend.location_key}"
            written = backend.location(env_name)
            place = backend.place(env_name)
            for other_env, other_key, other_written, other in seen:
                relation = place.relation(other)
                if relation is None or (relation != "same" and other_env == env_name):
                    continue
                problems.append(
                    _place_problem(
                        (env_name, key, written, place),
                        (other_env, other_key, other_written, other),
                        relation,
                    )
                )
            seen.append((env_name, key, written, place))
    problems.extend(_key_place_conflicts(environments, seen))
    return problems


def _place_problem(
    mine: tuple[str, str, str, Place], theirs: tuple[str, str, str, Place], relation: str
) -> str:
    env, key, written, place = mine
    other_env, other_key, other_written, other = theirs
    if relation == "same" and env == other_env:
        return (
            f"{other_key} and {key} are the same place ({place}): two backends of "
            f"environment {env!r} must be two places; remove one or point it elsewhere"
        )
    if relation == "same":
        return (
            f"environments {other_env!r} and {env!r} share the backend location {place}: "
            f"{other_key} ({other_written}) and {key} ({written}) are the same place, and "
            f"{_WHY}; give each environment a place of its own"
        )
    inner, outer = ((key, written, place), (other_key, other_written, other))
    if relation == "contains":
        inner, outer = outer, inner
    return (
        f"environments {other_env!r} and {env!r} overlap: {inner[0]} ({inner[1]}) is inside "
        f"{outer[0]} ({outer[1]}), and {_WHY}; give each environment a place of its own, "
        "outside the other's"
    )


def _key_place_conflicts(
    environments: Mapping[str, Stores], backends: list[tuple[str, str, str, Place]]
) -> list[str]:
    problems: list[str] = []
    seen: list[tuple[str, KeySource, str | Place]] = []
    for env_name, source in named_keys(environments):
        place: str | Place = (
            f"env {source.env}" if source.file is None else file_place(source.file)
        )
        for other_env, other, other_place in seen:
            if other_env == env_name:
                continue
            if isinstance(place, Place) and isinstance(other_place, Place):
                same = place.relation(other_place) == "same"
            else:
                same = place == other_place
            if same:
                what = (
                    "the sealing key"
                    if source.key_path.endswith("sealing_key")
                    and other.key_path.endswith("sealing_key")
                    else "a key"
                )
                problems.append(
                    f"environments {other_env!r} and {env_name!r} share {what}: "
                    f"{other.key_path} and {source.key_path} are both the "
                    f"{source.describe()}; give each environment its own key "
                    "(`rotator keygen` makes one)"
                )
        if isinstance(place, Place):
            for backend_env, backend_key, backend_written, backend_place in backends:
                if backend_env != env_name and place.relation(backend_place) in ("same", "inside"):
                    problems.append(
                        f"{source.key_path} ({source.describe()}) is inside {backend_key} "
                        f"({backend_written}), the storage of environment {backend_env!r}: "
                        f"keep each environment's keys out of the other's storage"
                    )
        seen.append((env_name, source, place))
    return problems


@dataclass
class KeyInspection:
    """What :func:`inspect_keys` found."""

    shared: list[str] = field(default_factory=list)
    """Two environments hold the same key: refused at config check and before a run."""
    broken: list[str] = field(default_factory=list)
    """Key material that is there but is no key (garbage, wrong length, a folder)."""
    absent: list[str] = field(default_factory=list)
    """Key material that is not here (a variable not set, no file, not readable by this user):
    a warning at config check, which may run where the secrets are not."""
    loose: list[str] = field(default_factory=list)
    """Key files other users may read or write."""


def inspect_keys(config: Environments) -> KeyInspection:
    """Load every key that can be loaded (never creating one), and compare them by fingerprint
    across environments."""
    found = KeyInspection()
    owners: dict[str, tuple[str, KeySource]] = {}
    reported: set[tuple[str, str]] = set()
    for env_name, source in named_keys(config.environments):
        try:
            keys = load_keys(source, create=False)
        except KeyUnavailable as exc:
            found.absent.append(_line(exc))
            continue
        except ConfigError as exc:
            found.broken.append(_line(exc))
            continue
        found.loose.extend(_loose(source))
        for key in keys:
            fingerprint = key_fingerprint(key)
            owner = owners.setdefault(fingerprint, (env_name, source))
            pair = (owner[1].key_path, source.key_path)
            if owner[0] != env_name and pair not in reported:
                reported.add(pair)
                found.shared.append(
                    f"environments {owner[0]!r} and {env_name!r} hold the same key: "
                    f"{owner[1].where()} and {source.where()}; give each environment its own "
                    f"key (`rotator keygen` makes one) and keep the old one only where it "
                    "sealed something"
                )
    return found


def refuse_shared_keys(config: Environments) -> None:
    """Raise :class:`~rotator.errors.ConfigError` when two environments hold the same key (the
    keys that cannot be loaded here are left to whoever loads them)."""
    shared = inspect_keys(config).shared
    if shared:
        raise ConfigError(
            "environments share key material:\n" + "\n".join(f"  {line}" for line in shared),
            where=str(config.source or "configuration"),
            hint="give each environment its own keys, then run again; nothing was written",
        )


def _line(exc: ConfigError) -> str:
    text = f"{exc.where}: {exc.message}" if exc.where else exc.message
    return text + (f"; next: {exc.hint}" if exc.hint else "")


def _loose(source: KeySource) -> list[str]:
    if source.file is None:
        return []
    try:
        mode = stat.S_IMODE(os.stat(source.file).st_mode)
    except OSError:
        return []
    if not mode & 0o077:
        return []
    return [
        f"{source.where()}: other users may read or change {source.role} (mode {mode:04o}); "
        f"next: chmod 600 {source.file}"
    ]
