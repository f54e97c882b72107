"""``rotator status``, ``get``, ``plan`` and ``audit``: reading, changing nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

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
    reading_config,
    run_command,
    with_runtime,
)
from rotator.errors import ConfigError, NotFound

if TYPE_CHECKING:
    from rotator.journal import Journal
    from rotator.journal import audit as audit_log
    from rotator.rotation.runtime import Runtime
    from rotator.rotation.status import CredentialStatus


def status(
    environment: OneEnvArg = None,
    json_out: JsonOpt = False,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help="List every credential in the table. Without it, more than 50 list those "
            "that need a look (trouble, work due now) and count the healthy rest.",
        ),
    ] = False,
) -> None:
    """Each credential: current version, token age, expiry, next rotation, last outcome, and
    whether every backend holds the same current version. Exit code 3 when one is not
    healthy."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)
    from rotator.rotation.status import read_status

    # the journal and the backends alone; the whole runtime where the journal cannot be read
    # without it (PostgreSQL, a journal to create or migrate, an error to report)
    rows = read_status(cfg, environment)
    if rows is None:

        async def work(rt: Runtime) -> list[CredentialStatus]:
            from rotator.rotation.status import collect

            return await collect(rt, environment)

        rows = run_command(with_runtime(cfg, work, [environment] if environment else None))
    render.status(rows, json_out, show_all=show_all)
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
    if field not in ("access_token", "refresh_token", "json"):
        raise ConfigError(
            f"unknown --field {field!r}", hint="use access_token, refresh_token or json"
        )
    cfg = reading_config(environment, name)
    from rotator.model import Stage

    with primary_backend(cfg, environment) as primary:
        version = primary.read(name, Stage.PREVIOUS if previous else Stage.CURRENT)
    if version is None and previous:
        import asyncio

        async def why(rt: Runtime) -> str:  # the error path alone opens the journal
            return await asyncio.to_thread(no_previous, rt, environment, name)

        raise NotFound(
            f"{environment}/{name} has no previous token: "
            f"{run_command(with_runtime(command_config(), why, [environment]))}",
            where=f"primary backend of {environment}",
            hint=f"readers use the current token: rotator get {environment} {name}",
        )
    if version is None:
        raise NotFound(
            f"{environment}/{name} has no current token",
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


def no_previous(rt: Runtime, environment: str, name: str) -> str:
    """Why a credential has no previous version to read."""
    from rotator.model import Stage
    from rotator.rotation.schedule import human

    env = rt.config.environment(environment)
    cred = env.credential(name, environment)
    if rt.environments[environment].primary.read(name, Stage.CURRENT) is None:
        return "it has no token at all yet (`rotator rotate` gives it one)"
    last = rt.journal.last_rotation(environment, name)
    if env.makini.issue_invalidates_previous or (last is not None and last.invalidated_old):
        return (
            "Makini kills a connection's previous token when it issues a new one, so the "
            "previous version was retired at once (no grace period)"
        )
    grace = env.schedule_for(cred).grace_period
    if not grace:
        return (
            "the grace period is 0 (schedule.grace_period), so the previous version is retired "
            "as soon as the new one is promoted"
        )
    return (
        f"it was retired when its grace period ({human(grace)}) ended, or the credential has "
        "been rotated only once"
    )


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
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Entries at or after this time: ISO 8601 (2026-12-01, 2026-12-01T08:00Z; UTC "
            "unless it says) or a time ago (30m, 2h, 7d).",
            metavar="WHEN",
            show_default=False,
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="Entries at or before this time (as --since).",
            metavar="WHEN",
            show_default=False,
        ),
    ] = None,
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help="For a SIEM: every matching entry (no --limit) as one JSON object a line, "
            "oldest first, each with its sequence number (seq).",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="With --jsonl: append the lines to this file (created 0600) instead of stdout.",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    after: Annotated[
        int | None,
        typer.Option(
            "--after",
            min=0,
            help="With --jsonl: only entries after this seq.",
            metavar="SEQ",
            show_default=False,
        ),
    ] = None,
    cursor_file: Annotated[
        Path | None,
        typer.Option(
            "--cursor-file",
            help="With --jsonl: start after the seq this file holds (none: from the start) and "
            "write the last shipped seq to it after each batch; run it from cron to ship each "
            "entry once.",
            metavar="PATH",
            show_default=False,
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="With --jsonl: keep shipping new entries until stopped (Ctrl-C, SIGTERM).",
        ),
    ] = False,
) -> None:
    """The audit log, newest first; or, with --jsonl, every entry as JSON lines for a SIEM,
    resumable from a cursor."""
    from rotator.journal import audit as log

    cfg = command_config()
    if not jsonl and (output or after is not None or cursor_file or follow):
        raise ConfigError(
            "--output, --after, --cursor-file and --follow go with --jsonl",
            where="rotator audit",
            hint="add --jsonl (JSON lines, oldest first), or leave them out for the table",
        )
    from rotator.clock import SYSTEM

    now = SYSTEM.now()
    filters = log.Filters(
        environment=environment,
        credential=credential,
        action=action,
        since=when("--since", since, now),
        until=when("--until", until, now),
    )
    with open_journal(cfg) as journal:
        if environment or action:
            seen_envs, seen_actions = journal.audit_names()
            if environment and environment not in set(cfg.environments) | seen_envs:
                known = sorted(set(cfg.environments) | seen_envs)
                raise ConfigError(
                    f"unknown --env {environment!r}",
                    where="rotator audit",
                    hint=f"use one of {', '.join(known)}",
                )
            if action:
                log.check_action(action, seen_actions)
        if jsonl:
            ship_jsonl(journal, filters, output, after, cursor_file, follow=follow)
            return
        entries = journal.audit_entries(
            environment=environment,
            credential=credential,
            action=action,
            since=filters.since,
            until=filters.until,
            limit=limit,
        )
        rows = [log.line(e) for e in entries]
    render.audit([{"id": r.pop("seq"), **r} for r in rows], json_out)


