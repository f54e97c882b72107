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
    help="The journal: its schema (which revision, migrating it) and pruning its history.",
    no_args_is_help=True,
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


@db_app.command("prune")
def db_prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete the journal's history older than journal.retention keeps it (audit entries,
    finished rotations and revokes, processed webhooks, closed unaccounted tokens, old reader
    records), in batches, to the end. Never an open rotation or revoke, what they need, or a
    credential's latest rotation. serve does this every journal.retention.interval and run-due
    at its end; this is for a first clean-up or to see what they would do."""
    from rotator.journal import retention

    cfg = command_config()
    keep = cfg.journal.retention
    with open_journal(cfg) as journal:
        result = retention.prune(
            journal,
            keep,
            active_window=cfg.api.readers.active_window,
            owner=retention.owner(),
            actor=actor(),
            dry_run=dry_run,
        )
    if json_out:
        render.print_json(result.as_dict())
        return
    if not keep.enabled:
        render.console.print(
            "journal.retention keeps everything (audit and rotations are \"forever\"): "
            "nothing to prune"
        )
        return
    verb = "would delete" if dry_run else "deleted"
    cut = result.as_dict()["before"]
    columns = [
        render.Column("table", whole=True),
        render.Column(f"rows {verb}", whole=True),
        render.Column("older than (UTC)", drop=1),
    ]
    older = {
        "audit": cut["audit"],
        "reader_reads": cut["reader_reads"],
    }
    cells = [
        [
            table,
            str(result.counts[table]),
            escape((older.get(table, cut["rotations"]) or "kept forever")[:19].replace("T", " ")),
        ]
        for table in retention.TABLES
    ]
    render.console.print(render.table(f"journal retention ({verb})", columns, cells))
    render.console.print(
        f"{verb} {result.total} rows in {result.seconds:.1f}s"
        + ("" if dry_run else f" ({result.batches} batches, longest {result.longest_batch_s:.3f}s)")
    )
