"""Output for people (rich) and for scripts (JSON on stdout)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from rotator.model import utcnow

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable

    from rotator.rotation.schedule import PlanItem
    from rotator.rotation.status import CredentialStatus
    from rotator.rotation.work import RotationResult


class LazyConsole:
    """A rich Console made on first use: importing this module (every command does, ``--help``
    too) costs no terminal probing and no rich.console import."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def real(self) -> Console:
        """The Console itself (made now if it was not), for what needs the object: a
        Progress, a ``with`` block."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __enter__(self) -> Console:
        return self.real().__enter__()

    def __exit__(self, *exc: object) -> None:
        self.real().__exit__(*exc)


console = cast("Console", LazyConsole(highlight=False))
err = cast("Console", LazyConsole(stderr=True, highlight=False))


def escape(text: str) -> str:
    """rich's markup escape (rich.markup imported at first use, not by ``--help``)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def Table(*args: Any, **kwargs: Any) -> RichTable:
    """A rich Table (rich.table imported at first use, not by ``--help``)."""
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (for scripts)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def progress(
    quiet: bool, *, label: str = "rotating", total: int | None = None
) -> Iterator[Callable[[object], None] | None]:
    """A progress bar on stderr for many credentials, when a person is watching: yields a
    callback to call once per credential done (or None when there is no bar)."""
    if quiet or not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=cast("LazyConsole", err).real(),
        transient=True,
    )
    task = bar.add_task(label, total=total)
    with bar:
        yield lambda _done: bar.advance(task)


_STYLE = {
    "rotated": "green",
    "retired": "green",
    "waiting": "cyan",
    "nothing": "dim",
    "busy": "yellow",
    "deferred": "yellow",
    "rolled_back": "red",
    "failed": "bold red",
}


def results(items: Sequence[RotationResult], as_json: bool) -> None:
    if as_json:
        print_json([r.as_dict() for r in items])
        return
    if not items:
        console.print("nothing is due")
        return
    table = Table(title="rotations")
    for col in ("environment", "credential", "outcome", "version", "time", "detail"):
        table.add_column(col)
    for r in sorted(items, key=lambda r: (r.environment, r.credential)):
        style = _STYLE.get(r.outcome, "")
        table.add_row(
            r.environment,
            r.credential,
            f"[{style}]{r.outcome}[/]",
            (r.version_id or "-")[:13],
            f"{r.duration_s:.2f}s",
            r.error or "",
        )
    console.print(table)
    bad = [r for r in items if not r.ok]
    if bad:
        err.print(
            f"[red]{len(bad)} of {len(items)} did not complete[/]; the journal keeps "
            "them open: `rotator status` shows where each stopped, `rotator run-due` "
            "resumes"
        )


def _ago(moment: datetime | None, now: datetime) -> str:
    from rotator.rotation.schedule import human

    return human(now - moment) if moment else "-"


def _until(moment: datetime | None, now: datetime) -> str:
    from rotator.rotation.schedule import human

    return human(moment - now) if moment else "-"


