"""The audit log as its readers see it: the actions it records, and shipping it as JSON lines.

Each entry has a sequence number (the ``audit`` table's ``id``), the cursor of a shipper: a
shipper writes the entries after its cursor, then moves the cursor past them, one batch at a
time, and only ever up to :meth:`~rotator.journal.Journal.audit_settled` (below which no entry
can still appear), so that a cron job that runs it again ships each entry once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rotator.errors import ConfigError
from rotator.scrub import mask

if TYPE_CHECKING:
    from rotator.journal.schema import AuditEntry
    from rotator.journal.store import Journal

ACTIONS = frozenset(
    {
        "api.revoke",
        "api.rotate",
        "backend.synced",
        "credential.imported",
        "discovery.enrolled",
        "discovery.offboarded",
        "discovery.purged",
        "journal.pruned",
        "key.created",
        "key.revoked",
        "revoke.adopted",
        "revoke.completed",
        "revoke.killed",
        "revoke.late_token_adopted",
        "revoke.purged",
        "revoke.replaced",
        "revoke.replacement_rejected",
        "revoke.started",
        "revoke.stopped",
        "revoke.token_accounted",
        "revoke.token_issued",
        "rotation.failed",
        "rotation.grace_ended",
        "rotation.promoted",
        "rotation.retired",
        "rotation.rolled_back",
        "rotation.started",
        "rotation.superseded",
        "token.unaccounted",
        "token.unaccounted_acknowledged",
        "token.unaccounted_resolved",
        "webhook.attention",
    }
)
"""Every action this release writes to the audit log (a test checks the code against it)."""

BATCH = 500
"""Entries per batch: the cursor moves after each."""


def families(actions: Iterable[str]) -> set[str]:
    """The families of ``actions`` (``rotation`` for ``rotation.promoted``)."""
    return {a.split(".", 1)[0] for a in actions}


def check_action(action: str, seen: Iterable[str]) -> None:
    """Raise ConfigError, naming the known actions, unless ``action`` is an action or a family
    (``rotation``, ``rotation.*``) this release writes or the log holds (``seen``)."""
    known = ACTIONS | set(seen)
    if action in known or action.removesuffix(".*") in families(known):
        return
    raise ConfigError(
        f"unknown --action {action!r}",
        where="rotator audit",
        hint=f"use one of {', '.join(sorted(known))}; or a family: "
        f"{', '.join(sorted(families(known)))}",
    )


def line(entry: AuditEntry) -> dict[str, Any]:
    """One entry as a JSON line: its sequence number first, text a person typed (a reason, an
    error) masked as the logs mask it (someone may have pasted a token into it)."""
    data = entry.as_dict()
    data["detail"] = _masked(data["detail"])
    return {"seq": data.pop("id"), **data}


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


@dataclass(frozen=True)
class Filters:
    environment: str | None = None
    credential: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class Cursor:
    """The sequence number of the last entry shipped, kept in a file (written whole, then
    renamed over the old one: a crash leaves the old cursor or the new one, never half)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _file_error("read the cursor file", self.path, exc) from exc
        if not text.isdigit():
            raise ConfigError(
                f"the cursor file holds {text[:40]!r}, not a sequence number",
                where=str(self.path),
                hint="it holds the last shipped entry's seq; delete it to ship from the start",
            )
        return int(text)

    def write(self, seq: int) -> None:
        part = self.path.with_name(self.path.name + ".part")
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{seq}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, self.path)
        except OSError as exc:
            raise _file_error("write the cursor file", self.path, exc) from exc


def _file_error(doing: str, path: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot {doing}: {exc.strerror or type(exc).__name__}",
        where=str(path),
        hint="check that the folder exists and this user may write it",
    )


def last_shipped(output: Path) -> int:
    """The sequence number of the last whole line of a file entries were appended to (0 when
    there is none): where a shipper that stopped between writing a batch and moving its cursor
    carries on, so that no entry is written twice."""
    try:
        with output.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            tail = f.read()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise _file_error("read the output file", output, exc) from exc
    for raw in reversed(tail.split(b"\n")):
        try:
            seq = json.loads(raw).get("seq")
        except (ValueError, AttributeError):
            continue  # a torn last line, or not one of ours
        if isinstance(seq, int):
            return seq
    return 0


def ship(
    journal: Journal,
    out: TextIO,
    filters: Filters,
    *,
    after: int,
    moved: Callable[[int], None] = lambda _seq: None,
    batch: int = BATCH,
) -> int:
    """Write every entry after ``after`` that matches ``filters`` to ``out``, one JSON object
    a line, in sequence order, up to the settled end of the log; call ``moved(seq)`` after each
    batch is written and flushed (the cursor: entries up to ``seq`` are shipped, or filtered
    out). Returns the last sequence number passed."""
    end = journal.audit_settled()
    while after < end:
        entries = journal.audit_entries(
            environment=filters.environment,
            credential=filters.credential,
            action=filters.action,
            since=filters.since,
            until=filters.until,
            after=after,
            through=end,
            limit=batch,
            oldest_first=True,
        )
        for entry in entries:
            out.write(json.dumps(line(entry), separators=(",", ":"), default=str) + "\n")
        out.flush()
        with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal: nothing to sync
            os.fsync(out.fileno())
        after = entries[-1].id if len(entries) == batch else end
        moved(after)
    return after
