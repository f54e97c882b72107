"""The journal's domain API: rotations and their steps, credential state, the audit log, leases
and the emergency revokes' records.

SQLAlchemy 2 over SQLite by default (one file, zero setup) or PostgreSQL when several replicas
run. Token material appears here only sealed (``Rotation.sealed``) and only between *issue* and
*promote*; everything else names tokens by fingerprint.

Locks are leases in a table (``locks``): portable across SQLite and PostgreSQL, they survive a
crashed holder by expiring, and a worker renews its lease before every step that writes
outside the journal, so a worker that lost its lease stops instead of racing the new holder.

Time is read only through the :class:`~rotator.clock.Clock` the journal is given.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from rotator.clock import SYSTEM, Clock
from rotator.errors import ConfigError, JournalError, LeaseLost, Superseded
from rotator.journal import migrate as migrations
from rotator.journal._sqlite import (
    Prepared,
    Statements,
    Writer,
    begin_immediate,
    joined_session,
    pragmas,
    prepare_file,
    sqlite_file,
)
from rotator.journal.rows import Step
from rotator.journal.schema import (
    AuditEntry,
    Base,
    CredentialState,
    Lock,
    RevokeRecord,
    Rotation,
)

if TYPE_CHECKING:
    from rotator.settings import JournalSettings

T = TypeVar("T")
_ROTATIONS = cast(Table, Rotation.__table__)
_LOCKS = cast(Table, Lock.__table__)
_STATES = cast(Table, CredentialState.__table__)
M = TypeVar("M", bound=Base)


def _instance(cls: type[M], row: Mapping[str, Any]) -> M:
    """A row as a (detached) instance of ``cls``, built the way the ORM loads one: without an
    attribute event per column, which costs more than the query on the hot path."""
    instance: M = manager_of_class(cls).new_instance()
    instance.__dict__.update(row)
    return instance


def _maybe_rotation(row: Mapping[str, Any] | None) -> Rotation | None:
    return None if row is None else _instance(Rotation, row)


# times as text: the same comparison, without a datetime parsed per value (PostgreSQL: 30 ms
# of serve's CPU per read at 10,000 credentials, 9 ms as text)
_PLAN_STATES = (
    "SELECT environment, credential, current_version_id, CAST(expires_at AS TEXT), "
    "CAST(rotated_at AS TEXT), CAST(last_attempt_at AS TEXT), last_outcome "
    "FROM credential_state ORDER BY environment, credential"
)
_PLAN_ROTATIONS = (
    "SELECT id, environment, credential, kind, step, CAST(retire_after AS TEXT), "
    "CAST(started_at AS TEXT), CAST(finished_at AS TEXT) FROM rotations WHERE "
)
_OPEN_STEPS = ", ".join(f"'{step}'" for step in sorted(Step.OPEN))


def _plan_rows(cursor: Any) -> tuple[object, ...]:
    """The plan's journal inputs through a DB-API cursor (see :meth:`Journal.plan_inputs`)."""
    read = []
    for query in (
        _PLAN_STATES,
        f"{_PLAN_ROTATIONS}step IN ({_OPEN_STEPS}) ORDER BY id",
        f"{_PLAN_ROTATIONS}kind = 'revoke' AND finished_at IS NULL ORDER BY id",
    ):
        cursor.execute(query)
        read.append(tuple(map(tuple, cursor.fetchall())))
    return tuple(read)


