"""Retention: deleting the journal's history once it is older than the configuration keeps it.

What each table keeps, whatever its age:

``rotations`` (and their ``revoke_records``)
    only finished rows are pruned (a rotation in a terminal step, a revoke with ``finished_at``),
    by ``finished_at``. Kept: any row still holding a sealed token; every row of a credential
    with an open rotation or an unfinished revoke (a revoke's record names the rotations it
    superseded); each credential's latest rotation and latest revoke (``status`` and the
    notifier read them); the rotation that made the credential's current version; a rotation
    an open unaccounted token names.
``audit``
    by ``at``; the entry with the highest sequence number always stays, so a SQLite journal
    never hands a number out twice and a SIEM cursor (``rotator audit --jsonl --cursor-file``)
    past pruned entries carries on with the next one.
``webhook_events``
    processed ones (done, ignored, failed) by ``received_at``; pending and in-work ones stay.
``unaccounted_tokens``
    closed ones (resolved, acknowledged) by ``closed_at``; open ones stay.
``reader_reads``
    by ``last_at``, never within the readers' active window.
Left alone: ``credential_state``, ``locks``, ``reader_keys``, ``token_drops``,
``notify_conditions`` (one row per thing, not history), ``discovered_connections`` (a purged
credential's name stays taken), ``notify_outbox`` (the notifier forgets what it delivered).

Every batch is a transaction of its own (on SQLite, one piece of the writer's group commit), so
no writer waits long and a pass that dies has committed what it deleted: the next pass goes on.
One process prunes at a time (the lease :data:`LEASE`); were two to, each batch deletes what is
still there, which is harmless.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, and_, delete, exists, func, or_, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from rotator.errors import LockBusy, RotatorError
from rotator.faults import checkpoint
from rotator.journal.rows import Step
from rotator.journal.schema import (
    AuditEntry,
    CredentialState,
    ReaderRead,
    RevokeRecord,
    Rotation,
    UnaccountedToken,
    WebhookEvent,
)

if TYPE_CHECKING:
    from rotator.journal.store import Journal
    from rotator.settings import RetentionSettings

LEASE = "journal/prune"
"""The lease a pruning process holds (in ``locks``): one at a time, across replicas."""

TABLES = (
    "rotations",
    "revoke_records",
    "audit",
    "webhook_events",
    "unaccounted_tokens",
    "reader_reads",
)
"""The tables pruned, in the order they are."""

_ROT = cast(Table, Rotation.__table__)
_RECORDS = cast(Table, RevokeRecord.__table__)
_AUDIT = cast(Table, AuditEntry.__table__)
_STATES = cast(Table, CredentialState.__table__)
_UNACCOUNTED = cast(Table, UnaccountedToken.__table__)
_WEBHOOKS = cast(Table, WebhookEvent.__table__)
_READS = cast(Table, ReaderRead.__table__)

BATCH_TARGET_S = 0.05
"""A batch that takes longer than this is halved for the next (a rotation's row carries six
indexes: deleting a thousand takes a few hundred milliseconds on SQLite), one much quicker
doubled back up to ``journal.retention.batch``: other writers wait at most about this long."""

_REVOKE = "revoke"  # Rotation.kind of an emergency revoke (rotator.revoke.model.KIND)
_OPEN_UNACCOUNTED = "open"  # rotator.rotation.unaccounted.OPEN
_PROCESSED_WEBHOOKS = ("done", "ignored", "failed")  # rotator.webhooks.queue


@dataclass(frozen=True)
class Cutoffs:
    """Rows older than these go (``None``: that history is kept forever)."""

    audit: datetime | None
    rotations: datetime | None
    readers: datetime | None

    @classmethod
    def at(
        cls, now: datetime, retention: RetentionSettings, *, active_window: timedelta
    ) -> Cutoffs:
        keep = retention.rotations
        return cls(
            audit=None if retention.audit is None else now - retention.audit,
            rotations=None if keep is None else now - keep,
            readers=None if keep is None else now - max(keep, active_window),
        )


@dataclass
class Pruned:
    """What one pass deleted (or, in a dry run, would delete), per table."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    dry_run: bool = False
    complete: bool = True
    """False when the pass stopped early (its budget, or its lease lost): rows are left."""
    batches: int = 0
    seconds: float = 0.0
    longest_batch_s: float = 0.0
    durations: list[float] = field(default_factory=list)
    """Each batch's transaction, in seconds (what other writers may have waited behind)."""
    cutoffs: Cutoffs | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        cut = self.cutoffs

        def iso(at: datetime | None) -> str | None:
            return None if at is None else at.isoformat()

        return {
            "dry_run": self.dry_run,
            "complete": self.complete,
            "counts": dict(self.counts),
            "total": self.total,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "longest_batch_s": round(self.longest_batch_s, 4),
            "before": {
                "audit": iso(cut.audit if cut else None),
                "rotations": iso(cut.rotations if cut else None),
                "reader_reads": iso(cut.readers if cut else None),
            },
        }


