"""The keys of a configuration, loaded where they can be (``rotator config check``): which are
not here, which are there but are no key, which key files other users may read. No key value is
ever shown.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rotator.crypto import KeySource, KeyUnavailable, load_keys
from rotator.errors import ConfigError

if TYPE_CHECKING:
    from rotator.settings import Config, EnvironmentSettings


def named_keys(environments: Mapping[str, EnvironmentSettings]) -> Iterator[tuple[str, KeySource]]:
    """Every key of every environment (its sealing key, then its backends' own keys)."""
    for env_name, env in environments.items():
        yield env_name, env.sealing_key
        for backend in env.backend_settings:
            for source in backend.key_sources().values():
                yield env_name, source


@dataclass
class KeyInspection:
    """What :func:`inspect_keys` found."""

    broken: list[str] = field(default_factory=list)
    """Key material that is there but is no key (garbage, wrong length, a folder)."""
    absent: list[str] = field(default_factory=list)
    """Key material that is not here (a variable not set, no file, not readable by this user):
    a warning at config check, which may run where the secrets are not."""
    loose: list[str] = field(default_factory=list)
    """Key files other users may read or write."""


def inspect_keys(config: Config) -> KeyInspection:
    """Load every key that can be loaded (never creating one)."""
    found = KeyInspection()
    for _env_name, source in named_keys(config.environments):
        try:
            load_keys(source, create=False)
        except KeyUnavailable as exc:
            found.absent.append(_line(exc))
            continue
        except ConfigError as exc:
            found.broken.append(_line(exc))
            continue
        found.loose.extend(_loose(source))
    return found


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