class _PlanWatch:
    """A SQLite journal's plan inputs, read again only when a commit happened since: its own
    connection, used for nothing else, whose ``PRAGMA data_version`` changes with every
    commit of any other connection (the writer's, another process's)."""

    def __init__(self, database: str) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._database = database
        self._seen: tuple[int, tuple[object, ...]] | None = None

    def _version(self) -> tuple[sqlite3.Connection, int]:
        """The connection (opened on first use) and its data version; the lock is held."""
        if self._conn is None:
            self._conn = sqlite3.connect(
                self._database, timeout=30, isolation_level=None, check_same_thread=False
            )
        return self._conn, int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def version(self) -> int:
        """A number that moves with every commit of another connection."""
        with self._lock:
            return self._version()[1]

    def inputs(self) -> tuple[object, ...]:
        with self._lock:
            conn, version = self._version()
            if self._seen is not None and self._seen[0] == version:
                return self._seen[1]
            cursor = conn.cursor()
            try:
                cursor.execute("BEGIN")  # one snapshot for the three reads
                try:
                    read = _plan_rows(cursor)
                finally:
                    conn.rollback()  # it wrote nothing: end the snapshot either way
            finally:
                cursor.close()
            self._seen = (version, read)  # a commit after the pragma moves it: read again
            return read

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._seen = None


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


def _lease_params(lease: LeaseKey, now: datetime) -> dict[str, Any]:
    return {"p_lease": lease[0], "p_lease_owner": lease[1], "p_lease_now": now}


def _lost(lease: LeaseKey) -> LeaseLost:
    return LeaseLost(
        "this worker no longer holds the credential's lease (it expired or another worker "
        "took it over): the journal refused its write",
        where=lease[0],
        hint="nothing to do: the worker that holds the lease resumes from the last step",
    )