# --- what may go, table by table -----------------------------------------------------------


def _busy(conn: Connection) -> list[tuple[str, str]]:
    """The credentials with an open rotation or an unfinished revoke: few, read once a batch
    (through the step and finished_at indexes) rather than once per candidate row."""
    r = _ROT.c
    found = conn.execute(
        select(r.environment, r.credential)
        .where(or_(r.finished_at.is_(None), r.step.in_(Step.OPEN)))
        .distinct()
    )
    return [(str(env), str(cred)) for env, cred in found]


def _rotations(
    cutoff: datetime, busy: list[tuple[str, str]], after: Any = None
) -> Select[Any]:
    """Finished rotations and revokes older than ``cutoff`` that nothing needs any more, none
    of the ``busy`` credentials': their ids, and ``finished_at`` (the position) from ``after``
    on."""
    r = _ROT.alias("r")
    newer = _ROT.alias("newer")

    def of_credential(t: Any) -> Any:
        return and_(t.c.environment == r.c.environment, t.c.credential == r.c.credential)

    is_revoke = r.c.kind == _REVOKE
    same_kind = or_(
        and_(is_revoke, newer.c.kind == _REVOKE), and_(~is_revoke, newer.c.kind != _REVOKE)
    )
    query = (
        select(r.c.id, r.c.finished_at)
        .where(
            r.c.finished_at.is_not(None),
            r.c.finished_at < cutoff,
            r.c.updated_at < cutoff,
            r.c.sealed.is_(None),
            or_(is_revoke, r.c.step.in_(Step.TERMINAL)),
            # the credential's latest rotation (and revoke) stays: one newer of its kind exists
            exists().where(of_credential(newer), newer.c.started_at > r.c.started_at, same_kind),
            ~exists().where(of_credential(_STATES), _STATES.c.current_version_id == r.c.version_id),
            ~exists().where(
                of_credential(_UNACCOUNTED),
                _UNACCOUNTED.c.rotation_id == r.c.id,
                or_(
                    _UNACCOUNTED.c.status == _OPEN_UNACCOUNTED, _UNACCOUNTED.c.closed_at.is_(None)
                ),
            ),
        )
        .order_by(r.c.finished_at)
    )
    if busy:
        # nothing of a credential with an open rotation or an unfinished revoke
        query = query.where(tuple_(r.c.environment, r.c.credential).not_in(busy))
    if after is not None:
        query = query.where(r.c.finished_at >= after)
    return query


def _audit(cutoff: datetime, after: Any = None) -> Select[Any]:
    c = _AUDIT.c
    top = select(func.max(c.id)).scalar_subquery()
    query = select(c.id, c.id.label("position")).where(c.at < cutoff, c.id < top)
    return _from(query.order_by(c.id), c.id, after)


def _webhooks(cutoff: datetime, after: Any = None) -> Select[Any]:
    w = _WEBHOOKS.c
    query = select(w.id, w.id.label("position")).where(
        w.received_at < cutoff,
        w.status.in_(_PROCESSED_WEBHOOKS),
        or_(w.processed_at.is_(None), w.processed_at < cutoff),
    )
    return _from(query.order_by(w.id), w.id, after)


def _unaccounted(cutoff: datetime, after: Any = None) -> Select[Any]:
    u = _UNACCOUNTED.c
    query = select(u.id, u.id.label("position")).where(
        u.status != _OPEN_UNACCOUNTED, u.closed_at.is_not(None), u.closed_at < cutoff
    )
    return _from(query.order_by(u.id), u.id, after)


def _reads(cutoff: datetime, after: Any = None) -> Select[Any]:
    c = _READS.c
    query = select(c.key_id, c.environment, c.credential, c.version_id, c.last_at)
    return _from(query.where(c.last_at < cutoff).order_by(c.last_at), c.last_at, after)


