"""The configuration file as every command first reads it: where it is, its TOML, and what the
process's variables put over it. The models of what it holds are :mod:`rotator.settings` (the
whole file) and :mod:`rotator.readconfig` (what reading a token needs of it).

Process-level settings come from the environment (``ROTATOR_CONFIG``, ``ROTATOR_JOURNAL_URL``,
``ROTATOR_LOG_FORMAT``, ``ROTATOR_LOG_LEVEL``): :meth:`ProcessSettings.from_environ`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from rotator.errors import ConfigError

ENV_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"


class ProcessSettings(BaseModel):
    """What the process takes from its environment rather than from the file. Four variables,
    read by :meth:`from_environ`: pydantic-settings, which did this before, cost every command
    about 0.2 s of imports (``rotator get`` runs in other teams' loops)."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = None
    journal_url: str | None = None
    log_level: str | None = None
    log_format: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProcessSettings:
        """``ROTATOR_CONFIG`` and the others (any case, as pydantic-settings read them)."""
        named = {
            key.lower(): value
            for key, value in (os.environ if environ is None else environ).items()
            if key.lower().startswith("rotator_")
        }
        return cls.model_validate(
            {f: named[f"rotator_{f}"] for f in cls.model_fields if f"rotator_{f}" in named}
        )


class LoggingSettings(BaseModel):
    """``[logging]``: read by every command before anything else it does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


def read_file(path: Path | str | None = None) -> tuple[Path, dict[str, Any]]:
    """The configuration file at ``path`` (or ``$ROTATOR_CONFIG``) and its data, with the
    process's variables (``ROTATOR_JOURNAL_URL``, ``ROTATOR_LOG_*``) put over the file's
    keys. Raises :class:`~rotator.errors.ConfigError` for a file that is not there, not
    readable or not TOML."""
    process = ProcessSettings.from_environ()
    chosen = Path(path) if path else process.config
    if chosen is None:
        raise ConfigError(
            "no configuration file given",
            hint="pass --config PATH or set ROTATOR_CONFIG (config/local.toml runs locally)",
        )
    try:
        text = chosen.read_text()
    except FileNotFoundError:
        raise ConfigError(
            "the configuration file does not exist",
            where=str(chosen),
            hint="check the path, or start from config/example.toml",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the configuration file: {exc.strerror}", where=str(chosen)
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"the configuration is not valid TOML: {exc}",
            where=str(chosen),
            hint="fix the syntax at the line and column named",
        ) from None
    if process.journal_url:
        data.setdefault("journal", {})["url"] = process.journal_url
    if process.log_level:
        data.setdefault("logging", {})["level"] = process.log_level.lower()
    if process.log_format:
        data.setdefault("logging", {})["format"] = process.log_format.lower()
    return chosen, data
