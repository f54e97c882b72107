"""The journal: rotations and their steps, credential state, the audit log and locks.

SQLAlchemy 2 over SQLite by default (one file, zero setup) or PostgreSQL when several replicas
run. Token material appears here only sealed (``Rotation.sealed``, AES-GCM with the
environment's sealing key) and only between *issue* and *promote*; everything else names tokens
by fingerprint.

Locks are leases in a table (``locks``): portable across SQLite and PostgreSQL, they survive a
crashed holder by expiring, and a worker renews its lease before every step that writes
outside the journal, so a worker that lost its lease stops instead of racing the new holder.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    mapped_column,
    sessionmaker,
)
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from rotator import migrate as migrations
from rotator.errors import ConfigError, JournalError, LeaseLost, LockBusy
from rotator.model import utcnow

if TYPE_CHECKING:
    from rotator.settings import JournalSettings

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's busy handler alone orders the writers
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the journal")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Step:
    """Where a rotation stands. Open steps are resumed; terminal ones are history."""

    STARTED = "started"  # row written, Makini not yet asked (or asked and crashed)
    ISSUED = "issued"  # new token sealed in the journal
    STAGED = "staged"  # pending in every backend
    VERIFIED = "verified"  # Makini accepted it for the right connection
    PROMOTED = "promoted"  # current everywhere; sealed copy dropped; waiting to retire the old
    RETIRING = "retiring"  # the old pair sealed here, to revoke it at Makini once unreadable
    DONE = "done"  # old version retired
    ROLLED_BACK = "rolled_back"  # verify rejected the new token; pending removed
    FAILED = "failed"  # stopped; needs a person (see error)
    SUPERSEDED = "superseded"  # pre-empted by a revoke

    OPEN = (STARTED, ISSUED, STAGED, VERIFIED, PROMOTED, RETIRING)
    IN_FLIGHT = (STARTED, ISSUED, STAGED, VERIFIED, PROMOTED)
    """What an emergency revoke supersedes: a *retiring* rotation only concerns the old
    version, and finishes after the revoke (its sealed pair is the old one, to revoke)."""
    TERMINAL = (DONE, ROLLED_BACK, FAILED, SUPERSEDED)


class Rotation(Base):
    __tablename__ = "rotations"
    # a drive reads its credential's latest open rotation: without this index SQLite searches
    # by environment and reads every rotation of it, the whole history, on every drive
    __table_args__ = (
        Index("ix_rotations_credential_started", "environment", "credential", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), index=True)
    credential: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="rotate")
    step: Mapped[str] = mapped_column(String(16), index=True)
    version_id: Mapped[str] = mapped_column(String(36))
    old_version_id: Mapped[str | None] = mapped_column(String(36))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    old_fingerprint: Mapped[str | None] = mapped_column(String(64))
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retire_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    invalidated_old: Mapped[bool | None] = mapped_column()
    reason: Mapped[str] = mapped_column(String(500), default="")
    actor: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="[]")
    asked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Set before Makini is asked for a token, cleared once its answer is recorded: a resume
    that finds it set knows the last request's answer was lost (see ``rotator.unaccounted``)."""

    @property
    def is_open(self) -> bool:
        return self.step in Step.OPEN

    def note_list(self) -> list[str]:
        return list(json.loads(self.notes or "[]"))


class CredentialState(Base):
    """What the journal knows of a credential's current token (never the token)."""

    __tablename__ = "credential_state"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(String(64), primary_key=True)
    current_version_id: Mapped[str | None] = mapped_column(String(36))
    current_fingerprint: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_outcome: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    attention: Mapped[str | None] = mapped_column(Text)
    unaccounted: Mapped[int] = mapped_column(Integer, server_default="0")
    """Open entries in ``unaccounted_tokens`` (tokens Makini may have issued that no backend
    holds)."""


