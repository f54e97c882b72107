"""``rotator keys``: create, list and revoke the keys services use to read tokens from the API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from rotator.cli.context import EnvArg, JsonOpt, actor, command_config, open_journal
from rotator.cli.render import escape
from rotator.errors import ConfigError

if TYPE_CHECKING:
    from rotator.journal import Journal
    from rotator.keys import KeyInfo
    from rotator.settings import Config

T = TypeVar("T")

keys_app = typer.Typer(
    help="Reader, admin and status keys of the HTTP API (stored hashed in the journal).",
    no_args_is_help=True,
)


def _with_journal(work: Callable[[Config, Journal], T]) -> T:
    cfg = command_config()
    with open_journal(cfg) as journal:
        return work(cfg, journal)


@keys_app.command("create")
def create(
    environment: EnvArg,
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="The service that will use the key.")
    ],
    credentials: Annotated[
        str | None,
        typer.Option(
            metavar="NAME,...", help="Comma-separated credentials it may read (default: all)."
        ),
    ] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin key (admin endpoints; reads no tokens).")
    ] = False,
    status: Annotated[
        bool, typer.Option("--status", help="A status key (opens the status page, nothing else).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a key and print it once: it is stored hashed and cannot be shown again."""
    from rotator.keys import create_key

    def work(cfg: Config, journal: Journal) -> tuple[KeyInfo, str]:
        env = cfg.environment(environment)
        names = None
        if credentials is not None:
            names = [c.strip() for c in credentials.split(",") if c.strip()]
            if not names:  # not "every credential": a typo must not widen a key
                raise ConfigError(
                    f"--credentials {credentials!r} names no credential",
                    where="rotator keys create",
                    hint="name at least one (--credentials a,b), or leave the option out for a "
                    "key that reads every credential of the environment",
                )
        if names:  # configured, or enrolled by discovery
            from rotator.rotation.discovery import known_credentials, unknown_error

            known = {c.name for c in env.credentials}
            if any(n not in known for n in names):
                env = known_credentials(journal, env, environment)
                known = {c.name for c in env.credentials}
                unknown = [n for n in names if n not in known]
                if unknown:
                    raise unknown_error(env, environment, unknown)
        return create_key(
            journal, environment, name, credentials=names, admin=admin, status=status, actor=actor()
        )

    info, key = _with_journal(work)
    if json_out:
        sys.stdout.write(json.dumps({**info.as_dict(), "key": key}, indent=2) + "\n")
        return
    from rotator.cli.render import console, err

    err.print(
        f"created {info.kind} key {info.key_id} '{escape(info.name)}' for environment "
        f"{info.environment}; store it now, it is not shown again:"
    )
    console.print(key, markup=False, highlight=False, soft_wrap=True)


@keys_app.command("list")
def list_command(
    environment: Annotated[
        str | None, typer.Option("--env", metavar="ENV", help="Only this environment.")
    ] = None,
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """The keys (never their secrets)."""
    from rotator.keys import list_keys

    keys = _with_journal(lambda _cfg, journal: list_keys(journal, environment))
    if not revoked:
        keys = [k for k in keys if k.revoked_at is None]
    if json_out:
        sys.stdout.write(json.dumps([k.as_dict() for k in keys], indent=2) + "\n")
        return
    from rotator.cli.render import Column, console, table

    rows = [
        [
            k.key_id,
            escape(k.name),
            k.environment,
            k.kind,
            escape(", ".join(sorted(k.credentials)) if k.credentials is not None else "all"),
            k.created_at.isoformat(sep=" ")[:16],
            k.revoked_at.isoformat(sep=" ")[:16] if k.revoked_at else "-",
        ]
        for k in keys
    ]
    columns = [
        Column("id", whole=True),
        Column("name", whole=True),
        Column("env", whole=True),
        Column("kind", whole=True, drop=1),
        Column("credentials"),
        Column("created (UTC)", whole=True, drop=3),
        Column("revoked (UTC)", whole=True, drop=2),
    ]
    console.print(table("API keys", columns, rows))


@keys_app.command("revoke")
def revoke(
    key: Annotated[
        str,
        typer.Argument(
            metavar="KEY", help="Key id (or name, when one live key has it).", show_default=False
        ),
    ],
    environment: Annotated[
        str | None, typer.Option("--env", metavar="ENV", help="Its environment.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Revoke a key: every API replica refuses it within a second."""
    from rotator.keys import revoke_key

    info = _with_journal(
        lambda _cfg, journal: revoke_key(journal, key, environment=environment, actor=actor())
    )
    if json_out:
        sys.stdout.write(json.dumps(info.as_dict(), indent=2) + "\n")
        return
    from rotator.cli.render import console

    console.print(f"revoked key {info.key_id} '{escape(info.name)}' of {info.environment}")
