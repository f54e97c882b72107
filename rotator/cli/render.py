"""Output for people (rich) and for scripts (JSON on stdout)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO, cast

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

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):  # the proxy's own state
            object.__setattr__(self, name, value)
        else:  # console.width = 80 sets the console's, as with a Console
            setattr(self.real(), name, value)

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


# --- tables that fit -------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column of a table made by :func:`table`."""

    header: str
    whole: bool = False
    """An id, a name or a time: printed whole on one line, never cut (what a person copies
    into the next command)."""
    drop: int = 0
    """0: always shown. Otherwise, when the table does not fit the width, the columns with the
    highest ``drop`` are left out first (and the caption says which)."""
    justify: Any = "left"


_WRAP_MIN = 10
"""The narrowest a free-text column is made (its words fold beyond that)."""


def _plain(cell: str) -> str:
    from rich.text import Text

    return Text.from_markup(cell).plain


def _need(col: Column, cells: Iterable[str]) -> int:
    """The width ``col`` needs: a whole column its longest cell (and header), a free-text one
    its longest word, up to ``_WRAP_MIN``."""
    plain = [_plain(c) for c in cells]
    if col.whole:
        return max([len(col.header), *(len(line) for c in plain for line in c.splitlines())])
    words = [len(w) for c in plain for w in c.split()]
    header = max(len(w) for w in col.header.split()) if col.header.split() else 1
    return max(header, min(max(words, default=1), _WRAP_MIN))


def _drop_to_fit(
    columns: Sequence[Column], keep: list[int], too_wide: Callable[[], bool]
) -> list[str]:
    """Leave out of ``keep`` the least useful columns (highest ``drop``; a column of ``drop`` 0
    always stays) until the table is not ``too_wide``; their headers."""
    dropped: list[str] = []
    while too_wide():
        candidates = [i for i in keep if columns[i].drop > 0]
        if not candidates:
            break
        worst = max(candidates, key=lambda i: (columns[i].drop, i))
        keep.remove(worst)
        dropped.append(columns[worst].header)
    return dropped


def table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = None,
    **options: Any,
) -> RichTable:
    """A rich table that fits ``width`` (the console's: 80 when piped, unless COLUMNS says
    otherwise) without cutting an id or a name: free text wraps, whole cells stay whole, and
    when that is not enough the least useful columns (highest ``drop``) are left out, named in
    the caption. Cells are rich markup."""
    width = width or console.width
    keep = list(range(len(columns)))
    needs = [_need(c, (r[i] for r in rows)) for i, c in enumerate(columns)]

    def total() -> int:  # cells, their padding (1 each side) and the n + 1 rules
        return sum(needs[i] for i in keep) + 3 * len(keep) + 1

    dropped = _drop_to_fit(columns, keep, lambda: total() > width)
    if dropped:
        options.setdefault(
            "caption",
            f"left out to fit {width} columns: {', '.join(dropped)} "
            "(a wider terminal or --json shows them)",
        )
    out = Table(title=title, **options)
    for i in keep:
        col = columns[i]
        if col.whole:
            out.add_column(
                col.header, no_wrap=True, min_width=needs[i], overflow="fold", justify=col.justify
            )
        else:
            out.add_column(col.header, overflow="fold", justify=col.justify)
    for row in rows:
        out.add_row(*(row[i] for i in keep))
    return out


