"""Everything ``rotator status`` reads from the journal, in one read transaction and one query
per table, as plain rows.

:func:`read` takes it from a SQLite journal with Python's own ``sqlite3`` driver: no
SQLAlchemy, no engine, no writer thread, nothing written. It answers only where that is exactly
what the :class:`~rotator.journal.Journal` would read: a journal file that exists, at this
release's schema revision, readable. Anywhere else (PostgreSQL, a journal to create or migrate,
an error) it answers ``None`` and the caller opens the Journal, which creates, migrates, or
says what is wrong, as every command does; :func:`of_journal` then reads the same through it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rotator.journal.rows import HEAD, LockView, RotationView, StateView, Step

if TYPE_CHECKING:
    from rotator.journal.store import Journal

Key = tuple[str, str]
"""(environment, credential)"""


@dataclass(frozen=True, slots=True)
class StateRow:
    environment: str
    credential: str
    current_version_id: str | None
    current_fingerprint: str | None
    expires_at: datetime | None
    rotated_at: datetime | None
    last_attempt_at: datetime | None
    last_outcome: str | None
    last_error: str | None
    attention: str | None
    unaccounted: int


@dataclass(frozen=True, slots=True)
class RotationRow:
    id: str
    environment: str
    credential: str
    step: str
    retire_after: datetime | None


@dataclass(frozen=True, slots=True)
class LockRow:
    name: str
    owner: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ReadRow:
    """A ``reader_reads`` row of a live reader key (``rotator.readers``)."""

    key_id: str
    key_name: str
    environment: str
    credential: str
    version_id: str
    last_at: datetime


@dataclass(frozen=True, slots=True)
class DiscoveredRow:
    """A ``discovered_connections`` row, the columns discovery reads (in its order)."""

    connection_id: str
    credential: str
    status: str
    platform: str | None
    company: str | None
    name: str | None
    gone_at: datetime | None


@dataclass
class Snapshot:
    """The journal as ``status`` reads it."""

    states: dict[Key, StateView]
    open_rotations: dict[Key, RotationView]
    """Each credential's latest open rotation (oldest first, the newest kept, as the schedule
    reads them)."""
    open_revokes: dict[Key, RotationView]
    locks: list[LockView]
    reads: list[ReadRow]
    """Reads of live reader keys at or after ``since``, oldest first."""
    discovered: dict[str, list[DiscoveredRow]] = field(default_factory=dict)
    """Per environment, its discovered connections ordered by credential (every status)."""


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite journal URL (None for PostgreSQL or an in-memory database)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def _when(text: str | None) -> datetime | None:
    # what SQLAlchemy's SQLite DATETIME stores: naive UTC, "YYYY-MM-DD HH:MM:SS.ffffff"
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


def _stored(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _by_key(rows: Iterable[RotationView]) -> dict[Key, RotationView]:
    return {(r.environment, r.credential): r for r in rows}


def read(url: str, *, since: datetime, environments: Iterable[str]) -> Snapshot | None:
    """The snapshot of the SQLite journal at ``url``, read with ``sqlite3``; ``None`` where the
    Journal must be opened instead (see the module). ``since``: the oldest reader activity
    wanted. ``environments``: those whose discovered connections are read."""
    path = sqlite_file(url)
    if path is None:
        return None
    try:
        # mode=rw: never create the file (a missing journal is the Journal's to make)
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("BEGIN")  # one consistent view of every table
        try:
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError:
            return None  # no version table: a journal to create or to adopt
        if revision != [(HEAD,)]:
            return None
        return _read(conn, since, environments)
    except sqlite3.Error:
        return None  # the Journal reads it again, and names what is wrong
    finally:
        conn.close()


_OPEN_ROTATIONS = (
    "SELECT id, environment, credential, step, retire_after FROM rotations "
    "WHERE step IN (?, ?, ?, ?, ?, ?) ORDER BY started_at"
)
"""The rotations at one of the six open steps (``Step.OPEN``)."""
assert len(Step.OPEN) == _OPEN_ROTATIONS.count("?")


def _read(conn: sqlite3.Connection, since: datetime, environments: Iterable[str]) -> Snapshot:
    states: dict[Key, StateView] = {}
    for row in conn.execute(
        "SELECT environment, credential, current_version_id, current_fingerprint, expires_at, "
        "rotated_at, last_attempt_at, last_outcome, last_error, attention, unaccounted "
        "FROM credential_state"
    ):
        states[(row[0], row[1])] = StateRow(
            row[0], row[1], row[2], row[3], _when(row[4]), _when(row[5]), _when(row[6]),
            row[7], row[8], row[9], row[10] or 0,
        )  # fmt: skip
    opened = conn.execute(_OPEN_ROTATIONS, tuple(Step.OPEN))
    revokes = conn.execute(
        "SELECT id, environment, credential, step, retire_after FROM rotations "
        "WHERE kind = 'revoke' AND finished_at IS NULL ORDER BY started_at"
    )
    locks: list[LockView] = [
        LockRow(name, owner, _when(expires))  # type: ignore[arg-type]  # NOT NULL
        for name, owner, expires in conn.execute(
            "SELECT name, owner, expires_at FROM locks ORDER BY name"
        )
    ]
    reads = [
        ReadRow(r[0], r[1], r[2], r[3], r[4], _when(r[5]))  # type: ignore[arg-type]  # NOT NULL
        for r in conn.execute(
            "SELECT reader_reads.key_id, reader_reads.key_name, reader_reads.environment, "
            "reader_reads.credential, reader_reads.version_id, reader_reads.last_at "
            "FROM reader_reads JOIN reader_keys ON reader_keys.key_id = reader_reads.key_id "
            "WHERE reader_reads.last_at >= ? AND reader_keys.revoked_at IS NULL "
            "ORDER BY reader_reads.last_at",
            (_stored(since),),
        )
    ]
    discovered = {
        env: [
            DiscoveredRow(r[0], r[1], r[2], r[3], r[4], r[5], _when(r[6]))
            for r in conn.execute(
                "SELECT connection_id, credential, status, platform, company, name, gone_at "
                "FROM discovered_connections WHERE environment = ? ORDER BY credential",
                (env,),
            )
        ]
        for env in environments
    }
    return Snapshot(
        states=states,
        open_rotations=_by_key(_rotation(r) for r in opened),
        open_revokes=_by_key(_rotation(r) for r in revokes),
        locks=locks,
        reads=reads,
        discovered=discovered,
    )


def _rotation(row: tuple[str, str, str, str, str | None]) -> RotationRow:
    return RotationRow(row[0], row[1], row[2], row[3], _when(row[4]))


def of_journal(journal: Journal) -> Snapshot:
    """The same snapshot, read through an open :class:`~rotator.journal.Journal`, but for
    the reads (``rotator.readers.activity`` queries them) and the discovered connections (the
    runtime that holds the journal has made them effective already)."""
    return Snapshot(
        states=dict(journal.states()),
        open_rotations=_by_key(journal.open_rotations()),
        open_revokes=_by_key(journal.open_revokes()),
        locks=list(journal.locks()),
        reads=[],
    )