def when(option: str, text: str | None, now: datetime) -> datetime | None:
    """``--since``/``--until``: an ISO 8601 time (UTC unless it says), or a time ago."""
    if text is None:
        return None
    from rotator.durations import parse_duration

    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        if isinstance(ago, timedelta) and ago >= timedelta(0):
            return now - ago
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text[:40]!r} is neither a time nor a time ago",
            where="rotator audit",
            hint=f"use an ISO 8601 time ({option} 2026-12-01T08:00Z) or a time ago "
            f"({option} 2h, 7d)",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def ship_jsonl(
    journal: Journal,
    filters: audit_log.Filters,
    output: Path | None,
    after: int | None,
    cursor_file: Path | None,
    *,
    follow: bool,
) -> None:
    """``rotator audit --jsonl``: the entries after the cursor, to stdout or appended to
    ``output``, the cursor moved after each batch; with ``follow``, again as entries come."""
    import os
    import signal
    import sys
    import threading

    from rotator.journal import audit as log

    cursor = log.Cursor(cursor_file) if cursor_file else None
    start = after if after is not None else (cursor.read() if cursor else 0)
    moved = cursor.write if cursor else (lambda _seq: None)
    stop = threading.Event()
    if follow:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    out: TextIO
    if output is None:
        out = sys.stdout
    else:
        # a shipper stopped after writing a batch and before moving its cursor: carry on
        # after what the file already holds, not after the cursor, so nothing is written twice
        start = max(start, log.last_shipped(output))
        try:
            fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the output file: {exc.strerror or type(exc).__name__}",
                where=str(output),
                hint="check that the folder exists and this user may write it",
            ) from exc
        out = os.fdopen(fd, "a")
    try:
        while True:
            start = log.ship(journal, out, filters, after=start, moved=moved)
            if not follow or stop.wait(FOLLOW_EVERY_S):
                break
    finally:
        if output is not None:
            out.close()


FOLLOW_EVERY_S = 2.0
"""How often ``audit --follow`` looks for new entries."""