def status(rows: Sequence[CredentialStatus], as_json: bool) -> None:
    now = utcnow()
    if as_json:
        print_json([r.as_dict(now) for r in rows])
        return
    table = Table(title="credentials")
    for col in ("env", "credential", "version", "age", "expires in", "next", "last", "backends"):
        table.add_column(col)
    for r in rows:
        agree = "[green]agree[/]" if r.backends_agree else "[red]DIFFER[/]"
        nxt = "now: " + r.next_action if r.next_action != "wait" else _until(r.next_at, now)
        last = r.last_outcome or "-"
        if r.open_step:
            last += f" (open: {r.open_step})"
        if r.open_revoke:
            last += f" [bold red](REVOKE UNFINISHED: {r.open_revoke})[/]"
        table.add_row(
            r.environment,
            r.credential,
            (r.current_version or "-")[:13],
            _ago(r.rotated_at, now),
            _until(r.expires_at, now),
            nxt,
            last,
            f"{agree} ({len(r.backends)})",
        )
    console.print(table)
    for r in rows:
        if r.attention:
            err.print(f"[bold red]ATTENTION[/] {r.environment}/{r.credential}: {r.attention}")
        if r.stalled_lease:
            err.print(f"[bold red]STALLED[/] {r.environment}/{r.credential}: {r.stalled_lease}")
        if r.unaccounted:
            err.print(
                f"[bold red]UNACCOUNTED TOKENS[/] {r.environment}/{r.credential}: "
                f"{r.unaccounted} token(s) Makini may have issued that no backend holds (a "
                "request whose answer was lost); `rotator unaccounted list "
                f"{r.environment}` shows what, when and why, and what to do"
            )
        if r.open_revoke:
            err.print(
                f"[bold red]EMERGENCY REVOKE UNFINISHED[/] {r.environment}/{r.credential}: "
                f"stopped at {r.open_revoke}; `rotator revoke {r.environment} {r.credential} "
                "--resume` finishes it"
            )
        elif r.last_error and r.last_outcome != "rotated":
            err.print(f"[yellow]last error[/] {r.environment}/{r.credential}: {r.last_error}")
        if r.stale_readers:
            who = ", ".join(f"{v.name} ({v.version_id[:13]})" for v in r.stale_readers)
            err.print(f"[yellow]readers on an old version[/] {r.environment}/{r.credential}: {who}")
        if not r.backends_agree:
            held = ", ".join(f"{k}={(v or 'none')[:13]}" for k, v in r.backends.items())
            err.print(
                f"[red]backends differ[/] {r.environment}/{r.credential}: journal says "
                f"{(r.current_version or 'none')[:13]}; {held}"
            )


def plan(items: Sequence[PlanItem], as_json: bool) -> None:
    if as_json:
        print_json([i.as_dict() for i in items])
        return
    now = utcnow()
    table = Table(title="plan (nothing is changed)")
    for col in ("env", "credential", "action", "when", "why"):
        table.add_column(col)
    for i in items:
        when = "now" if i.is_due else _until(i.due_at, now)
        action = f"[bold]{i.action}[/]" if i.is_due else i.action
        table.add_row(
            i.environment,
            i.credential,
            action,
            when,
            i.reason + (" [red](urgent)[/]" if i.urgent else ""),
        )
    console.print(table)


def audit(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(entries)
        return
    table = Table(title="audit log (newest first)")
    for col in ("at", "actor", "action", "target", "outcome", "token"):
        table.add_column(col)
    for e in entries:
        target = "/".join(x for x in (e["environment"], e["credential"]) if x)
        table.add_row(
            e["at"][:19],
            e["actor"],
            e["action"],
            target,
            e["outcome"],
            (e["fingerprint"] or "")[:12],
        )
    console.print(table)


def verify(environment: str, rows: Sequence[tuple[str, bool, str]], as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {"environment": environment, "credential": n, "ok": ok, "detail": d}
                for n, ok, d in rows
            ]
        )
        return
    table = Table(title=f"verify {environment}")
    for col in ("credential", "result", "detail"):
        table.add_column(col)
    for n, ok, d in rows:
        table.add_row(n, "[green]ok[/]" if ok else "[red]FAILED[/]", d)
    console.print(table)


def config_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    if summary.get("errors"):
        console.print(f"[red]configuration has problems[/]: {escape(summary['file'])}")
    else:
        console.print(f"[green]configuration is valid[/]: {escape(summary['file'])}")
    console.print(f"journal: {escape(summary['journal'])}")
    for name, env in summary["environments"].items():
        console.print(
            f"  {name}: {env['credentials']} credentials, backends {', '.join(env['backends'])}",
            markup=False,
        )
    for warning in summary["warnings"]:
        err.print(f"[yellow]warning[/] {escape(warning)}", soft_wrap=True)
