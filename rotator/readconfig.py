"""What reading a token needs of the configuration, validated without the rest of it.

``rotator get`` is what other teams' scripts call in a loop, and validating the whole file
(schedules, Makini settings, notifications, discovery: most of the configuration's models) is
most of what it would pay. :func:`read_config` validates, with the same models and the same
checks as :func:`rotator.settings.load_config`, everything a read uses:

* every environment's backends and sealing key, paths resolved and keys named as a full load
  resolves and names them, and the environments kept apart
  (:func:`rotator.apart.storage_conflicts`): a read never crosses environments;
* ``[logging]``;
* the names of the credentials the file lists for the environment read.

It returns None for anything else: a key it uses that is missing or wrong, a credential the file
does not list (discovery may have enrolled it: the journal says), environments that are not kept
apart. The caller then loads the whole configuration, which reports the problem as every other
command reports it. The keys a read does not use are left to the commands that use them and to
``rotator config check``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backends import backend_class, kinds
from backends.base import BackendSettings
from rotator.apart import storage_conflicts
from rotator.configfile import ENV_NAME_PATTERN, LoggingSettings, read_file
from rotator.crypto import KeySource


def resolve_storage(
    name: str, backends: list[BackendSettings], sealing_key: KeySource, base: Path
) -> tuple[list[BackendSettings], KeySource]:
    """An environment's backends and sealing key with their paths made absolute against
    ``base`` and each key named with its key path and role, for the errors it may cause."""
    resolved = []
    for index, backend in enumerate(backends):
        backend = backend.resolve_paths(base)
        keys = {
            setting: source.named(
                f"environments.{name}.backends[{index}].{setting}",
                f"the {setting.replace('_', ' ')} of backend {backend.display_name()!r} of "
                f"environment {name!r}",
            )
            for setting, source in backend.key_sources().items()
        }
        resolved.append(backend.model_copy(update=keys) if keys else backend)
    sealing = sealing_key.resolve_paths(base).named(
        f"environments.{name}.sealing_key", f"the sealing key of environment {name!r}"
    )
    return resolved, sealing


@dataclass(frozen=True)
class Storage:
    """Where one environment keeps its tokens, and its sealing key."""

    sealing_key: KeySource
    backend_settings: list[BackendSettings]


@dataclass(frozen=True)
class ReadConfig:
    """What :func:`read_config` validated: enough to read ``environment``'s tokens."""

    source: Path
    environments: Mapping[str, Storage]
    environment: str
    credentials: frozenset[str]
    logging: LoggingSettings


def read_config(path: Path | None, environment: str) -> ReadConfig | None:
    """What reading ``environment``'s tokens needs of the configuration, or None when the whole
    configuration must be loaded (to read the token, or to say what is wrong). Raises what
    :func:`rotator.configfile.read_file` raises."""
    source, data = read_file(path)
    try:
        logging = LoggingSettings.model_validate(data.get("logging", {}))
        envs = data["environments"]
        known = set(kinds())
        environments = {
            name: _storage(name, env, known, source.resolve().parent)
            for name, env in envs.items()
        }
        credentials = frozenset(c["name"] for c in envs[environment].get("credentials", ()))
    except (ValidationError, LookupError, TypeError, AttributeError, ValueError):
        return None
    if storage_conflicts(environments):
        return None
    return ReadConfig(source, environments, environment, credentials, logging)


def _storage(name: str, env: dict[str, Any], known: set[str], base: Path) -> Storage:
    """One environment's storage, validated; ValueError (or what the models raise) when the
    whole configuration must say what is wrong."""
    if not re.fullmatch(ENV_NAME_PATTERN, name) or not env["backends"]:
        raise ValueError(name)
    backends: list[BackendSettings] = []
    for entry in env["backends"]:
        if entry["type"] not in known:
            raise ValueError(entry["type"])
        backends.append(backend_class(entry["type"]).Settings.model_validate(entry))
    if len({b.display_name() for b in backends}) != len(backends):
        raise ValueError(name)
    resolved, sealing = resolve_storage(
        name, backends, KeySource.model_validate(env["sealing_key"]), base
    )
    return Storage(sealing, resolved)