class AuditEntry(Base):
    """Append-only: who did what, when, with what outcome. Fingerprints, never tokens."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    environment: Mapped[str | None] = mapped_column(String(64), index=True)
    credential: Mapped[str | None] = mapped_column(String(64))
    version_id: Mapped[str | None] = mapped_column(String(36))
    outcome: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    request_ids: Mapped[str] = mapped_column(Text, default="[]")
    detail: Mapped[str] = mapped_column(Text, default="{}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "environment": self.environment,
            "credential": self.credential,
            "version_id": self.version_id,
            "outcome": self.outcome,
            "fingerprint": self.fingerprint,
            "request_ids": json.loads(self.request_ids or "[]"),
            "detail": json.loads(self.detail or "{}"),
        }


class Lock(Base):
    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


def _sqlite_pragmas(synchronous: str) -> Any:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        # let SQLAlchemy emit BEGIN itself: pysqlite's own transaction handling breaks
        # SAVEPOINT, which the group commit below relies on
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        for attempt in range(50):
            # switching a new file to WAL needs it alone: processes opening a new journal
            # together get "locked" at once, whatever the busy timeout; once WAL, a no-op
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.02 + random.random() * 0.05)
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.close()

    return apply


_WRITER = "rotator_journal_writer"


def _sqlite_begin(conn: Any) -> None:
    # The writer's batches read before they write. A deferred BEGIN would take a read snapshot,
    # and SQLite refuses to upgrade a snapshot that another process wrote past (SQLITE_BUSY at
    # once, without waiting): two processes on one journal would fail each other's batches.
    # BEGIN IMMEDIATE waits (busy_timeout) for the write lock first.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get(_WRITER) else "BEGIN")


_ROTATIONS = cast(Table, Rotation.__table__)
_LOCKS = cast(Table, Lock.__table__)
_STATES = cast(Table, CredentialState.__table__)
_AUDIT = cast(Table, AuditEntry.__table__)
M = TypeVar("M", bound=Base)


def _instance(cls: type[M], row: Mapping[str, Any]) -> M:
    """A row as a (detached) instance of ``cls``, built the way the ORM loads one: without an
    attribute event per column, which costs more than the query on the hot path."""
    instance: M = manager_of_class(cls).new_instance()
    instance.__dict__.update(row)
    return instance


def _joined_session(conn: Connection) -> Session:
    """An ORM session inside the transaction ``conn`` is in (its work in a savepoint)."""
    return Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)


def _maybe_rotation(row: Mapping[str, Any] | None) -> Rotation | None:
    return None if row is None else _instance(Rotation, row)


class _Prepared:
    """One Core statement of the hot path, built once with bound parameters.

    On SQLite it is also compiled once and run on the DBAPI connection, with the same SQL and
    the same type processing (each parameter's bind processor, each column's result
    processor): SQLAlchemy's per-execution machinery (compiled-cache lookup, execution context,
    result object) costs about four times the statement itself there, and the journal writer is
    one thread. Elsewhere it runs through ``Connection.execute``.
    """

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        self.statement = statement
        self.keys = tuple(c.key for c in getattr(statement, "exported_columns", ()))
        self.raw = dialect.name == "sqlite"
        if not self.raw:
            return
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        binds = compiled.binds
        self.fixed = {name: b.value for name, b in binds.items() if not b.required}
        self.binds = [
            (name, binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup or ()
        ]
        self.results = [
            c.type.dialect_impl(dialect).result_processor(dialect, None)
            for c in statement.exported_columns
        ]

    def _args(self, params: Mapping[str, Any]) -> list[Any]:
        values = {**self.fixed, **params}
        return [
            value if process is None else process(value)
            for name, process in self.binds
            for value in (values[name],)
        ]

    def _row(self, row: Sequence[Any]) -> dict[str, Any]:
        return {
            key: value if process is None else process(value)
            for key, process, value in zip(self.keys, self.results, row, strict=True)
        }

    def first(self, conn: Connection, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row the statement returns, as ``{column key: value}``."""
        if not self.raw:
            row = conn.execute(self.statement, params).first()
            return None if row is None else dict(row._mapping)
        cursor = _dbapi(conn).execute(self.sql, self._args(params))
        try:
            found = cursor.fetchone()
        finally:
            cursor.close()
        return None if found is None else self._row(found)

    def run(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run it; the number of rows it changed."""
        if not self.raw:
            return int(conn.execute(self.statement, params).rowcount)
        cursor = _dbapi(conn).execute(self.sql, self._args(params))
        count = cursor.rowcount
        cursor.close()
        return int(count)

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not self.raw:
            conn.execute(self.statement, list(rows))
            return
        _dbapi(conn).executemany(self.sql, [self._args(row) for row in rows]).close()


def _dbapi(conn: Connection) -> Any:
    return conn.connection.driver_connection


class _Statements:
    """The hot path's statements, built once with bound parameters (see :class:`_Prepared`)."""

    def __init__(self, dialect: Dialect) -> None:
        # only the dialect in use: importing PostgreSQL's costs a SQLite run 0.1 s at start
        if dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as upsert
        else:
            from sqlalchemy.dialects.postgresql import insert as upsert  # type: ignore[assignment]

        self.dialect = dialect
        self.insert: Any = upsert
        prepare = self.prepare
        lock = self.insert(_LOCKS).values(
            name=bindparam("p_name"),
            owner=bindparam("p_owner"),
            acquired_at=bindparam("p_now"),
            expires_at=bindparam("p_expires"),
        )
        # free, expired or ours: one statement, atomic on both databases
        self.acquire = prepare(
            lock.on_conflict_do_update(
                index_elements=[_LOCKS.c.name],
                set_={key: lock.excluded[key] for key in ("owner", "acquired_at", "expires_at")},
                where=(_LOCKS.c.expires_at < bindparam("p_cutoff", type_=UTCDateTime()))
                | (_LOCKS.c.owner == lock.excluded.owner),
            ).returning(_LOCKS.c.name)
        )
        mine = (_LOCKS.c.name == bindparam("p_name")) & (_LOCKS.c.owner == bindparam("p_owner"))
        live = _LOCKS.c.expires_at > bindparam("p_now", type_=UTCDateTime())
        self.renew = prepare(
            update(_LOCKS).where(mine, live).values(expires_at=bindparam("p_expires"))
        )
        # a drive's writes: only while its lease is live and its own (FOR SHARE: on PostgreSQL
        # a concurrent take-over waits for this transaction, and this one sees its result)
        self.lease_held = (
            select(literal(1))
            .select_from(_LOCKS)
            .where(
                _LOCKS.c.name == bindparam("p_lease"),
                _LOCKS.c.owner == bindparam("p_lease_owner"),
                _LOCKS.c.expires_at > bindparam("p_lease_now", type_=UTCDateTime()),
            )
            .with_for_update(read=True)
            .exists()
        )
        self.holds = prepare(select(self.lease_held))
        self.release = prepare(delete(_LOCKS).where(mine))
        self.lock = prepare(select(_LOCKS).where(_LOCKS.c.name == bindparam("p_name")))
        st = _STATES.c
        self.state = prepare(
            select(_STATES).where(
                st.environment == bindparam("p_env"), st.credential == bindparam("p_cred")
            )
        )
        r = _ROTATIONS.c
        self.rotation = prepare(select(_ROTATIONS).where(r.id == bindparam("p_id")))
        credential = (r.environment == bindparam("p_env")) & (r.credential == bindparam("p_cred"))
        latest = r.started_at.desc()
        is_open = or_(*(r.step == step for step in Step.OPEN))  # compiles once, unlike IN (...)
        self.open_rotation = prepare(
            select(_ROTATIONS).where(credential, is_open).order_by(latest).limit(1)
        )
        self.open_revoke = prepare(
            select(_ROTATIONS)
            .where(credential, r.kind == "revoke", r.finished_at.is_(None))
            .order_by(latest)
            .limit(1)
        )
        self.add_rotation = prepare(
            insert(_ROTATIONS).values({c.key: bindparam(f"p_{c.key}") for c in _ROTATIONS.c})
        )
        audit = [c.key for c in _AUDIT.c if c.key != "id"]
        self.add_audit = prepare(insert(_AUDIT).values({k: bindparam(f"p_{k}") for k in audit}))

    def prepare(self, statement: Any) -> _Prepared:
        return _Prepared(statement, self.dialect)


_BATCH_MAX = 256

_Target = Future[Any] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
"""Where a work's result goes: a thread's future, or an event loop's (delivered per batch)."""
_Work = tuple[Callable[[], Any], _Target, bool]


class _Writer:
    """SQLite's single writer: one thread owns the journal's write connection.

    SQLite has one writer at a time and pays an fsync per commit. Everything that writes runs on
    this thread, in batches: each piece of work in a SAVEPOINT of one shared transaction, one
    COMMIT per batch. A caller gets its result (or its error) only once the batch is durable,
    exactly as with a commit of its own, but concurrent rotation steps share one fsync, and no
    thread waits on another's lock.

    Work arrives three ways: :meth:`submit` (a whole function of the journal, run here; the
    engine's hot path, with no worker thread in between), :meth:`run` (one transaction's work,
    from any thread) and :meth:`session` (an ORM session for a with-block in the caller's
    thread, which this thread lends its connection to).
    """

    def __init__(
        self,
        engine: Engine,
        commit_error: Callable[[BaseException], BaseException],
        turn_file: str | None = None,
    ):
        self._engine = engine
        self._commit_error = commit_error
        self._turn_file = turn_file if fcntl is not None else None
        self._turn_fd: int | None = None
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._closed = False
        self._bare = False  # work runs without its savepoint (see _commit)
        self._thread = threading.Thread(target=self._loop, name="journal-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, again: bool = True) -> Future[T]:
        """Run ``fn`` on this thread inside the current batch; its result once durable.
        ``again``: ``fn`` touches nothing but the journal, so it may run a second time after
        its first run was rolled back (see :meth:`_commit`)."""
        future: Future[T] = Future()
        self._put((fn, future, again))
        return future

    def submit_async(
        self, fn: Callable[[], T], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[T]:
        """:meth:`submit` for a coroutine on ``loop``: the results of one batch reach the loop
        in one callback, not one cross-thread wake-up per result."""
        future: asyncio.Future[T] = loop.create_future()
        self._put((fn, (loop, future), True))
        return future

    def _put(self, work: _Work) -> None:
        if self._closed:
            raise JournalError("the journal is closed", hint="this is a bug: report it")
        self._queue.put(work)

    def run(self, work: Callable[[Connection], T], *, single: bool = False) -> T:
        """``work`` in a savepoint of the current batch, and its result once durable. A
        ``single`` statement needs no savepoint: SQLite undoes a failed statement itself."""
        if threading.get_ident() == self._thread.ident:  # inside a submitted function
            return self._in_savepoint(work, single)
        return self.submit(lambda: self._in_savepoint(work, single)).result()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in the shared transaction, durable when the block exits. From another
        thread this thread waits for the block, which must not write to the journal itself."""
        if threading.get_ident() == self._thread.ident:
            assert self._conn is not None
            with _joined_session(self._conn) as s:
                yield s
                s.commit()
            return
        lent: Future[Session] = Future()
        back = threading.Event()
        failed: list[BaseException] = []

        def lend(conn: Connection) -> None:
            with _joined_session(conn) as s:
                lent.set_result(s)
                back.wait()
                if failed:
                    raise failed[0]  # rolls this work's savepoint back
                s.commit()

        done = self.submit(lambda: self._in_savepoint(lend), again=False)
        wait([lent, done], return_when=FIRST_COMPLETED)  # type: ignore[arg-type]
        if not lent.done():
            done.result()  # the batch failed before it reached this work: raise its error
        try:
            yield lent.result()
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            back.set()
        done.result()

    def _in_savepoint(self, work: Callable[[Connection], T], single: bool = False) -> T:
        assert self._conn is not None
        if single or self._bare:
            return work(self._conn)
        raw = self._conn.connection.driver_connection
        assert raw is not None
        raw.execute("SAVEPOINT work")
        try:
            value = work(self._conn)
        except BaseException:
            raw.execute("ROLLBACK TO work")
            raw.execute("RELEASE work")
            raise
        raw.execute("RELEASE work")
        return value

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                results = self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - the batch did not commit: nobody's work is durable
                error = self._commit_error(exc)
                results = [(target, False, error) for _, target, _ in batch]
                self._release_connection()
            self._deliver(results)
        self._release_connection()
        if self._turn_fd is not None:  # closed by the thread that uses it
            os.close(self._turn_fd)
            self._turn_fd = None

    @staticmethod
    def _deliver(results: list[tuple[_Target, bool, Any]]) -> None:
        to_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for target, ok, value in results:
            if isinstance(target, tuple):
                to_loops.setdefault(target[0], []).append((target[1], ok, value))
            elif not target.cancelled():
                _settle(target, ok, value)
        for loop, settled in to_loops.items():
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle_all, settled)

    def _release_connection(self) -> None:
        """Back to the pool, as an ordinary connection again (deferred BEGIN)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.info.pop(_WRITER, None)
                conn.close()

    def _commit(self, batch: list[_Work]) -> list[tuple[_Target, bool, Any]]:
        """Run a batch in one transaction and commit it.

        A savepoint around each piece of work keeps one failure from undoing the others, at
        two statements per piece. So the batch runs bare first; only if a piece fails (rare: a
        superseded rotation, a bug) is it rolled back and run again, each piece in its own
        savepoint. A batch holding work that cannot run twice (a session lent to another
        thread) runs with savepoints at once.
        """
        if self._conn is None:
            self._conn = self._engine.connect()
            self._conn.info[_WRITER] = True
        with self._turn():
            return self._commit_batch(self._conn, batch)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write, among the processes sharing the journal file.

        SQLite's busy handler polls for the write lock with growing sleeps (1, 2, 5, ... 100
        ms), so a writer that found the lock taken sleeps on long after it is free: two
        ``run-due`` processes on one journal took a quarter longer than on two journals. A
        blocking ``flock`` on a file beside the journal wakes the next writer as soon as the
        last one commits. The lock goes with its process, whatever way that ends.
        """
        if self._turn_file is None:
            yield
            return
        if self._turn_fd is None:
            self._turn_fd = os.open(self._turn_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def _commit_batch(
        self, conn: Connection, batch: list[_Work]
    ) -> list[tuple[_Target, bool, Any]]:
        live = [(fn, target) for fn, target, _ in batch if _start(target)]
        if all(again for _, _, again in batch):
            self._bare = True
            try:
                with conn.begin() as tx:
                    results = self._run_all(live)
                    if all(ok for _, ok, _ in results):
                        return results
                    tx.rollback()
            finally:
                self._bare = False
        with conn.begin():
            return self._run_all(live)

    @staticmethod
    def _run_all(batch: list[tuple[Callable[[], Any], _Target]]) -> list[tuple[_Target, bool, Any]]:
        results: list[tuple[_Target, bool, Any]] = []
        for fn, target in batch:
            try:
                results.append((target, True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to its caller
                results.append((target, False, exc))
        return results

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)


def _start(target: _Target) -> bool:
    """Whether the work is still wanted (a thread's future is marked running)."""
    if isinstance(target, tuple):
        return not target[1].cancelled()
    return target.set_running_or_notify_cancel()


def _settle(future: Future[Any] | asyncio.Future[Any], ok: bool, value: Any) -> None:
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if not future.done():  # its awaiter was cancelled
            _settle(future, ok, value)


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse is shown by scheme only
        return url.split(":", 1)[0] + "://..."


LeaseKey = tuple[str, str]
"""A drive's lease as the journal checks it: (lock name, holder)."""


@dataclass(frozen=True)
class DriveStart:
    """What a drive finds once it asked for its credential's lease (see ``begin_drive``)."""

    taken: bool
    revoke: Rotation | None = None
    rotation: Rotation | None = None
    state: CredentialState | None = None
    expired_holder: datetime | None = None
    """When the lease this drive took over had expired: its holder stopped renewing it (a
    crash), rather than giving it back. ``None`` when it was free or given back."""


def _lease_params(lease: LeaseKey) -> dict[str, Any]:
    return {"p_lease": lease[0], "p_lease_owner": lease[1], "p_lease_now": utcnow()}


def _lost(lease: LeaseKey) -> LeaseLost:
    return LeaseLost(
        "this worker no longer holds the credential's lease (it expired or another worker "
        "took it over): the journal refused its write",
        where=lease[0],
        hint="nothing to do: the worker that holds the lease resumes from the last step",
    )


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite journal URL (None for PostgreSQL or an in-memory database)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def _prepare_sqlite_file(path: Path, where: str) -> None:
    """Make the journal's folder (0700) and file (0600) before SQLite does, so that neither is
    readable by others whatever the umask (SQLite gives its -wal and -shm files the mode of
    the database file). An existing journal readable by others is made private."""
    folder = path.parent
    try:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for part in reversed(missing):
            part.mkdir(mode=0o700)
            os.chmod(part, 0o700)  # mkdir's mode is masked by the umask
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            mode = os.fstat(fd).st_mode & 0o777
            if mode & 0o077:
                os.fchmod(fd, mode & ~0o077)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists() and side.stat().st_mode & 0o077:
                os.chmod(side, side.stat().st_mode & 0o700)
    except (NotADirectoryError, FileExistsError) as exc:
        parents = (folder, *folder.parents)
        blocker = next((p for p in parents if p.exists() and not p.is_dir()), None)
        raise JournalError(
            f"the journal's folder cannot be made: {blocker or exc.filename} is a file, not a "
            "folder",
            where=where,
            hint="fix journal.url (or ROTATOR_JOURNAL_URL) to name a file in a folder",
        ) from exc
    except IsADirectoryError as exc:
        raise JournalError(
            f"the journal path {path} is a folder",
            where=where,
            hint="journal.url must name a file, e.g. sqlite:////var/lib/rotator/journal.db",
        ) from exc
    except OSError as exc:
        raise JournalError(
            f"cannot create the journal file: {exc.strerror or type(exc).__name__}",
            where=f"{where} ({exc.filename or path})",
            hint="check that this user may create and write files in the journal's folder",
        ) from exc


class Journal:
    def __init__(
        self,
        url: str,
        *,
        lock_ttl: timedelta = timedelta(seconds=15),
        sqlite_synchronous: str = "full",
        migrate: migrations.Mode = "auto",
    ) -> None:
        """Open the journal at ``url``, bringing its schema to this release's (``migrate``:
        see :mod:`rotator.migrate`). A SQLite file and the folders made for it are private to
        this user (0600, 0700) whatever the umask. Raises JournalError or ConfigError, naming
        the journal and what to do."""
        self.url = url
        self.lock_ttl = lock_ttl
        self.where = f"journal {redact_url(url)}"
        database = _sqlite_file(url)
        if database is not None:
            _prepare_sqlite_file(Path(database), self.where)
        try:
            # a ping before each checkout finds a server that dropped the connection; a SQLite
            # file has no server, and the ping would cost a query per session
            self.engine: Engine = create_engine(
                url, future=True, pool_pre_ping=not url.startswith("sqlite")
            )
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(
                f"cannot use the journal URL: {type(exc).__name__}",
                where=self.where,
                hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB "
                "(pip install makini-rotator[postgres])",
            ) from exc
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_synchronous))
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._q = _Statements(self.engine.dialect)
        self.dialect_insert: Any = self._q.insert
        """The dialect's ``insert`` (with ``on_conflict_do_update``), for upserts."""
        configure_mappers()  # _instance builds instances without the ORM's first query
        self._step_statements: dict[tuple[frozenset[str], bool], _Prepared] = {}
        self._state_statements: dict[frozenset[str], _Prepared] = {}
        self.migrate_lock = f"{database}-migrate" if database is not None else None
        try:
            migrations.ensure(self.engine, self.where, migrate, self.migrate_lock)
        except BaseException:
            self.engine.dispose()
            raise
        # SQLite has one writer at a time: gather concurrent writers into group commits
        # rather than letting them spin in SQLite's busy handler, one fsync each.
        self._writer: _Writer | None = None
        if self.is_sqlite:
            turn_file = f"{database}-writer" if database is not None else None
            self._writer = _Writer(self.engine, self._commit_error, turn_file)

    @classmethod
    def open(cls, settings: JournalSettings) -> Journal:
        """The journal a configuration names, with its settings."""
        return cls(
            settings.url,
            lock_ttl=settings.lock_ttl,
            sqlite_synchronous=settings.sqlite_synchronous,
            migrate=settings.migrate,
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.engine.dispose()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except JournalError:
            raise
        except (OperationalError, sqlite3.OperationalError) as exc:
            # a prepared statement (see _Prepared) raises the driver's own errors
            name = type(getattr(exc, "orig", exc)).__name__
            raise JournalError(
                f"the journal database failed to {doing}: {name}",
                where=self.where,
                hint="check that the database is reachable and writable",
            ) from exc
        except (SQLAlchemyError, sqlite3.Error) as exc:
            if migrations.corrupt(exc):
                raise migrations.corrupt_journal(self.where) from exc
            raise JournalError(
                f"the journal database failed to {doing}: {type(exc).__name__}",
                where=self.where,
            ) from exc
        except OSError as exc:  # the writer's turn file beside a SQLite journal
            raise JournalError(
                f"the journal failed to {doing}: {exc.strerror or type(exc).__name__}",
                where=f"{self.where} ({exc.filename})" if exc.filename else self.where,
                hint="check that the journal's folder is writable",
            ) from exc

    @contextmanager
    def session(self, doing: str = "write") -> Iterator[Session]:
        """A session whose work is durable when the block exits (rolled back on an error).
        On SQLite the work joins the writer's shared transaction (see :class:`_Writer`)."""
        with self._guard(doing):
            if self._writer is not None:
                with self._writer.session() as s:
                    yield s
            else:
                with self._sessions.begin() as s:
                    yield s

    def _run(self, doing: str, work: Callable[[Connection], T], *, single: bool = False) -> T:
        """Run ``work`` in a transaction of its own (SQLite: the writer's batch); its result
        comes back once it is durable. ``single``: it runs one statement."""
        with self._guard(doing):
            if self._writer is not None:
                return self._writer.run(work, single=single)
            with self.engine.begin() as conn:
                return work(conn)

    def transaction(self, doing: str, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction of its own (on SQLite, in the writer's batch); its
        result once durable. ``doing`` names it in errors ("failed to <doing>")."""
        return self._run(doing, work)

    def audit_in(self, conn: Connection, **fields: Any) -> None:
        """Append one audit entry inside ``conn``'s transaction (fields as for :meth:`audit`)."""
        self._q.add_audit.run(conn, self._audit_params(**fields))

    def execute(self, doing: str, statement: Any, params: Any = None) -> None:
        """Run one Core statement in a transaction of its own (SQLite: the writer's batch)."""
        self._run(doing, lambda c: c.execute(statement, params), single=True)

    def submit(self, fn: Callable[[], T]) -> Future[T] | None:
        """On SQLite, run ``fn`` (which touches nothing but the journal) on the writer thread in
        its current batch, and return its future; elsewhere ``None``: call it from a worker
        thread, its writes are transactions of their own."""
        return self._writer.submit(fn) if self._writer is not None else None

    def submit_async(self, fn: Callable[[], T]) -> asyncio.Future[T] | None:
        """:meth:`submit` from a coroutine: a future of the running event loop."""
        if self._writer is None:
            return None
        return self._writer.submit_async(fn, asyncio.get_running_loop())

    def _commit_error(self, exc: BaseException) -> BaseException:
        try:
            with self._guard("commit"):
                raise exc
        except BaseException as mapped:  # noqa: BLE001 - returned, raised by each waiter
            return mapped

    @contextmanager
    def reader(self) -> Iterator[Session]:
        with self._guard("read"), self._sessions() as s:
            yield s

    def ping(self) -> None:
        with self.reader() as s:
            s.execute(select(1))

    # locks ---------------------------------------------------------------------------------

    def acquire(self, name: str, owner: str, ttl: timedelta | None = None) -> bool:
        """Take the lease ``name`` if it is free, expired, or ``owner``'s already."""
        return self._run("take a lock", lambda c: self._acquire(c, name, owner, ttl), single=True)

    def _acquire(self, conn: Connection, name: str, owner: str, ttl: timedelta | None) -> bool:
        now = utcnow()
        params = {"p_name": name, "p_owner": owner, "p_now": now, "p_cutoff": now}
        params["p_expires"] = now + (ttl or self.lock_ttl)
        return self._q.acquire.first(conn, params) is not None

    def renew(self, name: str, owner: str, ttl: timedelta | None = None) -> bool:
        """Extend ``owner``'s lease ``name``; False when it expired or is another's (lost)."""
        now = utcnow()
        expires = now + (ttl or self.lock_ttl)
        params = {"p_name": name, "p_owner": owner, "p_now": now, "p_expires": expires}
        renew = self._q.renew
        return bool(self._run("renew a lock", lambda c: renew.run(c, params), single=True))

    def renew_many(self, owners: Sequence[str], ttl: timedelta | None = None) -> set[str]:
        """The heartbeat: extend every live lease these holders have, in one statement; the
        holders whose lease was extended (the others expired or were taken over)."""
        if not owners:
            return set()
        now = utcnow()
        stmt = (
            update(_LOCKS)
            .where(_LOCKS.c.owner.in_(list(owners)), _LOCKS.c.expires_at > now)
            .values(expires_at=now + (ttl or self.lock_ttl))
            .returning(_LOCKS.c.owner)
        )
        rows = self._run("renew the leases", lambda c: c.execute(stmt).all(), single=True)
        return {str(row[0]) for row in rows}

    def release(self, name: str, owner: str) -> None:
        params = {"p_name": name, "p_owner": owner}
        self._run("release a lock", lambda c: self._q.release.run(c, params), single=True)

    def release_many(self, owners: Sequence[str]) -> int:
        """Give back every lease these holders have (a drain); how many there were."""
        if not owners:
            return 0
        stmt = delete(_LOCKS).where(_LOCKS.c.owner.in_(list(owners)))
        return int(
            self._run("release the leases", lambda c: c.execute(stmt).rowcount, single=True)
        )

    def locks(self) -> list[Lock]:
        """Every lease row: live ones, and expired ones whose holder stopped renewing them
        (a crashed or stopped process) and nobody has taken over yet."""
        with self.reader() as s:
            return list(s.scalars(select(Lock).order_by(Lock.name)))

    def steal(self, name: str, owner: str, ttl: timedelta | None = None) -> str | None:
        """Take the lease whoever holds it: an emergency revoke pre-empting a rotation.

        Returns the previous live holder (``None`` when the lease was free, expired or ours).
        That holder's next :meth:`renew` fails, so it stops before its next write outside the
        journal; its writes to the rotation it was driving are refused once the revoke marks it
        superseded (see :meth:`commit_step`).
        """
        if self.acquire(name, owner, ttl):
            return None
        now = utcnow()
        expires = now + (ttl or self.lock_ttl)
        with self.session("take over a lock") as s:
            lock = s.get(Lock, name, with_for_update=True)
            if lock is None:
                s.add(Lock(name=name, owner=owner, acquired_at=now, expires_at=expires))
                return None
            previous = lock.owner if lock.expires_at > now and lock.owner != owner else None
            lock.owner = owner
            lock.acquired_at = now
            lock.expires_at = expires
            return previous

    def lock_holder(self, name: str) -> Lock | None:
        """The lease's live holder, read on the calling thread (what is committed)."""
        with self._guard("read a lock"), self.engine.connect() as conn:
            row = self._q.lock.first(conn, {"p_name": name})
        live = row is not None and row["expires_at"] > utcnow()
        return _instance(Lock, row) if row is not None and live else None

    def begin_drive(self, lease: LeaseKey, environment: str, credential: str) -> DriveStart:
        """Take a credential's lease and read what decides the drive, in one transaction: the
        unfinished revoke, the open rotation and the credential's state (nothing is read when
        the lease is another's)."""

        def work(conn: Connection) -> DriveStart:
            before = self._q.lock.first(conn, {"p_name": lease[0]})
            if not self._acquire(conn, lease[0], lease[1], None):
                return DriveStart(False)
            params = {"p_env": environment, "p_cred": credential}
            state = self._q.state.first(conn, params)
            expired = None
            if before is not None and before["owner"] != lease[1]:
                expired = before["expires_at"]  # it was free to take: it had expired
            return DriveStart(
                True,
                revoke=_maybe_rotation(self._q.open_revoke.first(conn, params)),
                rotation=_maybe_rotation(self._q.open_rotation.first(conn, params)),
                state=None if state is None else _instance(CredentialState, state),
                expired_holder=expired,
            )

        return self._run("take a lock", work)

    def require(self, conn: Connection, lease: LeaseKey | None) -> None:
        """Raise LeaseLost unless ``lease`` is live and its holder's (inside a write)."""
        if lease is None:
            return
        row = self._q.holds.first(conn, _lease_params(lease))
        if row is None or not next(iter(row.values())):
            raise _lost(lease)

    # rotations -----------------------------------------------------------------------------

    def add_rotation(self, rotation: Rotation, *, lease: LeaseKey | None = None) -> Rotation:
        values = {}
        for column in _ROTATIONS.c:
            value = getattr(rotation, column.key)
            default = column.default
            if value is None and isinstance(default, ScalarElementColumnDefault):
                value = default.arg
                setattr(rotation, column.key, value)  # as a flush would
            values[f"p_{column.key}"] = value
        add = self._q.add_rotation

        def work(conn: Connection) -> None:
            self.require(conn, lease)
            add.run(conn, values)

        self._run("record a rotation", work, single=lease is None)
        return rotation

    def update_rotation(
        self, rotation_id: str, *, lease: LeaseKey | None = None, **values: Any
    ) -> Rotation:
        values["updated_at"] = utcnow()
        with self.session("update a rotation") as s:
            self.require(s.connection(), lease)
            row = self._locked_row(s, rotation_id)
            if row.step == Step.SUPERSEDED:
                superseded = True
            else:
                superseded = False
                for key, value in values.items():
                    setattr(row, key, value)
        if superseded:
            raise self._superseded(row)
        return row

    def _locked_row(self, s: Session, rotation_id: str) -> Rotation:
        """The row, read after a write took the row's lock (SQLite: the database's write lock),
        so that what is read cannot change before this transaction commits."""
        s.execute(update(Rotation).where(Rotation.id == rotation_id).values(updated_at=utcnow()))
        row = s.get(Rotation, rotation_id, populate_existing=True)
        if row is None:
            raise JournalError(f"rotation {rotation_id} is not in the journal", where=self.where)
        return row

    def _superseded(self, row: Rotation) -> LockBusy:
        return LockBusy(
            f"rotation {row.id} was superseded by an emergency revoke; this worker stops",
            where=f"{row.environment}/{row.credential}",
            hint="nothing to do: the revoke accounts for this rotation and its token",
        )

    @staticmethod
    def _keep_late_token(s: Session, row: Rotation, values: dict[str, Any]) -> None:
        """A superseded rotation's worker received a token after the revoke took over: keep it
        sealed on the row (never lose a token Makini issued) and say so loudly."""
        if values.get("sealed") is None:
            return
        row.sealed = values["sealed"]
        row.fingerprint = values.get("fingerprint", row.fingerprint)
        row.expires_at = values.get("expires_at", row.expires_at)
        row.notes = json.dumps(
            [
                *row.note_list(),
                "Makini issued a token to this rotation after a revoke superseded it; it is "
                "sealed here until a revoke accounts for it",
            ]
        )
        st = s.get(CredentialState, (row.environment, row.credential))
        if st is None:
            st = CredentialState(environment=row.environment, credential=row.credential)
            s.add(st)
        st.attention = (
            f"a pre-empted rotation received a token after the revoke took over: run "
            f"`rotator revoke {row.environment} {row.credential} --resume` to account for it"
        )

    def commit_step(
        self,
        rotation_id: str,
        values: dict[str, Any],
        *,
        state: dict[str, Any] | None = None,
        audit: dict[str, Any] | None = None,
        audits: Sequence[dict[str, Any]] = (),
        lease: LeaseKey | None = None,
        release: bool = False,
        after: Callable[[Connection, Rotation], None] | None = None,
    ) -> Rotation:
        """Record a step, and optionally the credential state and audit entries, atomically,
        if ``lease`` is still live and its holder's; ``release``: give the lease back in the
        same transaction; ``after(conn, row)``: more work of the same transaction.

        One conditional UPDATE ... RETURNING on the hot path. It changes nothing if an emergency
        revoke superseded the rotation meanwhile (:class:`LockBusy` is raised; a token this step
        carried is kept sealed on the row, see ``_keep_late_token``) or if the lease is lost
        (:class:`LeaseLost`: the caller must account for a token the step carried).
        """

        def work(conn: Connection) -> tuple[Rotation, str]:
            params = {f"p_{key}": value for key, value in values.items()}
            params.update(p_rid=rotation_id, p_updated_at=utcnow())
            if lease is not None:
                params.update(_lease_params(lease))
            stmt = self._step_statement(frozenset(values), fenced=lease is not None)
            found = _maybe_rotation(stmt.first(conn, params))
            if found is None:
                with _joined_session(conn) as s:
                    row = self._locked_row(s, rotation_id)
                    if row.step != Step.SUPERSEDED:
                        return row, "lost"  # the lease is another's: nothing is written
                    self._keep_late_token(s, row, values)
                    s.commit()
                return row, "superseded"
            if state is not None:
                self._upsert_state(conn, found.environment, found.credential, state)
            entries = [*audits, *([audit] if audit is not None else [])]
            if entries:
                where = {"environment": found.environment, "credential": found.credential}
                rows = [self._audit_params(**where, **entry) for entry in entries]
                self._q.add_audit.run_many(conn, rows)
            if after is not None:
                after(conn, found)
            if release and lease is not None:
                self._q.release.run(conn, {"p_name": lease[0], "p_owner": lease[1]})
            return found, "recorded"

        row, outcome = self._run("record a rotation step", work)
        if outcome == "superseded":
            raise self._superseded(row)
        if outcome == "lost":
            assert lease is not None
            raise _lost(lease)
        return row

    def _step_statement(self, keys: frozenset[str], *, fenced: bool) -> _Prepared:
        """The conditional UPDATE ... RETURNING for a set of columns, built once and reused
        with bound parameters (building a statement costs more than running it on SQLite)."""
        stmt = self._step_statements.get((keys, fenced))
        if stmt is None:
            where = [_ROTATIONS.c.id == bindparam("p_rid"), _ROTATIONS.c.step != Step.SUPERSEDED]
            if fenced:
                where.append(self._q.lease_held)
            stmt = self._q.prepare(
                update(_ROTATIONS)
                .where(*where)
                .values({key: bindparam(f"p_{key}") for key in (*sorted(keys), "updated_at")})
                .returning(*_ROTATIONS.c)
            )
            self._step_statements[(keys, fenced)] = stmt
        return stmt

    def _upsert_state(
        self, conn: Connection, environment: str, credential: str, values: dict[str, Any]
    ) -> None:
        """Insert or update a credential's state in one statement (built once per key set)."""
        keys = frozenset(values)
        stmt = self._state_statements.get(keys)
        if stmt is None:
            names = ("environment", "credential", *sorted(keys))
            ins = self._q.insert(_STATES).values({key: bindparam(f"p_{key}") for key in names})
            index = [_STATES.c.environment, _STATES.c.credential]
            stmt = self._q.prepare(
                ins.on_conflict_do_update(
                    index_elements=index, set_={key: ins.excluded[key] for key in sorted(keys)}
                )
                if keys
                else ins.on_conflict_do_nothing(index_elements=index)
            )
            self._state_statements[keys] = stmt
        params = {f"p_{key}": value for key, value in values.items()}
        stmt.run(conn, {**params, "p_environment": environment, "p_credential": credential})

    def add_note(self, rotation_id: str, note: str, *, lease: LeaseKey | None = None) -> None:
        with self.session("annotate a rotation") as s:
            self.require(s.connection(), lease)
            row = s.get(Rotation, rotation_id)
            if row is not None:
                row.notes = json.dumps([*row.note_list(), note])

    def rotation(self, rotation_id: str) -> Rotation | None:
        return self._read_rotation(self._q.rotation, {"p_id": rotation_id})

    def open_rotation(self, environment: str, credential: str) -> Rotation | None:
        return self._read_rotation(
            self._q.open_rotation, {"p_env": environment, "p_cred": credential}
        )

    def _read_rotation(self, stmt: _Prepared, params: dict[str, Any]) -> Rotation | None:
        read = lambda c: _maybe_rotation(stmt.first(c, params))  # noqa: E731
        return self._run("read a rotation", read, single=True)

    def open_rotations(self, environment: str | None = None) -> list[Rotation]:
        with self.reader() as s:
            q = select(Rotation).where(Rotation.step.in_(Step.OPEN))
            if environment:
                q = q.where(Rotation.environment == environment)
            return list(s.scalars(q.order_by(Rotation.started_at)))

    def open_revoke(self, environment: str, credential: str) -> Rotation | None:
        """The unfinished emergency revoke of a credential (``kind="revoke"``), if any."""
        return self._read_rotation(
            self._q.open_revoke, {"p_env": environment, "p_cred": credential}
        )

    def open_revokes(self, environment: str | None = None) -> list[Rotation]:
        """Every unfinished emergency revoke, oldest first."""
        with self.reader() as s:
            q = select(Rotation).where(Rotation.kind == "revoke", Rotation.finished_at.is_(None))
            if environment:
                q = q.where(Rotation.environment == environment)
            return list(s.scalars(q.order_by(Rotation.started_at)))

    def last_rotation(self, environment: str, credential: str) -> Rotation | None:
        with self.reader() as s:
            return s.scalars(
                select(Rotation)
                .where(Rotation.environment == environment, Rotation.credential == credential)
                .order_by(Rotation.started_at.desc())
                .limit(1)
            ).first()

    def rotations(self, environment: str | None = None, limit: int = 100) -> list[Rotation]:
        with self.reader() as s:
            q = select(Rotation)
            if environment:
                q = q.where(Rotation.environment == environment)
            return list(s.scalars(q.order_by(Rotation.started_at.desc()).limit(limit)))

    # credential state ----------------------------------------------------------------------

    def state(self, environment: str, credential: str) -> CredentialState | None:
        with self.reader() as s:
            return s.get(CredentialState, (environment, credential))

    def states(self, environment: str | None = None) -> dict[tuple[str, str], CredentialState]:
        with self.reader() as s:
            q = select(CredentialState)
            if environment:
                q = q.where(CredentialState.environment == environment)
            return {(r.environment, r.credential): r for r in s.scalars(q)}

    def set_state(
        self, environment: str, credential: str, *, lease: LeaseKey | None = None, **values: Any
    ) -> None:
        def work(conn: Connection) -> None:
            self.require(conn, lease)
            self._upsert_state(conn, environment, credential, values)

        self._run("update credential state", work, single=lease is None)

    # audit ---------------------------------------------------------------------------------

    def audit(self, *, actor: str, action: str, outcome: str, **fields: Any) -> None:
        """Append one entry (see ``_audit_values`` for the fields)."""
        row = self._audit_params(actor=actor, action=action, outcome=outcome, **fields)
        add = self._q.add_audit
        self._run("append to the audit log", lambda c: add.run(c, row), single=True)

    @staticmethod
    def _audit_row(**fields: Any) -> AuditEntry:
        """An entry to add to a session (see ``_audit_values`` for the fields)."""
        return AuditEntry(**Journal._audit_values(**fields))

    @staticmethod
    def _audit_params(**fields: Any) -> dict[str, Any]:
        """An entry's values as the bound parameters of ``_Statements.add_audit``."""
        return {f"p_{key}": value for key, value in Journal._audit_values(**fields).items()}

    @staticmethod
    def _audit_values(
        *,
        actor: str,
        action: str,
        outcome: str,
        environment: str | None = None,
        credential: str | None = None,
        version_id: str | None = None,
        fingerprint: str | None = None,
        request_ids: Sequence[str | None] = (),
        **detail: Any,
    ) -> dict[str, Any]:
        return {
            "at": utcnow(),
            "actor": actor,
            "action": action,
            "outcome": outcome,
            "environment": environment,
            "credential": credential,
            "version_id": version_id,
            "fingerprint": fingerprint,
            "request_ids": json.dumps([r for r in request_ids if r]),
            "detail": json.dumps(detail, default=str),
        }

    def audit_entries(
        self,
        *,
        environment: str | None = None,
        credential: str | None = None,
        action: str | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        with self.reader() as s:
            q = select(AuditEntry)
            if environment:
                q = q.where(AuditEntry.environment == environment)
            if credential:
                q = q.where(AuditEntry.credential == credential)
            if action:
                q = q.where(AuditEntry.action == action)
            return list(s.scalars(q.order_by(AuditEntry.id.desc()).limit(limit)))