def _from(query: Select[Any], position: Any, after: Any) -> Select[Any]:
    """``query`` from ``after`` on: each batch starts where the last one ended, so that it
    neither reads again the rows kept before it nor, on PostgreSQL, walks the index entries of
    the rows deleted before it (dead until a vacuum)."""
    return query if after is None else query.where(position >= after)


def _delete_rotations(conn: Connection, ids: list[Any]) -> dict[str, int]:
    records = conn.execute(delete(_RECORDS).where(_RECORDS.c.rotation_id.in_(ids))).rowcount
    # the same conditions hold on PostgreSQL's read committed: only a finished row, no token
    rows = conn.execute(
        delete(_ROT).where(
            _ROT.c.id.in_(ids), _ROT.c.finished_at.is_not(None), _ROT.c.sealed.is_(None)
        )
    ).rowcount
    return {"rotations": int(rows), "revoke_records": int(records)}


_TABLES = {
    "audit": _AUDIT,
    "webhook_events": _WEBHOOKS,
    "unaccounted_tokens": _UNACCOUNTED,
    "reader_reads": _READS,
}

Batch = tuple[dict[str, int], Any, int]
"""What a batch did: rows deleted per table, the position of the last row it chose (where
the next batch starts), and how many it chose."""


@dataclass(frozen=True)
class _Target:
    table: str
    candidates: Callable[[Connection, datetime, Any], Select[Any]]
    """The rows that may go: their primary key, then their position (what they are ordered
    by), from a position on."""
    cutoff: Callable[[Cutoffs], datetime | None]

    def _query(self, conn: Connection, cutoff: datetime, after: Any = None) -> Select[Any]:
        return self.candidates(conn, cutoff, after)

    def delete(self, conn: Connection, cutoff: datetime, batch: int, after: Any) -> Batch:
        rows = conn.execute(self._query(conn, cutoff, after).limit(batch)).all()
        if not rows:
            return {}, after, 0
        keys = [tuple(row[:-1]) for row in rows]
        last = rows[-1][-1]
        if self.table == "rotations":
            return _delete_rotations(conn, [k[0] for k in keys]), last, len(rows)
        table = _TABLES[self.table]
        columns = list(table.primary_key.columns)
        if len(columns) == 1:
            where = columns[0].in_([k[0] for k in keys])
        else:
            where = tuple_(*columns).in_(keys)
        count = conn.execute(delete(table).where(where)).rowcount
        return {self.table: int(count)}, last, len(rows)

    def count(self, conn: Connection, cutoff: datetime) -> dict[str, int]:
        found = self._query(conn, cutoff).order_by(None).subquery()
        n = int(conn.execute(select(func.count()).select_from(found)).scalar_one())
        if self.table != "rotations":
            return {self.table: n}
        ids = select(found.c.id)
        records = conn.execute(
            select(func.count()).where(_RECORDS.c.rotation_id.in_(ids))
        ).scalar_one()
        return {"rotations": n, "revoke_records": int(records)}


_TARGETS = (
    _Target(
        "rotations",
        lambda conn, cutoff, after: _rotations(cutoff, _busy(conn), after),
        lambda c: c.rotations,
    ),
    _Target("audit", lambda _conn, cutoff, after: _audit(cutoff, after), lambda c: c.audit),
    _Target(
        "webhook_events",
        lambda _conn, cutoff, after: _webhooks(cutoff, after),
        lambda c: c.rotations,
    ),
    _Target(
        "unaccounted_tokens",
        lambda _conn, cutoff, after: _unaccounted(cutoff, after),
        lambda c: c.rotations,
    ),
    _Target(
        "reader_reads", lambda _conn, cutoff, after: _reads(cutoff, after), lambda c: c.readers
    ),
)


# --- a pass ----------------------------------------------------------------------------------


class Busy(LockBusy):
    """Another process holds the pruning lease (:attr:`holder`)."""

    def __init__(self, holder: str) -> None:
        super().__init__(
            f"another process is pruning the journal now ({holder})",
            where=LEASE,
            hint="nothing to do: it deletes what is due; run it again once that pass is over",
        )
        self.holder = holder


