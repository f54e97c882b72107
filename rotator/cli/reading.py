"""``rotator status``, ``get``, ``plan`` and ``audit``: reading, changing nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli import render
from rotator.cli.context import (
    EnvArg,
    JsonOpt,
    NameArg,
    OneEnvArg,
    command_config,
    open_journal,
    primary_backend,
    run_command,
    with_runtime,
)
from rotator.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime
    from rotator.rotation.status import CredentialStatus


def status(
    environment: OneEnvArg = None,
    json_out: JsonOpt = False,
) -> None:
    """Each credential: current version, token age, expiry, next rotation, last outcome, and
    whether every backend holds the same current version."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)

    async def work(rt: Runtime) -> list[CredentialStatus]:
        from rotator.rotation.status import collect

        return await collect(rt, environment)

    rows = run_command(with_runtime(cfg, work, [environment] if environment else None))
    render.status(rows, json_out)
    if any(not r.healthy for r in rows):
        raise typer.Exit(3)


def get(
    environment: EnvArg,
    name: NameArg,
    previous: Annotated[bool, typer.Option("--previous", help="The previous version.")] = False,
    field: Annotated[
        str, typer.Option(metavar="FIELD", help="access_token, refresh_token or json.")
    ] = "access_token",
) -> None:
    """Print the current access token of a credential (for scripts). Reads the primary backend."""
    cfg = command_config()
    cfg.environment(environment).credential(name, environment)
    if field not in ("access_token", "refresh_token", "json"):
        raise ConfigError(
            f"unknown --field {field!r}", hint="use access_token, refresh_token or json"
        )

    from rotator.model import Stage

    with primary_backend(cfg, environment) as primary:
        version = primary.read(name, Stage.PREVIOUS if previous else Stage.CURRENT)
    if version is None:
        raise NotFound(
            f"{environment}/{name} has no {'previous' if previous else 'current'} token",
            where=f"primary backend of {environment}",
            hint=f"rotate it first: rotator rotate {environment} {name}",
        )
    if field == "access_token":
        typer.echo(version.tokens.access.reveal())
    elif field == "refresh_token":
        if version.tokens.refresh is None:
            raise NotFound(f"{environment}/{name} has no refresh token")
        typer.echo(version.tokens.refresh.reveal())
    else:
        typer.echo(version.to_json())


def plan(
    environment: OneEnvArg = None,
    json_out: JsonOpt = False,
) -> None:
    """What is due and what would happen, changing nothing."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)
    from rotator.clock import SYSTEM
    from rotator.rotation.schedule import plan as make_plan

    with open_journal(cfg) as journal:
        items = make_plan(
            cfg, journal, SYSTEM.now(), environments=[environment] if environment else None
        )
    render.plan(items, json_out)


def audit(
    environment: Annotated[
        str | None, typer.Option("--env", metavar="ENV", help="Only this environment.")
    ] = None,
    credential: Annotated[
        str | None, typer.Option("--credential", metavar="NAME", help="Only this credential.")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action", metavar="ACTION", help="Only this action (e.g. rotation.promoted)."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10000, metavar="N", help="At most N entries.")
    ] = 50,
    json_out: JsonOpt = False,
) -> None:
    """The audit log, newest first."""
    cfg = command_config()
    with open_journal(cfg) as journal:
        entries = journal.audit_entries(
            environment=environment, credential=credential, action=action, limit=limit
        )
    render.audit([e.as_dict() for e in entries], json_out)
