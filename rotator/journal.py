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

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rotator.errors import ConfigError, JournalError, LockBusy
from rotator.model import utcnow


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
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return apply


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


_GATHER_S = 0.002


class _GroupCommit:
    """Group commit for SQLite, which has one writer and pays an fsync per commit.

    Each writer runs its work in its own SAVEPOINT inside one shared transaction, then waits
    for a committer thread to commit that transaction; while one commit syncs, the next writers
    gather into the next. A caller returns only once its work is durable, exactly as with a
    commit of its own, but concurrent rotation steps share one fsync.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()  # owns the shared session
        self._cond = threading.Condition()
        self._session: Session | None = None
        self._epoch = 0
        self._done = -1
        self._errors: dict[int, BaseException] = {}
        self._pending = False
        self._closed = False
        self._waiting = 0  # writers queued for the shared session: let them join this batch
        self._thread = threading.Thread(target=self._run, name="journal-commit", daemon=True)
        self._thread.start()

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._cond:
            self._waiting += 1
        with self._lock:
            with self._cond:
                self._waiting -= 1
            if self._session is None:
                self._session = self._sessions()
            session = self._session
            nested = session.begin_nested()
            try:
                yield session
                session.flush()
            except BaseException:
                nested.rollback()
                raise
            nested.commit()
            mine = self._epoch
        with self._cond:
            self._pending = True
            self._cond.notify_all()
            while self._done < mine:
                self._cond.wait()
            error = self._errors.get(mine)
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                # writers already in line join this batch (bounded: a commit waits at most
                # _GATHER_S for them), so that one fsync covers them all
                deadline = time.monotonic() + _GATHER_S
                while self._waiting and time.monotonic() < deadline:
                    self._cond.wait(_GATHER_S / 10)
                self._pending = False
            error: BaseException | None = None
            with self._lock:
                epoch, self._epoch = self._epoch, self._epoch + 1
                session, self._session = self._session, None
                if session is not None:
                    try:
                        session.commit()
                    except BaseException as exc:  # noqa: BLE001 - every writer of this batch gets it
                        error = exc
                        session.rollback()
                    finally:
                        session.close()
            with self._cond:
                if error is not None:
                    self._errors[epoch] = error
                    for old in [e for e in self._errors if e < epoch - 100]:
                        del self._errors[old]
                self._done = epoch
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


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
        self._step_statements: dict[frozenset[str], Any] = {}
        # SQLite has one writer at a time: gather concurrent writers into group commits
        # rather than letting them spin in SQLite's busy handler, one fsync each.
        self._group = _GroupCommit(self._sessions) if self.is_sqlite else None
        if create:
            self.create()

    def create(self) -> None:
        if self.is_sqlite and self.url.startswith("sqlite:///"):
            from pathlib import Path

            path = self.url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._guard("create the journal tables"):
            Base.metadata.create_all(self.engine)

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except JournalError:
            raise
        except OperationalError as exc:
            raise JournalError(
                f"the journal database failed to {doing}: {type(exc.orig).__name__}",
                where=self.where,
                hint="check that the database is reachable and writable",
            ) from exc
        except SQLAlchemyError as exc:
            raise JournalError(
                f"the journal database failed to {doing}: {type(exc).__name__}",
                where=self.where,
            ) from exc

    @contextmanager
    def session(self, doing: str = "write") -> Iterator[Session]:
        """A session whose work is durable when the block exits (rolled back on an error).
        On SQLite the work joins a group commit (see :class:`_GroupCommit`)."""
        with self._guard(doing):
            if self._group is not None:
                with self._group.write() as s:
                    yield s
            else:
                with self._sessions.begin() as s:
                    yield s

    @contextmanager
    def reader(self) -> Iterator[Session]:
        with self._guard("read"), self._sessions() as s:
            yield s

    def ping(self) -> None:
        with self.reader() as s:
            s.execute(select(1))

    # locks ---------------------------------------------------------------------------------

    def acquire(self, name: str, owner: str, ttl: timedelta | None = None) -> bool:
        now = utcnow()
        expires = now + (ttl or self.lock_ttl)
        try:
            with self.session("take a lock") as s:
                s.add(Lock(name=name, owner=owner, acquired_at=now, expires_at=expires))
            return True
        except JournalError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
        with self.session("take a lock") as s:
            result = s.execute(
                update(Lock)
                .where(Lock.name == name)
                .where((Lock.expires_at < now) | (Lock.owner == owner))
                .values(owner=owner, acquired_at=now, expires_at=expires)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def renew(self, name: str, owner: str, ttl: timedelta | None = None) -> bool:
        with self.session("renew a lock") as s:
            result = s.execute(
                update(Lock)
                .where(Lock.name == name, Lock.owner == owner)
                .values(expires_at=utcnow() + (ttl or self.lock_ttl))
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def release(self, name: str, owner: str) -> None:
        with self.session("release a lock") as s:
            lock = s.get(Lock, name)
            if lock is not None and lock.owner == owner:
                s.delete(lock)

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
        with self.reader() as s:
            lock = s.get(Lock, name)
            return lock if lock is not None and lock.expires_at > utcnow() else None

    # rotations -----------------------------------------------------------------------------

    def add_rotation(self, rotation: Rotation) -> Rotation:
        with self.session("record a rotation") as s:
            s.add(rotation)
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
    ) -> Rotation:
        """Record a step, and optionally the credential state and an audit entry, atomically.

        One conditional UPDATE ... RETURNING on the hot path: it changes nothing if an emergency
        revoke superseded the rotation meanwhile, and then :class:`LockBusy` is raised (a token
        this step carried is kept sealed on the row, see ``_keep_late_token``).
        """
        now = utcnow()
        with self.session("record a rotation step") as s:
            row = s.scalars(
                self._step_statement(frozenset(values)),
                {"_rid": rotation_id, **values, "updated_at": now},
                execution_options={"populate_existing": True},
            ).one_or_none()
            superseded = row is None
            if row is None:
                row = self._locked_row(s, rotation_id)
                if row.step != Step.SUPERSEDED:  # pragma: no cover - the WHERE above says so
                    raise JournalError(
                        f"rotation {rotation_id} changed under this step", where=self.where
                    )
                self._keep_late_token(s, row, values)
            else:
                if state is not None:
                    self._upsert_state(s, row.environment, row.credential, state)
                if audit is not None:
                    s.add(
                        self._audit_row(
                            environment=row.environment, credential=row.credential, **audit
                        )
                    )
        if superseded:
            raise self._superseded(row)
        return row

    def _step_statement(self, keys: frozenset[str]) -> Any:
        """The conditional UPDATE ... RETURNING for a set of columns, built once and reused
        with bound parameters (building a statement costs more than running it on SQLite)."""
        stmt = self._step_statements.get(keys)
        if stmt is None:
            stmt = (
                update(Rotation)
                .where(Rotation.id == bindparam("_rid"), Rotation.step != Step.SUPERSEDED)
                .values({key: bindparam(key) for key in (*sorted(keys), "updated_at")})
                .returning(Rotation)
            )
            self._step_statements[keys] = stmt
        return stmt

    def _upsert_state(
        self, s: Session, environment: str, credential: str, values: dict[str, Any]
    ) -> None:
        """Insert or update a credential's state in one statement."""
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert: Any = sqlite.insert if self.is_sqlite else postgresql.insert
        stmt = dialect_insert(CredentialState).values(
            environment=environment, credential=credential, **values
        )
        s.execute(
            stmt.on_conflict_do_update(
                index_elements=[CredentialState.environment, CredentialState.credential],
                set_={key: stmt.excluded[key] for key in values},
            )
        )

    def add_note(self, rotation_id: str, note: str) -> None:
        with self.session("annotate a rotation") as s:
            row = s.get(Rotation, rotation_id)
            if row is not None:
                row.notes = json.dumps([*row.note_list(), note])

    def rotation(self, rotation_id: str) -> Rotation | None:
        with self.reader() as s:
            return s.get(Rotation, rotation_id)

    def open_rotation(self, environment: str, credential: str) -> Rotation | None:
        with self.reader() as s:
            return s.scalars(
                select(Rotation)
                .where(
                    Rotation.environment == environment,
                    Rotation.credential == credential,
                    Rotation.step.in_(Step.OPEN),
                )
                .order_by(Rotation.started_at.desc())
                .limit(1)
            ).first()

    def open_rotations(self, environment: str | None = None) -> list[Rotation]:
        with self.reader() as s:
            q = select(Rotation).where(Rotation.step.in_(Step.OPEN))
            if environment:
                q = q.where(Rotation.environment == environment)
            return list(s.scalars(q.order_by(Rotation.started_at)))

    def open_revoke(self, environment: str, credential: str) -> Rotation | None:
        """The unfinished emergency revoke of a credential (``kind="revoke"``), if any."""
        with self.reader() as s:
            return s.scalars(
                select(Rotation)
                .where(
                    Rotation.kind == "revoke",
                    Rotation.environment == environment,
                    Rotation.credential == credential,
                    Rotation.finished_at.is_(None),
                )
                .order_by(Rotation.started_at.desc())
                .limit(1)
            ).first()

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
        with self.session("update credential state") as s:
            row = s.get(CredentialState, (environment, credential))
            if row is None:
                row = CredentialState(environment=environment, credential=credential)
                s.add(row)
            for key, value in values.items():
                setattr(row, key, value)

    # audit ---------------------------------------------------------------------------------

    def audit(self, *, actor: str, action: str, outcome: str, **fields: Any) -> None:
        """Append one entry (see ``_audit_row`` for the fields)."""
        with self.session("append to the audit log") as s:
            s.add(self._audit_row(actor=actor, action=action, outcome=outcome, **fields))

    @staticmethod
    def _audit_row(
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
    ) -> AuditEntry:
        return AuditEntry(
            at=utcnow(),
            actor=actor,
            action=action,
            outcome=outcome,
            environment=environment,
            credential=credential,
            version_id=version_id,
            fingerprint=fingerprint,
            request_ids=json.dumps([r for r in request_ids if r]),
            detail=json.dumps(detail, default=str),
        )

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
