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
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

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

from rotator.errors import ConfigError, JournalError, LockBusy
from rotator.model import utcnow

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
    DONE = "done"  # old version retired
    ROLLED_BACK = "rolled_back"  # verify rejected the new token; pending removed
    FAILED = "failed"  # stopped; needs a person (see error)
    SUPERSEDED = "superseded"  # pre-empted by a revoke

    OPEN = (STARTED, ISSUED, STAGED, VERIFIED, PROMOTED)
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
    owner: Mapped[str] = mapped_column(String(100))
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
        self.renew = prepare(update(_LOCKS).where(mine).values(expires_at=bindparam("p_expires")))
        self.release = prepare(delete(_LOCKS).where(mine))
        self.lock = prepare(select(_LOCKS).where(_LOCKS.c.name == bindparam("p_name")))
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


class Journal:
    def __init__(
        self,
        url: str,
        *,
        lock_ttl: timedelta = timedelta(minutes=5),
        sqlite_synchronous: str = "full",
        create: bool = True,
    ) -> None:
        self.url = url
        self.lock_ttl = lock_ttl
        self.where = f"journal {redact_url(url)}"
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
        self._step_statements: dict[frozenset[str], _Prepared] = {}
        self._state_statements: dict[frozenset[str], _Prepared] = {}
        # SQLite has one writer at a time: gather concurrent writers into group commits
        # rather than letting them spin in SQLite's busy handler, one fsync each.
        self._writer: _Writer | None = None
        if self.is_sqlite:
            database = self.engine.url.database
            turn_file = f"{database}-writer" if database and database != ":memory:" else None
            self._writer = _Writer(self.engine, self._commit_error, turn_file)
        if create:
            self.create()

    def create(self) -> None:
        if self.is_sqlite and self.url.startswith("sqlite:///"):
            from pathlib import Path

            path = self.url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._guard("create the journal tables"), self.engine.connect() as conn:
            # one transaction holding the write lock: processes starting together on a new
            # SQLite journal would otherwise each find a table missing and create it twice
            conn.info[_WRITER] = True
            try:
                with conn.begin():
                    Base.metadata.create_all(conn)
                    # create_all adds missing tables, not the indexes added to existing ones
                    for table in Base.metadata.sorted_tables:
                        for index in table.indexes:
                            index.create(conn, checkfirst=True)
            finally:
                conn.info.pop(_WRITER, None)

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
        expires = utcnow() + (ttl or self.lock_ttl)
        params = {"p_name": name, "p_owner": owner, "p_expires": expires}
        renew = self._q.renew
        return bool(self._run("renew a lock", lambda c: renew.run(c, params), single=True))

    def release(self, name: str, owner: str) -> None:
        params = {"p_name": name, "p_owner": owner}
        self._run("release a lock", lambda c: self._q.release.run(c, params), single=True)

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

    def begin_drive(
        self, lock: str, owner: str, environment: str, credential: str
    ) -> tuple[bool, Rotation | None, Rotation | None]:
        """Take a credential's lease and read what is open for it, in one transaction:
        ``(taken, unfinished revoke, open rotation)`` (nothing is read when not taken)."""

        def work(conn: Connection) -> tuple[bool, Rotation | None, Rotation | None]:
            if not self._acquire(conn, lock, owner, None):
                return False, None, None
            params = {"p_env": environment, "p_cred": credential}
            revoke = _maybe_rotation(self._q.open_revoke.first(conn, params))
            return True, revoke, _maybe_rotation(self._q.open_rotation.first(conn, params))

        return self._run("take a lock", work)

    # rotations -----------------------------------------------------------------------------

    def add_rotation(self, rotation: Rotation) -> Rotation:
        values = {}
        for column in _ROTATIONS.c:
            value = getattr(rotation, column.key)
            default = column.default
            if value is None and isinstance(default, ScalarElementColumnDefault):
                value = default.arg
                setattr(rotation, column.key, value)  # as a flush would
            values[f"p_{column.key}"] = value
        add = self._q.add_rotation
        self._run("record a rotation", lambda c: add.run(c, values), single=True)
        return rotation

    def update_rotation(self, rotation_id: str, **values: Any) -> Rotation:
        values["updated_at"] = utcnow()
        with self.session("update a rotation") as s:
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
        release: tuple[str, str] | None = None,
    ) -> Rotation:
        """Record a step, and optionally the credential state and audit entries, atomically;
        ``release``: give the lease ``(name, owner)`` back in the same transaction.

        One conditional UPDATE ... RETURNING on the hot path: it changes nothing if an emergency
        revoke superseded the rotation meanwhile, and then :class:`LockBusy` is raised (a token
        this step carried is kept sealed on the row, see ``_keep_late_token``).
        """

        def work(conn: Connection) -> tuple[Rotation, bool]:
            params = {f"p_{key}": value for key, value in values.items()}
            params.update(p_rid=rotation_id, p_updated_at=utcnow())
            found = _maybe_rotation(self._step_statement(frozenset(values)).first(conn, params))
            if found is None:
                with _joined_session(conn) as s:
                    row = self._locked_row(s, rotation_id)
                    if row.step != Step.SUPERSEDED:  # pragma: no cover - the WHERE above says so
                        raise JournalError(
                            f"rotation {rotation_id} changed under this step", where=self.where
                        )
                    self._keep_late_token(s, row, values)
                    s.commit()
                return row, True
            if state is not None:
                self._upsert_state(conn, found.environment, found.credential, state)
            entries = [*audits, *([audit] if audit is not None else [])]
            if entries:
                where = {"environment": found.environment, "credential": found.credential}
                rows = [self._audit_params(**where, **entry) for entry in entries]
                self._q.add_audit.run_many(conn, rows)
            if release is not None:
                self._q.release.run(conn, {"p_name": release[0], "p_owner": release[1]})
            return found, False

        row, superseded = self._run("record a rotation step", work)
        if superseded:
            raise self._superseded(row)
        return row

    def _step_statement(self, keys: frozenset[str]) -> _Prepared:
        """The conditional UPDATE ... RETURNING for a set of columns, built once and reused
        with bound parameters (building a statement costs more than running it on SQLite)."""
        stmt = self._step_statements.get(keys)
        if stmt is None:
            stmt = self._q.prepare(
                update(_ROTATIONS)
                .where(_ROTATIONS.c.id == bindparam("p_rid"), _ROTATIONS.c.step != Step.SUPERSEDED)
                .values({key: bindparam(f"p_{key}") for key in (*sorted(keys), "updated_at")})
                .returning(*_ROTATIONS.c)
            )
            self._step_statements[keys] = stmt
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

    def add_note(self, rotation_id: str, note: str) -> None:
        with self.session("annotate a rotation") as s:
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

    def set_state(self, environment: str, credential: str, **values: Any) -> None:
        self._run(
            "update credential state",
            lambda c: self._upsert_state(c, environment, credential, values),
            single=True,
        )

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