def plain_table(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str]], *, width: int
) -> str:
    """The text of :func:`table` for many rows, without rich (whose table costs about 2 ms a
    row): plain cells (no markup), columns two spaces apart under a rule of dashes, fitted to
    ``width`` the same way: whole cells never cut, free text folded at word boundaries (a word
    longer than its column folds), the least useful columns left out first and named."""
    import textwrap

    keep = list(range(len(columns)))
    natural = [
        max([len(c.header), *(len(line) for r in rows for line in r[i].splitlines())])
        for i, c in enumerate(columns)
    ]
    needs = []
    for i, col in enumerate(columns):
        if col.whole:
            needs.append(natural[i])
            continue
        header = max((len(w) for w in col.header.split()), default=1)
        longest = max((len(w) for r in rows for w in r[i].split()), default=1)
        needs.append(max(header, min(longest, _WRAP_MIN)))

    def total(widths: Sequence[int]) -> int:
        return sum(widths[i] for i in keep) + 2 * (len(keep) - 1)

    dropped = _drop_to_fit(columns, keep, lambda: total(needs) > width)
    widths = list(needs)
    free = [i for i in keep if not columns[i].whole]
    spare = width - total(needs)
    # the free columns grow toward their natural width, the narrowest first, sharing the rest
    for n, i in enumerate(sorted(free, key=lambda i: natural[i])):
        grow = min(natural[i] - needs[i], max(0, spare) // (len(free) - n))
        widths[i] += grow
        spare -= grow

    def cell_lines(i: int, text: str) -> list[str]:
        if len(text) <= widths[i] and "\n" not in text:
            return [text]
        if columns[i].whole:
            return text.splitlines() or [""]
        return textwrap.wrap(text, widths[i], break_on_hyphens=False) or [""]

    def line(parts: Sequence[str]) -> str:
        out = []
        for i, part in zip(keep, parts, strict=True):
            out.append(
                part.rjust(widths[i]) if columns[i].justify == "right" else part.ljust(widths[i])
            )
        return "  ".join(out).rstrip()

    out = [title.center(total(widths)).rstrip()]
    out.append(line([columns[i].header for i in keep]))
    out.append(line(["-" * widths[i] for i in keep]))
    for row in rows:
        split = [cell_lines(i, row[i]) for i in keep]
        for k in range(max(len(c) for c in split)):
            out.append(line([c[k] if k < len(c) else "" for c in split]))
    if dropped:
        out += textwrap.wrap(
            f"left out to fit {width} columns: {', '.join(dropped)} "
            "(a wider terminal or --json shows them)",
            width,
        )
    return "\n".join(out) + "\n"


def short_versions(ids: Iterable[str | None], least: int = 8) -> Callable[[str | None], str]:
    """How the tables of one screen show version ids: the end of the id (a version id is
    time-ordered: its start is the time it was made, shared by versions made together; its
    end is random), ``least`` characters, more where two ids of the screen end alike. Every
    command that takes a version id accepts this form (:func:`expand_version`)."""
    known = {i for i in ids if i}
    ends: dict[int, dict[str, int]] = {}  # length → ending → how many known ids end so

    def others(vid: str, n: int) -> bool:
        """Whether a known id other than ``vid`` ends with its last ``n`` characters."""
        if n not in ends:
            counts: dict[str, int] = {}
            for o in known:
                if len(o) >= n:
                    counts[o[-n:]] = counts.get(o[-n:], 0) + 1
            ends[n] = counts
        return ends[n].get(vid[-n:], 0) > (1 if vid in known else 0)

    def show(vid: str | None) -> str:
        if not vid:
            return "-"
        n = min(least, len(vid))
        while n < len(vid) and others(vid, n):
            n += 1
        return vid[-n:]

    return show


def expand_version(given: str, known: Iterable[str]) -> str | None:
    """The full version id ``given`` names among ``known``: itself, or the one id it ends (or
    starts) with, as :func:`short_versions` shows it. ``None`` when it names none; raises
    ValueError naming the candidates when it names more than one."""
    ids = set(known)
    if given in ids:
        return given
    found = sorted(v for v in ids if v.endswith(given) or v.startswith(given))
    if len(found) > 1:
        raise ValueError(", ".join(found))
    return found[0] if found else None


# --- output ----------------------------------------------------------------------------------


def print_json(data: Any) -> None:
    """``data`` as JSON on stdout (for scripts): a list one item a line (10,000 credentials'
    rows are written by the json module's C encoder, which ``indent`` turns off, and each
    line stays greppable), anything else indented."""
    if isinstance(data, list) and data:
        rows = ",\n".join(f"  {json.dumps(item, default=str)}" for item in data)
        sys.stdout.write(f"[\n{rows}\n]\n")
    else:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def progress(
    quiet: bool, *, label: str = "rotating", total: int
) -> Iterator[Callable[[object], None] | None]:
    """A progress bar on stderr for many credentials, when a person is watching: yields a
    callback to call once per credential done (or None when there is no bar). ``total``: how
    many there are. Log lines written meanwhile print above the bar, never into it."""
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
    with bar, _logs_above():
        yield lambda _done: bar.advance(task)


@contextmanager
def _logs_above() -> Iterator[None]:
    """While the bar shows, send the log lines (structlog's and the standard library's, which
    were pointed at the real stderr when logs were set up) through the bar's console, which
    prints them above the bar."""
    import structlog
    from rich.file_proxy import FileProxy

    proxy = sys.stderr
    if not isinstance(proxy, FileProxy):  # the bar redirects stderr on a terminal only
        yield
        return
    into = cast(TextIO, proxy)
    factory = structlog.get_config()["logger_factory"]
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(into))
    streams = [
        (h, h.setStream(into))
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler)
    ]
    try:
        yield
    finally:
        structlog.configure(logger_factory=factory)
        for handler, stream in streams:
            if stream is not None:
                handler.setStream(stream)


