"""How the tests build what they run on, one way each: an environment's table (as it would be in
TOML), a whole configuration (parsed in this process, or the TOML text a ``rotator`` subprocess
reads), runtimes opened on a configuration and closed together at the end of a test, and a
token put straight into a primary backend."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rotator.clock import SYSTEM, Clock
from rotator.crypto import generate_key
from rotator.model import Secret, StoredVersion, TokenPair, new_version_id
from rotator.revoke import resume_held
from rotator.rotation.runtime import Runtime
from rotator.settings import Config, load_config, parse_config

DEFAULT_SCHEDULE = {"interval": "1h", "grace_period": "0s"}
"""Hourly, and no grace period: the old token is retired as soon as the new one is current."""
FAST_RETRY = {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05, "total_timeout_s": 5}
"""Makini retries for tests: quick, and few."""
SHORT_RETRY = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.05, "total_timeout_s": 2}
"""Makini retries for the ``rotator`` subprocess tests: a failure is seen within 2 s."""


def environment_table(
    sim_url: str,
    client_id: str,
    credentials: list[dict[str, Any]],
    *,
    sealing_env: str,
    secret_env: str,
    backends: list[dict[str, Any]] | None = None,
    makini: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = DEFAULT_SCHEDULE,
    retry: dict[str, Any] | None = FAST_RETRY,
) -> dict[str, Any]:
    """One environment's table, as it would be in TOML; the secrets are read from the named
    environment variables (``schedule=None``, ``retry=None``: the product's defaults)."""
    return {
        "sealing_key": {"env": sealing_env},
        "makini": {
            "base_url": sim_url,
            "client_id": client_id,
            "client_secret_env": secret_env,
            **({"retry": retry} if retry is not None else {}),
            **(makini or {}),
        },
        "backends": backends or [{"type": "memory", "namespace": uuid.uuid4().hex}],
        **({"schedule": schedule} if schedule is not None else {}),
        "credentials": credentials,
    }


def environment(
    sim_url: str,
    client_id: str,
    credentials: list[dict[str, Any]],
    *,
    backends: list[dict[str, Any]] | None = None,
    sealing_env: str,
    makini: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One environment's table for a runtime in this process: its sealing key and the
    simulator client's secret are set in this process's environment."""
    os.environ.setdefault(sealing_env, generate_key())
    secret_env = f"TEST_MAKINI_SECRET_{client_id.upper().replace('-', '_')}"
    os.environ[secret_env] = f"{client_id}-secret"
    return environment_table(
        sim_url,
        client_id,
        credentials,
        sealing_env=sealing_env,
        secret_env=secret_env,
        backends=backends,
        makini=makini,
        schedule=schedule or DEFAULT_SCHEDULE,
    )


def credentials(*names: str, connection: str = "conn-{name}") -> list[dict[str, Any]]:
    """Credential tables, each bound to the connection ``connection`` names."""
    return [{"name": n, "connection_id": connection.format(name=n)} for n in names]


def file_backend(path: str, key: str, name: str | None = None) -> dict[str, Any]:
    """A file backend table whose key file is generated on first use."""
    named = {"name": name} if name else {}
    return {"type": "file", **named, "path": path, "key": {"file": key, "generate": True}}


def config_data(
    journal: str | dict[str, Any], environments: dict[str, Any], **top: Any
) -> dict[str, Any]:
    """A whole configuration: ``journal`` is its URL or its table."""
    table = {"url": journal} if isinstance(journal, str) else journal
    return {"journal": table, **top, "environments": environments}


def make_config(
    tmp_path: Path, journal_url: str, environments: dict[str, Any], **top: Any
) -> Config:
    """The configuration, parsed as if read from ``tmp_path/rotator.toml`` (a ``journal``
    table in ``top`` replaces the one ``journal_url`` makes)."""
    data = {"journal": {"url": journal_url}, "environments": environments, **top}
    return parse_config(data, source=tmp_path / "rotator.toml")


def config_toml(journal: str | dict[str, Any], environments: dict[str, Any], **top: Any) -> str:
    """The configuration as the TOML file a ``rotator`` subprocess reads: a table per section
    (``[[...]]`` for lists of tables), one ``key = value`` per line."""
    return "\n".join(_toml_table(config_data(journal, environments, **top), []))


def _toml_table(table: dict[str, Any], path: list[str], array: bool = False) -> list[str]:
    lines = []
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value, False))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested.extend((key, item, True) for item in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    if array:
        lines.insert(0, f"\n[[{'.'.join(path)}]]")
    elif path and lines:  # a table holding only tables needs no header of its own
        lines.insert(0, f"\n[{'.'.join(path)}]")
    for key, value, is_item in nested:
        lines += _toml_table(value, [*path, key], is_item)
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


RuntimeFactory = Callable[..., Runtime]
"""The ``make_runtime`` fixture's type."""


class Runtimes:
    """Runtimes opened on configurations, closed together (the ``runtimes`` fixture)."""

    def __init__(self) -> None:
        self.opened: list[Runtime] = []

    def open(self, config: Config, *, clock: Clock = SYSTEM) -> Runtime:
        """The runtime of ``config``, as production opens it (held revokes resumed)."""
        runtime = Runtime.open(config, resume_revoke=resume_held, clock=clock)
        self.opened.append(runtime)
        return runtime

    async def aclose(self) -> None:
        for runtime in reversed(self.opened):
            await runtime.aclose()
        self.opened.clear()


def store_token(config: Path, environment: str, name: str, token: str) -> str:
    """Make ``token`` the current version of ``name`` in ``environment``'s primary backend, as
    the configuration file ``config`` names it, with no journal (the journal knows nothing of
    it); its version id."""
    import backends

    cfg = load_config(config)
    backend = backends.build(cfg.environment(environment).backend_settings[0], environment)
    try:
        version = StoredVersion(environment, name, new_version_id(), TokenPair(Secret(token)))
        backend.stage_pending(version)
        backend.promote(name, version.version_id)
    finally:
        backend.close()
    return version.version_id