def owner() -> str:
    """This process's name as the holder of the pruning lease."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _table(
    journal: Journal,
    target: _Target,
    batch_of: Callable[[_Target, datetime, int, Any, Connection], Batch | None],
    cutoff: datetime,
    most: int,
    out_of_time: Callable[[], bool],
    result: Pruned,
    on_batch: Callable[[dict[str, int]], None] | None,
) -> bool:
    """Prune one table batch by batch until nothing is left (True), or until the pass is out of
    time or lost its lease (False)."""
    size, after = most, None
    while True:
        if out_of_time():
            return False
        began = time.perf_counter()
        done = journal.transaction(
            "prune the journal", functools.partial(batch_of, target, cutoff, size, after)
        )
        took = time.perf_counter() - began
        if done is None:
            return False
        counts, after, chosen = done
        result.batches += 1
        result.durations.append(took)
        result.longest_batch_s = max(result.longest_batch_s, took)
        for table, n in counts.items():
            result.counts[table] += n
        checkpoint("prune-batch", target.table)  # crash tests: die between batches
        if on_batch is not None and any(counts.values()):
            on_batch(counts)
        if chosen < size or not any(counts.values()):
            return True  # the end; or rows chosen and not deleted (changed since): next pass
        # a batch that held the journal long is halved; a quick one grows back
        if took > BATCH_TARGET_S:
            size = max(10, size // 2)
        elif took < BATCH_TARGET_S / 4:
            size = min(most, size * 2)


def prune(
    journal: Journal,
    retention: RetentionSettings,
    *,
    active_window: timedelta,
    owner: str,
    actor: str = "rotator",
    dry_run: bool = False,
    budget_s: float | None = None,
    batch: int | None = None,
    on_batch: Callable[[dict[str, int]], None] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> Pruned:
    """One pass: delete (``dry_run``: count) what is older than ``retention`` keeps, batch by
    batch, under the pruning lease held as ``owner``. ``budget_s``: stop starting batches after
    this long (``None``: run to the end). ``on_batch``: called with each batch's counts once it
    is committed (metrics). ``stopping``: the process is stopping (a drain): no more batches.
    Writes one ``journal.pruned`` audit entry when anything was deleted.
    Raises :class:`Busy` when another process holds the lease, JournalError when the journal
    fails (what was committed stays deleted)."""
    most = batch or retention.batch
    now = journal.clock.now()
    cutoffs = Cutoffs.at(now, retention, active_window=active_window)
    result = Pruned(dry_run=dry_run, cutoffs=cutoffs)
    clock = journal.clock
    started = clock.monotonic()
    began_pass = time.perf_counter()
    if dry_run:
        def count_all(conn: Connection) -> None:
            for target in _TARGETS:
                cutoff = target.cutoff(cutoffs)
                if cutoff is not None:
                    result.counts.update(target.count(conn, cutoff))

        with journal.reader() as s:
            count_all(s.connection())
        result.seconds = time.perf_counter() - began_pass
        return result

    ttl = max(journal.lock_ttl, timedelta(seconds=30))
    if not journal.acquire(LEASE, owner, ttl):
        holder = journal.lock_holder(LEASE)
        raise Busy(holder.owner if holder is not None else "another process")

    def batch_of(
        target: _Target, cutoff: datetime, size: int, after: Any, conn: Connection
    ) -> Batch | None:
        # the lease is extended in the batch's own transaction: no commit of its own
        if not journal.renew_in(conn, LEASE, owner, ttl):
            return None  # another process prunes now (this one was paused past its lease)
        return target.delete(conn, cutoff, size, after)

    def out_of_time() -> bool:
        return stopping() or (budget_s is not None and clock.monotonic() - started >= budget_s)

    failed: Exception | None = None
    try:
        try:
            for target in _TARGETS:
                cutoff = target.cutoff(cutoffs)
                if cutoff is None:
                    continue
                done = _table(
                    journal, target, batch_of, cutoff, most, out_of_time, result, on_batch
                )
                if not done:
                    result.complete = False
                    break
        except Exception as exc:  # noqa: BLE001 - audited below, then raised again
            result.complete = False
            failed = exc
        result.seconds = time.perf_counter() - began_pass
        if result.total:  # what was committed is deleted, and said so, however the pass ended
            with contextlib.suppress(RotatorError) if failed else contextlib.nullcontext():
                journal.audit(
                    actor=actor,
                    action="journal.pruned",
                    outcome="ok" if result.complete else "partial",
                    **result.as_dict(),
                )
    finally:
        with contextlib.suppress(RotatorError):  # else it expires within its ttl
            journal.release(LEASE, owner)
    if failed is not None:
        raise failed
    return result