class Journal:
    def __init__(
        self,
        url: str,
        *,
        lock_ttl: timedelta = timedelta(seconds=15),
        sqlite_synchronous: str = "full",
        migrate: migrations.Mode = "auto",
        clock: Clock = SYSTEM,
    ) -> None:
        """Open the journal at ``url``, bringing its schema to this release's (``migrate``:
        see :mod:`rotator.journal.migrate`). A SQLite file and the folders made for it are
        private to this user (0600, 0700) whatever the umask. ``clock`` is the only source of
        time (lease expiry, ``updated_at``, audit times). Raises JournalError or ConfigError,
        naming the journal and what to do."""
        self.url = url
        self.clock = clock
        self.lock_ttl = lock_ttl
        self.where = f"journal {redact_url(url)}"
        database = sqlite_file(url)
        if database is not None:
            prepare_file(Path(database), self.where)
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
            event.listen(self.engine, "connect", pragmas(sqlite_synchronous))
            event.listen(self.engine, "begin", begin_immediate)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._q = Statements(self.engine.dialect)
        self.dialect_insert: Any = self._q.insert
        """The dialect's ``insert`` (with ``on_conflict_do_update``), for upserts."""
        configure_mappers()  # _instance builds instances without the ORM's first query
        self._step_statements: dict[tuple[frozenset[str], bool], Prepared] = {}
        self._state_statements: dict[frozenset[str], Prepared] = {}
        self.migrate_lock = f"{database}-migrate" if database is not None else None
        self._watch = _PlanWatch(database) if database is not None else None
        try:
            migrations.ensure(self.engine, self.where, migrate, self.migrate_lock)
        except BaseException:
            self.engine.dispose()
            raise
        # SQLite has one writer at a time: gather concurrent writers into group commits
        # rather than letting them spin in SQLite's busy handler, one fsync each.
        self._writer: Writer | None = None
        if self.is_sqlite:
            turn_file = f"{database}-writer" if database is not None else None
            self._writer = Writer(self.engine, self._commit_error, turn_file)

    @classmethod
    def open(cls, settings: JournalSettings, clock: Clock = SYSTEM) -> Journal:
        """The journal a configuration names, with its settings."""
        return cls(
            settings.url,
            lock_ttl=settings.lock_ttl,
            sqlite_synchronous=settings.sqlite_synchronous,
            migrate=settings.migrate,
            clock=clock,
        )

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
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
            # a prepared statement (see Prepared) raises the driver's own errors
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
        On SQLite the work joins the writer's shared transaction (see :class:`Writer`)."""
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
        now = self.clock.now()
        params = {"p_name": name, "p_owner": owner, "p_now": now, "p_cutoff": now}
        params["p_expires"] = now + (ttl or self.lock_ttl)
        return self._q.acquire.first(conn, params) is not None

    def renew(self, name: str, owner: str, ttl: timedelta | None = None) -> bool:
        """Extend ``owner``'s lease ``name``; False when it expired or is another's (lost)."""
        now = self.clock.now()
        expires = now + (ttl or self.lock_ttl)
        params = {"p_name": name, "p_owner": owner, "p_now": now, "p_expires": expires}
        renew = self._q.renew
        return bool(self._run("renew a lock", lambda c: renew.run(c, params), single=True))

    def renew_in(
        self, conn: Connection, name: str, owner: str, ttl: timedelta | None = None
    ) -> bool:
        """:meth:`renew` inside ``conn``'s transaction (work that must stop once its lease is
        another's, and extends it as it goes)."""
        now = self.clock.now()
        expires = now + (ttl or self.lock_ttl)
        params = {"p_name": name, "p_owner": owner, "p_now": now, "p_expires": expires}
        return bool(self._q.renew.run(conn, params))

    def renew_many(self, owners: Sequence[str], ttl: timedelta | None = None) -> set[str]:
        """The heartbeat: extend every live lease these holders have, in one statement; the
        holders whose lease was extended (the others expired or were taken over)."""
        if not owners:
            return set()
        now = self.clock.now()
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
        now = self.clock.now()
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
        live = row is not None and row["expires_at"] > self.clock.now()
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
        row = self._q.holds.first(conn, _lease_params(lease, self.clock.now()))
        if row is None or not next(iter(row.values())):
            raise _lost(lease)

    # rotations -----------------------------------------------------------------------------

    def add_rotation(
        self,
        rotation: Rotation,
        *,
        lease: LeaseKey | None = None,
        audit: dict[str, Any] | None = None,
    ) -> Rotation:
        """Record a new rotation (under ``lease``), with its ``audit`` entry in the same
        transaction when given (fields as for :meth:`audit`)."""
        values = {}
        for column in _ROTATIONS.c:
            value = getattr(rotation, column.key)
            default = column.default
            if value is None and isinstance(default, ScalarElementColumnDefault):
                value = default.arg
                setattr(rotation, column.key, value)  # as a flush would
            values[f"p_{column.key}"] = value
        add = self._q.add_rotation

        entry = None
        if audit is not None:
            where = {"environment": rotation.environment, "credential": rotation.credential}
            entry = self._audit_params(**where, **audit)
        add_audit = self._q.add_audit

        def work(conn: Connection) -> None:
            self.require(conn, lease)
            add.run(conn, values)
            if entry is not None:
                add_audit.run(conn, entry)

        self._run("record a rotation", work, single=lease is None and entry is None)
        return rotation

    def update_rotation(
        self, rotation_id: str, *, lease: LeaseKey | None = None, **values: Any
    ) -> Rotation:
        values["updated_at"] = self.clock.now()
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
        now = self.clock.now()
        s.execute(update(Rotation).where(Rotation.id == rotation_id).values(updated_at=now))
        row = s.get(Rotation, rotation_id, populate_existing=True)
        if row is None:
            raise JournalError(f"rotation {rotation_id} is not in the journal", where=self.where)
        return row

    def _superseded(self, row: Rotation) -> Superseded:
        return Superseded(
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
            now = self.clock.now()
            params.update(p_rid=rotation_id, p_updated_at=now)
            if lease is not None:
                params.update(_lease_params(lease, now))
            stmt = self._step_statement(frozenset(values), fenced=lease is not None)
            found = _maybe_rotation(stmt.first(conn, params))
            if found is None:
                with joined_session(conn) as s:
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

    def _step_statement(self, keys: frozenset[str], *, fenced: bool) -> Prepared:
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

    def _read_rotation(self, stmt: Prepared, params: dict[str, Any]) -> Rotation | None:
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

    def plan_inputs(self) -> tuple[object, ...]:
        """What :func:`rotator.rotation.schedule.plan` reads from the journal, as the driver's
        raw rows (no ORM objects, no type conversion): every credential state's planned
        columns and every open rotation and open revoke. Equal results mean the plan's journal
        inputs are unchanged, whichever process or release wrote (a version, a failure, a
        rotation's step, a retire time): :class:`rotator.rotation.schedule.Planner` compares
        them. On SQLite the rows are read again only when some connection committed since the
        last read (``PRAGMA data_version`` on a connection of its own, which never writes)."""
        with self._guard("read the plan's inputs"):
            if self._watch is not None:
                return self._watch.inputs()
            with self.engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    return _plan_rows(cursor)
                finally:
                    cursor.close()

    def commit_mark(self) -> int | None:
        """SQLite: a number that moves whenever a connection commits (``PRAGMA data_version`` on
        the connection :meth:`plan_inputs` reads with, which never writes). A reader that took
        the mark before it last read, and sees the same mark now, has nothing new to read.
        None on PostgreSQL (NOTIFY tells a reader what changed)."""
        if self._watch is None:
            return None
        with self._guard("read the journal's commit mark"):
            return self._watch.version()

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

    def audit_row(self, **fields: Any) -> AuditEntry:
        """An entry to add to a session of :meth:`session` (fields as for :meth:`audit`)."""
        return AuditEntry(**self._audit_values(**fields))

    def _audit_params(self, **fields: Any) -> dict[str, Any]:
        """An entry's values as the bound parameters of ``Statements.add_audit``."""
        return {f"p_{key}": value for key, value in self._audit_values(**fields).items()}

    def _audit_values(
        self,
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
            "at": self.clock.now(),
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
        limit: int | None = 100,
        since: datetime | None = None,
        until: datetime | None = None,
        after: int | None = None,
        through: int | None = None,
        oldest_first: bool = False,
    ) -> list[AuditEntry]:
        """Audit entries, newest first (``oldest_first``: in sequence order, for shipping).

        ``action``: one action (``rotation.promoted``) or a family (``rotation`` or
        ``rotation.*``). ``since``/``until``: ``at`` within them. ``after``/``through``:
        the entry's sequence number (``id``) above ``after``, at most ``through``.
        """
        with self.reader() as s:
            q = select(AuditEntry)
            if environment:
                q = q.where(AuditEntry.environment == environment)
            if credential:
                q = q.where(AuditEntry.credential == credential)
            if action:
                family = action.removesuffix(".*")
                if "." in family:
                    q = q.where(AuditEntry.action == action)
                else:
                    q = q.where(AuditEntry.action.startswith(family + ".", autoescape=True))
            if since is not None:
                q = q.where(AuditEntry.at >= since)
            if until is not None:
                q = q.where(AuditEntry.at <= until)
            if after is not None:
                q = q.where(AuditEntry.id > after)
            if through is not None:
                q = q.where(AuditEntry.id <= through)
            order = AuditEntry.id.asc() if oldest_first else AuditEntry.id.desc()
            q = q.order_by(order)
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q))

    def audit_settled(self) -> int:
        """The highest sequence number below which the audit log has no gap left to fill: every
        entry up to it is committed, and no entry with a lower number can appear later. A
        reader that ships entries up to it and then resumes after it misses none.

        On SQLite writers take turns, so numbers are committed in order. On PostgreSQL a number
        is drawn when an entry is inserted and committed with its transaction, so a higher
        number may be visible before a lower one: a SHARE lock on the table waits for every
        transaction that is inserting into it (they hold ROW EXCLUSIVE) and holds new ones off
        for the length of one ``max(id)``."""
        top = func.coalesce(func.max(AuditEntry.id), 0)
        if self.is_sqlite:
            with self.reader() as s:
                return int(s.execute(select(top)).scalar_one())
        with self._guard("read the audit log"), self.engine.begin() as conn:
            conn.execute(text("LOCK TABLE audit IN SHARE MODE"))
            return int(conn.execute(select(top)).scalar_one())

    def audit_names(self) -> tuple[set[str], set[str]]:
        """The environments and the actions the audit log holds entries of."""
        with self.reader() as s:
            envs = s.scalars(select(AuditEntry.environment).distinct())
            found_envs = {e for e in envs if e}
            actions = set(s.scalars(select(AuditEntry.action).distinct()))
        return found_envs, actions

    # emergency revokes' records ----------------------------------------------------------------

    def save_revoke_record(
        self, rotation_id: str, record: Mapping[str, Any], *, lease: LeaseKey | None = None
    ) -> None:
        """Record the decisions of the revoke ``rotation_id`` (``record``: the dict
        ``rotator.revoke`` builds of them), replacing what it recorded before, if ``lease`` is
        still live and its holder's. Raises ValueError for a field the table does not have."""
        values = _record_values(record)

        def work(conn: Connection) -> None:
            self.require(conn, lease)
            self._save_revoke_record(conn, rotation_id, values)

        self._run("record a revoke's decisions", work)

    def save_revoke_record_in(
        self, conn: Connection, rotation_id: str, record: Mapping[str, Any]
    ) -> None:
        """:meth:`save_revoke_record` inside ``conn``'s transaction."""
        self._save_revoke_record(conn, rotation_id, _record_values(record))

    def _save_revoke_record(
        self, conn: Connection, rotation_id: str, values: dict[str, Any]
    ) -> None:
        now = self.clock.now()
        rec = _RECORDS.c
        changed = conn.execute(
            update(_RECORDS).where(rec.rotation_id == rotation_id).values(updated_at=now, **values)
        ).rowcount
        if changed:
            return
        rot = _ROTATIONS.c
        found = conn.execute(
            select(rot.environment, rot.credential).where(rot.id == rotation_id)
        ).first()
        if found is None:
            raise JournalError(f"rotation {rotation_id} is not in the journal", where=self.where)
        conn.execute(
            _RECORDS.insert().values(
                rotation_id=rotation_id,
                environment=found.environment,
                credential=found.credential,
                updated_at=now,
                **values,
            )
        )

    def revoke_record(self, rotation_id: str) -> dict[str, Any] | None:
        """The decisions the revoke ``rotation_id`` recorded last, as the dict
        :meth:`save_revoke_record` was given (None: it recorded none)."""
        with self.reader() as s:
            row = s.get(RevokeRecord, rotation_id)
            return None if row is None else _record_dict(row)


_RECORDS = cast(Table, RevokeRecord.__table__)
_RECORD_FIELDS = (
    "strategy",
    "method",
    "escalate",
    "replace",
    "target_stage",
    "current_version",
    "superseded",
    "adopted",
    "disconnected",
    "replaced",
)
_RECORD_DEFAULTS: dict[str, Any] = {
    "superseded": [],
    "adopted": None,
    "disconnected": False,
    "replaced": None,
}


def _record_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """A revoke's record as the columns of ``revoke_records``."""
    unknown = sorted(set(record) - set(_RECORD_FIELDS))
    missing = sorted(set(_RECORD_FIELDS) - set(record) - set(_RECORD_DEFAULTS))
    if unknown or missing:
        raise ValueError(
            f"a revoke record does not fit the revoke_records table: unknown fields {unknown}, "
            f"missing fields {missing}"
        )
    values = {**_RECORD_DEFAULTS, **record}
    values["superseded"] = json.dumps(list(values["superseded"]), separators=(",", ":"))
    return values


def _record_dict(row: RevokeRecord) -> dict[str, Any]:
    record = {name: getattr(row, name) for name in _RECORD_FIELDS}
    record["superseded"] = json.loads(row.superseded or "[]")
    return record