_STYLE = {
    "rotated": "green",
    "retired": "green",
    "waiting": "cyan",
    "nothing": "dim",
    "busy": "yellow",
    "deferred": "yellow",
    "parked": "yellow",
    "rolled_back": "red",
    "failed": "bold red",
}


OUTCOME_MEANS = {
    "deferred": "stopped part-way (detail says why); the rotation stays open in the journal "
    "at its last step, and the next `rotator run-due` (or `rotator serve`) resumes it there",
    "parked": "stopped by a shutdown at its last journaled step; the next run resumes it",
    "busy": "another worker holds the credential's lease and carries on with it",
    "waiting": "the old version is in its grace period; it is retired once that ends",
    "rolled_back": "Makini rejected the new token: it was removed, the current one stays",
}
"""What an outcome a person may not know means, printed under a table that shows it."""


def _legend(outcomes: Iterable[str | None]) -> None:
    shown = {str(o) for o in outcomes if o}
    for outcome, means in OUTCOME_MEANS.items():
        if outcome in shown:
            console.print(f"[{_STYLE.get(outcome, '')}]{outcome}[/]: {escape(means)}")


def results(items: Sequence[RotationResult], as_json: bool) -> None:
    if as_json:
        print_json([r.as_dict() for r in items])
        return
    if not items:
        console.print("nothing is due")
        return
    short = short_versions(r.version_id for r in items)
    rows = []
    for r in sorted(items, key=lambda r: (r.environment, r.credential)):
        style = _STYLE.get(r.outcome, "")
        rows.append(
            [
                escape(r.environment),
                escape(r.credential),
                f"[{style}]{r.outcome}[/]",
                short(r.version_id),
                f"{r.duration_s:.2f}s",
                escape(r.error or r.detail or ""),
            ]
        )
    columns = [
        Column("environment", whole=True),
        Column("credential", whole=True),
        Column("outcome", whole=True),
        Column("version", whole=True),
        Column("time", whole=True, drop=1),
        Column("detail"),
    ]
    console.print(table("rotations", columns, rows))
    _legend(r.outcome for r in items)
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


STATUS_LISTS_UP_TO = 50
"""``rotator status`` lists every credential up to this many; beyond, the ones that need a look
(:func:`needs_a_look`) and a count of the rest, unless ``--all``."""

PLAIN_FROM = 200
"""A table of more rows than this is printed by :func:`plain_table`, not rich (about 2 ms a row
there: 20 s for 10,000)."""


def needs_a_look(r: CredentialStatus) -> bool:
    """Whether ``rotator status`` lists ``r`` when it lists only some: anything not healthy
    (exit code 3), anything it prints a note about (a last error, readers on an old version),
    an open rotation, and work due now."""
    return (
        not r.healthy
        or r.open_step is not None
        or r.next_action != "wait"
        or bool(r.stale_readers)
        or bool(r.last_error and r.last_outcome != "rotated")
    )


