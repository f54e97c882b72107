"""``rotator config check``, ``keygen`` and ``import``: setting a deployment up."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli import render
from rotator.cli.context import (
    EnvArg,
    JsonOpt,
    NameArg,
    ReasonOpt,
    actor,
    command_config,
    run_command,
    state,
    with_runtime,
)
from rotator.cli.preflight import require_secrets
from rotator.clock import SYSTEM
from rotator.errors import ConfigError, RotatorError
from rotator.model import Secret, TokenPair

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime

config_app = typer.Typer(help="Validate the configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(
    path: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE", help="Default: --config / ROTATOR_CONFIG.", show_default=False
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate the configuration and say what is wrong, key by key."""
    from rotator.apart import inspect_keys
    from rotator.settings import load_config

    cfg = load_config(path or state.config_path)
    problems: list[str] = []
    for name, env in cfg.environments.items():
        try:
            env.makini.client_secret(f"environments.{name}.makini.client_secret_env")
        except RotatorError as exc:
            problems.append(
                f"{exc.where or name}: {exc.message}" + (f"; next: {exc.hint}" if exc.hint else "")
            )
    # every key that is here is loaded (none is created) and compared across environments;
    # one that is not here (a variable not set, no file) is a warning: the check may run
    # where the secrets are not
    keys = inspect_keys(cfg)
    problems += keys.absent + keys.loose
    errors = keys.shared + keys.broken
    summary = {
        "file": str(cfg.source),
        "journal": cfg.journal.url.split("://", 1)[0],
        "environments": {
            name: {
                "credentials": len(env.credentials),
                "backends": [b.display_name() + f" ({b.type})" for b in env.backend_settings],
            }
            for name, env in cfg.environments.items()
        },
        "warnings": problems,
        "errors": errors,
    }
    render.config_summary(summary, json_out)
    if errors:
        raise ConfigError(
            f"the configuration has {len(errors)} problem{'s' if len(errors) != 1 else ''} "
            "with its keys:\n" + "\n".join(f"  {line}" for line in errors),
            where=str(cfg.source),
            hint="fix the keys named above; `rotator config check` re-validates",
        )


def keygen() -> None:
    """Print a new random key (for a sealing key or a file backend key variable)."""
    from rotator.keyformat import generate_key

    typer.echo(generate_key())


def import_pair(
    environment: EnvArg,
    name: NameArg,
    reason: ReasonOpt = "bootstrap",
) -> None:
    """Store a token pair obtained outside the rotator (Makini Link) as the current version.
    Reads JSON {"access_token", "refresh_token", "expires_in"|"expires_at"} from stdin; the
    token is verified with Makini first."""
    cfg = command_config()
    cfg.environment(environment).credential(name, environment)
    require_secrets(cfg, [environment], what=f"import into {environment}")
    raw = sys.stdin.read()
    tokens = _parse_pair(raw)

    async def work(rt: Runtime) -> str:
        from rotator.rotation.importing import import_pair as store_pair

        return await store_pair(rt.engine, environment, name, tokens, actor=actor(), reason=reason)

    version = run_command(with_runtime(cfg, work, [environment]))
    render.console.print(f"imported {environment}/{name} as version {version}")


def _parse_pair(raw: str) -> TokenPair:
    try:
        doc = json.loads(raw)
        access = Secret(str(doc["access_token"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(
            "stdin is not a JSON object with an access_token",
            hint='pipe e.g. {"access_token": "...", "refresh_token": "...", "expires_in": 2592000}',
        ) from None
    refresh = doc.get("refresh_token")
    expires: datetime | None = None
    if isinstance(doc.get("expires_at"), str):
        expires = datetime.fromisoformat(doc["expires_at"])
    elif isinstance(doc.get("expires_in"), int | float):
        value = float(doc["expires_in"])
        expires = (
            datetime.fromtimestamp(value, UTC)
            if value > 1e9
            else SYSTEM.now() + timedelta(seconds=value)
        )
    return TokenPair(
        access=access, refresh=Secret(str(refresh)) if refresh else None, expires_at=expires
    )
