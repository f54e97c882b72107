"""The journal's schema, owned by migrations (Alembic, ``rotator/journal/migrations``).

Every process that opens a journal checks its revision (one query). Where it is behind, the
process migrates it under a lock that every other process takes too: a PostgreSQL advisory lock
held by the migrating transaction, or on SQLite a file lock beside the journal plus SQLite's own
write lock. So any number of replicas may start together on an empty database: one migrates,
the others wait and find nothing left to do. A journal migrated by a newer release than this
one is refused with a clear error; a release never downgrades a journal.

``journal.migrate = "manual"`` leaves migrating to ``rotator db upgrade`` (run it before a
rollout); a process then refuses a journal that is behind instead of changing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, SQLAlchemyError

from rotator.errors import JournalError
from rotator.journal._sqlite import WRITER_FLAG
from rotator.journal.rows import HEAD as HEAD
from rotator.journal.rows import REVISIONS as REVISIONS

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own write lock alone orders the migrators
    fcntl = None  # type: ignore[assignment]

SCRIPTS = Path(__file__).parent / "migrations"
_PG_LOCK = 726354102
"""The advisory lock key every migrating process takes (any constant no other lock uses)."""

Mode = Literal["auto", "manual", "off"]
log = structlog.get_logger("rotator.migrate")


@dataclass(frozen=True)
class SchemaState:
    revision: str | None
    """The journal's revision; ``None`` for an empty database or a journal older than
    migrations (its tables are adopted by the first revision)."""

    @property
    def head(self) -> str:
        return HEAD

    @property
    def current(self) -> bool:
        return self.revision == HEAD

    @property
    def newer(self) -> bool:
        return self.revision is not None and self.revision not in REVISIONS

    def describe(self) -> str:
        if self.current:
            return f"at {HEAD}, this release's latest"
        if self.newer:
            return f"at {self.revision}, newer than this release knows (up to {HEAD})"
        return f"at {self.revision or 'no revision'}, behind this release's {HEAD}"


def revision(conn: Connection) -> str | None:
    """The journal's revision, read on ``conn`` (None where there is no version table)."""
    if not conn.dialect.has_table(conn, "alembic_version"):
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return None if row is None else str(row[0])


def state(engine: Engine, where: str) -> SchemaState:
    with _guard(where, "read the journal's schema revision"), engine.connect() as conn:
        return SchemaState(revision(conn))


def ensure(engine: Engine, where: str, mode: Mode, lock_file: str | None) -> None:
    """Bring the journal to this release's schema, or refuse it (see the module docstring)."""
    if mode == "off":
        return
    found = state(engine, where)
    if found.current:
        return
    _refuse_newer(found, where)
    if mode == "manual":
        raise JournalError(
            f"the journal's schema is {found.describe()}",
            where=where,
            hint="run `rotator db upgrade` (journal.migrate = \"manual\" leaves migrating to "
            "it), or set journal.migrate = \"auto\"",
        )
    upgrade(engine, where, lock_file)


def upgrade(engine: Engine, where: str, lock_file: str | None) -> tuple[str | None, str]:
    """Migrate the journal to :data:`HEAD` under the migration lock: ``(before, after)``."""
    with (
        _guard(where, "migrate the journal's schema"),
        _file_lock(lock_file),
        engine.connect() as conn,
    ):
        if conn.dialect.name == "sqlite":
            conn.info[WRITER_FLAG] = True  # BEGIN IMMEDIATE: the write lock
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
                before = revision(conn)
                _refuse_newer(SchemaState(before), where)
                if before != HEAD:
                    run_scripts(conn)
                    log.info("journal.migrated", journal=where, before=before, after=HEAD)
        finally:
            conn.info.pop(WRITER_FLAG, None)
    return before, HEAD


def run_scripts(conn: Connection, target: str = HEAD) -> None:
    """Run the migration scripts up to ``target`` on ``conn``, in its transaction, without the
    lock and the checks of :func:`upgrade` (which is what a process uses)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = conn
    command.upgrade(config, target)


def _refuse_newer(found: SchemaState, where: str) -> None:
    if found.newer:
        raise JournalError(
            f"the journal's schema is {found.describe()}",
            where=where,
            hint="a newer release of the rotator migrated this journal: run that release (or a "
            "later one); a release never downgrades a journal",
        )


@contextmanager
def _file_lock(path: str | None) -> Iterator[None]:
    """On SQLite, one migrator at a time across processes (the lock goes with its process)."""
    if path is None or fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def _guard(where: str, doing: str) -> Iterator[None]:
    try:
        yield
    except JournalError:
        raise
    except DatabaseError as exc:
        if corrupt(exc):
            raise corrupt_journal(where) from exc
        raise JournalError(
            f"failed to {doing}: {type(exc.orig or exc).__name__}",
            where=where,
            hint="check that the database is reachable and that this identity may create and "
            "alter tables in it",
        ) from exc
    except (SQLAlchemyError, OSError) as exc:
        name = type(getattr(exc, "orig", None) or exc).__name__
        raise JournalError(
            f"failed to {doing}: {name}",
            where=where,
            hint="check that the database is reachable and that this identity may create and "
            "alter tables in it",
        ) from exc


def corrupt(exc: BaseException) -> bool:
    """Whether a database error says the SQLite file is not a journal (damaged or foreign)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "file is not a database" in text or "malformed" in text


def corrupt_journal(where: str) -> JournalError:
    return JournalError(
        "the journal file is not a SQLite database, or it is damaged",
        where=where,
        hint="restore it from a backup, or move it aside and start an empty journal (see "
        "docs/runbook.md, restore after losing the journal); do not delete it before the "
        "rotations it holds are accounted for",
    )