def _status_cells(
    r: CredentialStatus, now: datetime, short: Callable[[str | None], str], styled: bool
) -> list[str]:
    """One row of the status table: rich markup where ``styled``, else plain text."""
    esc = escape if styled else str

    def mark(text: str, style: str) -> str:
        return f"[{style}]{text}[/]" if styled else text

    agree = mark("agree", "green") if r.backends_agree else mark("DIFFER", "red")
    nxt = "now: " + r.next_action if r.next_action != "wait" else _until(r.next_at, now)
    last = esc(r.last_outcome or "-")
    if r.open_step:
        last += f" (open: {esc(r.open_step)})"
    if r.open_revoke:
        last += " " + mark(f"(REVOKE UNFINISHED: {esc(r.open_revoke)})", "bold red")
    return [
        esc(r.environment),
        esc(r.credential),
        short(r.current_version),
        _ago(r.rotated_at, now),
        _until(r.expires_at, now),
        nxt,
        last,
        f"{agree} ({len(r.backends)})",
    ]


def _not_listed(rows: Sequence[CredentialStatus], now: datetime) -> list[str]:
    """The lines that count the credentials a status table leaves out (healthy, nothing due),
    per environment: how many, their last outcomes, when the next of them is due."""
    by_env: dict[str, list[CredentialStatus]] = {}
    for r in rows:
        by_env.setdefault(r.environment, []).append(r)
    lines = [f"not listed (--all lists them): {len(rows):,} healthy, nothing due"]
    for env, quiet in by_env.items():
        outcomes: dict[str, int] = {}
        for r in quiet:
            outcomes[r.last_outcome or "-"] = outcomes.get(r.last_outcome or "-", 0) + 1
        told = ", ".join(f"{n:,} {o}" for o, n in sorted(outcomes.items(), key=lambda i: -i[1]))
        due = sorted(r.next_at for r in quiet if r.next_at is not None)
        first, last = (_until(due[0], now), _until(due[-1], now)) if due else ("", "")
        when = f"; next rotation in {first}" + (f" to {last}" if last != first else "")
        lines.append(f"  {env}: {len(quiet):,} ({told}){when if due else ''}")
    return lines


def status(rows: Sequence[CredentialStatus], as_json: bool, *, show_all: bool = False) -> None:
    """The status of ``rows``: JSON (every row), or a table. More than
    :data:`STATUS_LISTS_UP_TO` rows list only those that need a look, then count the rest,
    unless ``show_all``; a table of more than :data:`PLAIN_FROM` rows is plain text."""
    now = utcnow()
    if as_json:
        print_json([r.as_dict(now) for r in rows])
        return
    listed: Sequence[CredentialStatus] = rows
    quiet: list[CredentialStatus] = []
    if not show_all and len(rows) > STATUS_LISTS_UP_TO:
        listed = [r for r in rows if needs_a_look(r)]
        quiet = [r for r in rows if not needs_a_look(r)]
    ids: list[str | None] = []
    for r in listed:
        ids += [r.current_version, *r.backends.values(), *(v.version_id for v in r.stale_readers)]
    short = short_versions(v for v in ids if v and not v.startswith("error"))
    styled = len(listed) <= PLAIN_FROM
    cells = [_status_cells(r, now, short, styled) for r in listed]
    columns = [
        Column("env", whole=True),
        Column("credential", whole=True),
        Column("version", whole=True),
        Column("age", whole=True, drop=3),
        Column("expires in", drop=2),
        Column("next"),
        Column("last"),
        Column("backends", drop=1),
    ]
    if styled and listed:
        console.print(table("credentials", columns, cells))
    elif listed:
        console.file.write(plain_table("credentials", columns, cells, width=console.width))
    if quiet:
        for line in _not_listed(quiet, now):
            console.print(line, markup=False, highlight=False, soft_wrap=False)
    _legend(r.last_outcome for r in listed)
    for r in listed:
        where = f"{escape(r.environment)}/{escape(r.credential)}"
        if r.attention:
            err.print(f"[bold red]ATTENTION[/] {where}: {escape(r.attention)}")
        if r.stalled_lease:
            err.print(f"[bold red]STALLED[/] {where}: {escape(r.stalled_lease)}")
        if r.unaccounted:
            err.print(
                f"[bold red]UNACCOUNTED TOKENS[/] {where}: "
                f"{r.unaccounted} token(s) Makini may have issued that no backend holds (a "
                "request whose answer was lost); `rotator unaccounted list "
                f"{escape(r.environment)}` shows what, when and why, and what to do"
            )
        if r.open_revoke:
            err.print(
                f"[bold red]EMERGENCY REVOKE UNFINISHED[/] {where}: "
                f"stopped at {escape(r.open_revoke)}; `rotator revoke {escape(r.environment)} "
                f"{escape(r.credential)} --resume` finishes it"
            )
        elif r.last_error and r.last_outcome != "rotated":
            err.print(f"[yellow]last error[/] {where}: {escape(r.last_error)}")
        if r.stale_readers:
            who = ", ".join(f"{escape(v.name)} ({short(v.version_id)})" for v in r.stale_readers)
            err.print(f"[yellow]readers on an old version[/] {where}: {who}")
        if not r.backends_agree:
            held = ", ".join(
                f"{escape(k)}={escape(v) if v and v.startswith('error') else short(v)}"
                for k, v in r.backends.items()
            )
            err.print(
                f"[red]backends differ[/] {where}: journal says {short(r.current_version)}; {held}"
            )


