"""``rotator db`` (the journal's schema) and ``rotator unaccounted`` (tokens Makini may have
issued that no backend holds)."""

from __future__ import annotations

from typing import Annotated

import typer

from rotator.cli import render
from rotator.cli.context import (
    EnvArg,
    JsonOpt,
    OneEnvArg,
    actor,
    command_config,
    open_journal,
)
from rotator.cli.render import escape
from rotator.errors import ConfigError, NotFound

db_app = typer.Typer(
    help="The journal's schema: which revision it is at, and migrating it.", no_args_is_help=True
)
unaccounted_app = typer.Typer(
    help="Tokens Makini may have issued that no backend holds (a request whose answer was "
    "lost): list them, acknowledge them once dealt with.",
    no_args_is_help=True,
)


@db_app.command("current")
def db_current(json_out: JsonOpt = False) -> None:
    """The journal's schema revision and this release's; exits 1 unless they are the same."""
    from rotator.journal import Journal, migrate

    cfg = command_config()
    journal = Journal(cfg.journal.url, migrate="off")
    try:
        found = migrate.state(journal.engine, journal.where)
    finally:
        journal.close()
    if json_out:
        render.print_json(
            {
                "journal": journal.where,
                "revision": found.revision,
                "head": found.head,
                "current": found.current,
                "newer": found.newer,
            }
        )
    else:
        render.console.print(f"{escape(journal.where)}: {escape(found.describe())}")
        if not found.current and not found.newer:
            render.console.print("`rotator db upgrade` migrates it")
    if not found.current:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the journal to this release's schema (safe while other replicas run or start:
    one process migrates at a time, under a lock). Run it before a rollout when
    journal.migrate = "manual"."""
    from rotator.journal import Journal, migrate

    cfg = command_config()
    journal = Journal(cfg.journal.url, migrate="off")
    try:
        before, after = migrate.upgrade(journal.engine, journal.where, journal.migrate_lock)
    finally:
        journal.close()
    if before == after:
        render.console.print(f"{escape(journal.where)}: already at {after}, nothing to do")
    else:
        render.console.print(
            f"{escape(journal.where)}: migrated from {before or 'no revision'} to {after}"
        )


@unaccounted_app.command("list")
def unaccounted_list(
    environment: OneEnvArg = None,
    closed: Annotated[
        bool, typer.Option("--all", help="Also the resolved and acknowledged ones.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Tokens Makini may have issued that no backend holds: what was asked, when, for which
    connection, why the answer was lost, and until when such a token can live (an entry past
    that is resolved as expired first)."""
    from rotator.rotation import unaccounted

    cfg = command_config()
    if environment:
        cfg.environment(environment)
    with open_journal(cfg) as journal:
        unaccounted.expire(journal)
        rows = unaccounted.entries(journal, environment, include_closed=closed)
    if json_out:
        render.print_json([r.as_dict() for r in rows])
        return
    if not rows:
        render.console.print("no unaccounted tokens" + ("" if closed else " open"))
        return
    cells = [
        [
            str(r.id),
            escape(r.environment),
            escape(r.credential),
            escape(r.connection_id),
            r.asked_at.isoformat(sep=" ", timespec="seconds")[:19],
            r.live_until.isoformat(sep=" ", timespec="seconds")[:19] if r.live_until else "unknown",
            escape(r.status),
        ]
        for r in rows
    ]
    columns = [
        render.Column("id", whole=True),
        render.Column("env", whole=True),
        render.Column("credential", whole=True),
        render.Column("connection", whole=True, drop=1),
        render.Column("asked at (UTC)", drop=3),
        render.Column("live until (UTC)", drop=2),
        render.Column("status", whole=True),
    ]
    title = "tokens Makini may have issued that no backend holds"
    render.console.print(render.table(title, columns, cells))
    for r in rows:
        closed_how = "" if r.status == unaccounted.OPEN else f" ({r.status}: {r.resolution})"
        render.console.print(f"  {r.id}: {escape(r.cause + closed_how)}")
    if any(r.status == unaccounted.OPEN for r in rows):
        render.err.print(
            "each open one may be a live token of its connection that nobody holds. Where "
            "Makini kills older tokens on issue, the next rotation resolves it; otherwise it "
            "lives until it expires, or until the connection is disconnected in Makini. Once "
            "dealt with: `rotator unaccounted ack ENV ID... --reason TEXT` (docs/runbook.md)"
        )


@unaccounted_app.command("ack")
def unaccounted_ack(
    environment: EnvArg,
    ids: Annotated[
        list[int],
        typer.Argument(
            metavar="ID", help="Entry ids (`rotator unaccounted list`).", show_default=False
        ),
    ],
    reason: Annotated[
        str, typer.Option(metavar="TEXT", help="Why they are dealt with (required; audit log).")
    ] = "",
) -> None:
    """Acknowledge open entries once dealt with (audited with your name and the reason)."""
    from rotator.rotation import unaccounted

    cfg = command_config()
    cfg.environment(environment)
    if not reason.strip():
        raise ConfigError(
            "acknowledging needs a reason (it is written to the audit log)",
            hint='add --reason "disconnected in Makini, INC-1234"',
        )
    with open_journal(cfg) as journal:
        done = unaccounted.acknowledge(
            journal, environment, ids, actor=actor(), reason=reason.strip()[:500]
        )
    missing = sorted(set(ids) - set(done))
    for entry in done:
        render.console.print(f"acknowledged {entry}")
    if missing:
        raise NotFound(
            f"no open unaccounted token with id {', '.join(map(str, missing))} in {environment}",
            hint=f"`rotator unaccounted list {environment}` shows the open ones",
        )
