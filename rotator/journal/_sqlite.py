"""How the journal goes fast and safe on SQLite (private to :mod:`rotator.journal`).

* the connection's pragmas (WAL, busy timeout, ``synchronous``) and ``BEGIN IMMEDIATE`` for the
  writer's transactions;
* the hot path's statements, built once and, on SQLite, compiled once and run on the DBAPI
  connection (:class:`Prepared`, :class:`Statements`);
* the single writer thread that gathers concurrent writes into group commits, with a savepoint
  replay when one piece of a batch fails (:class:`Writer`), and the file lock beside the
  journal that gives the processes sharing it their turns;
* the journal file and folder, made private (0600, 0700) before SQLite opens them.

:class:`rotator.journal.Journal` is the only user; callers never choose between these paths.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, delete, insert, literal, or_, select, update
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Session

from rotator.errors import JournalError
from rotator.journal.rows import Step
from rotator.journal.schema import AuditEntry, CredentialState, Lock, Rotation, UTCDateTime

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's busy handler alone orders the writers
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


def pragmas(synchronous: str) -> Any:
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


WRITER_FLAG = "rotator_journal_writer"


def begin_immediate(conn: Any) -> None:
    # The writer's batches read before they write. A deferred BEGIN would take a read snapshot,
    # and SQLite refuses to upgrade a snapshot that another process wrote past (SQLITE_BUSY at
    # once, without waiting): two processes on one journal would fail each other's batches.
    # BEGIN IMMEDIATE waits (busy_timeout) for the write lock first.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get(WRITER_FLAG) else "BEGIN")


_ROTATIONS = cast(Table, Rotation.__table__)
_LOCKS = cast(Table, Lock.__table__)
_STATES = cast(Table, CredentialState.__table__)
_AUDIT = cast(Table, AuditEntry.__table__)


def joined_session(conn: Connection) -> Session:
    """An ORM session inside the transaction ``conn`` is in (its work in a savepoint)."""
    return Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)


class Prepared:
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


class Statements:
    """The hot path's statements, built once with bound parameters (see :class:`Prepared`)."""

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

    def prepare(self, statement: Any) -> Prepared:
        return Prepared(statement, self.dialect)


_BATCH_MAX = 256

_Target = Future[Any] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
"""Where a work's result goes: a thread's future, or an event loop's (delivered per batch)."""
_Work = tuple[Callable[[], Any], _Target, bool]


class Writer:
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
            with joined_session(self._conn) as s:
                yield s
                s.commit()
            return
        lent: Future[Session] = Future()
        back = threading.Event()
        failed: list[BaseException] = []

        def lend(conn: Connection) -> None:
            with joined_session(conn) as s:
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
                conn.info.pop(WRITER_FLAG, None)
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
            self._conn.info[WRITER_FLAG] = True
        with self._turn():
            return self._commit_batch(self._conn, batch)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This process's turn to write, among the processes sharing the journal file.

        SQLite's busy handler polls for the write lock with growing sleeps (1, 2, 5, ... 100
        ms), so a writer that found the lock taken sleeps on long after it is free (two
        ``run-due`` processes on one journal take a quarter longer than on two, without it). A
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


def sqlite_file(url: str) -> str | None:
    """The file of a SQLite journal URL (None for PostgreSQL or an in-memory database)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def prepare_file(path: Path, where: str) -> None:
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