def plan(items: Sequence[PlanItem], as_json: bool) -> None:
    if as_json:
        print_json([i.as_dict() for i in items])
        return
    now = utcnow()
    rows = []
    for i in items:
        when = "now" if i.is_due else _until(i.due_at, now)
        action = f"[bold]{escape(i.action)}[/]" if i.is_due else escape(i.action)
        rows.append(
            [
                escape(i.environment),
                escape(i.credential),
                action,
                when,
                escape(i.reason) + (" [red](urgent)[/]" if i.urgent else ""),
            ]
        )
    columns = [
        Column("env", whole=True),
        Column("credential", whole=True),
        Column("action", whole=True),
        Column("when", whole=True),
        Column("why"),
    ]
    console.print(table("plan (nothing is changed)", columns, rows))


def audit_reason(entry: dict[str, Any]) -> str:
    """Why an audit entry happened, as far as it says: its reason, else its error."""
    detail = entry.get("detail") or {}
    for key in ("reason", "error", "resolution", "attention"):
        value = detail.get(key)
        if value:
            return str(value)
    return ""


def audit(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(entries)
        return
    if not entries:
        console.print("no audit entries match")
        return
    rows = []
    for e in entries:
        target = "/".join(x for x in (e["environment"], e["credential"]) if x) or "-"
        at = str(e["at"])
        rows.append(
            [
                str(e["id"]),
                f"{at[:10]}\n{at[11:19]}",
                escape(e["actor"]),
                escape(e["action"]),
                escape(target),
                escape(e["outcome"]),
                escape(audit_reason(e)),
                (e["fingerprint"] or "")[:12],
            ]
        )
    columns = [
        Column("seq", whole=True, drop=4, justify="right"),
        Column("at (UTC)", whole=True),
        Column("actor", whole=True, drop=2),
        Column("action", whole=True),
        Column("target", whole=True),
        Column("outcome", whole=True, drop=3),
        Column("reason"),
        Column("token", whole=True, drop=5),
    ]
    console.print(table("audit log (newest first)", columns, rows))


def verify(environment: str, rows: Sequence[tuple[str, bool, str]], as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {"environment": environment, "credential": n, "ok": ok, "detail": d}
                for n, ok, d in rows
            ]
        )
        return
    cells = [
        [escape(n), "[green]ok[/]" if ok else "[red]FAILED[/]", escape(d)] for n, ok, d in rows
    ]
    columns = [Column("credential", whole=True), Column("result", whole=True), Column("detail")]
    console.print(table(f"verify {environment}", columns, cells))


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
