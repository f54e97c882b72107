"""The journal's side of notifications: which conditions are on (``notify_conditions``) and the
delivery queue (``notify_outbox``).

:func:`apply` turns a condition on or off and queues its notification for each sink in one
transaction, and does nothing when the condition already is so: one notification when a
condition starts, one when it resolves, whichever replica or process sees it first.
:func:`claim` takes due rows for one attempt's window; a sender that dies leaves them to be
claimed again once the window has passed, so a restart loses none.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import aliased

from rotator.errors import JournalError
from rotator.journal import Journal
from rotator.journal.schema import NotifyCondition, NotifyOutbox, Rotation
from rotator.notify.notice import Notice

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
Key = tuple[str, str, str]
"""(environment, credential, condition)"""


@dataclass(frozen=True)
class Change:
    """A condition found on (``firing``) or off, with what a person should know."""

    environment: str
    credential: str
    condition: str
    firing: bool
    detail: str

    @property
    def key(self) -> Key:
        return (self.environment, self.credential, self.condition)


def conditions(journal: Journal, *, active_only: bool = False) -> dict[Key, NotifyCondition]:
    """Every condition recorded (on, or off since it resolved); ``active_only``: those on."""
    with journal.reader() as s:
        q = select(NotifyCondition)
        if active_only:
            q = q.where(NotifyCondition.active.is_(True))
        return {(r.environment, r.credential, r.condition): r for r in s.scalars(q)}


def apply(journal: Journal, change: Change, sinks: Sequence[str], now: datetime) -> bool:
    """Turn the condition on or off and queue a notification for each of ``sinks``, in one
    transaction. False (nothing written) when it already was so."""
    try:
        with journal.session("record a notification") as s:
            row = s.get(NotifyCondition, change.key, with_for_update=True)
            if change.firing:
                if row is not None and row.active:
                    return False
                if row is None:
                    row = NotifyCondition(
                        environment=change.environment,
                        credential=change.credential,
                        condition=change.condition,
                    )
                    s.add(row)
                row.active, row.detail, row.started_at, row.resolved_at = (
                    True,
                    change.detail,
                    now,
                    None,
                )
            else:
                if row is None or not row.active:
                    return False
                row.active, row.resolved_at = False, now
            notice = Notice(
                condition=change.condition,
                environment=change.environment,
                credential=change.credential,
                firing=change.firing,
                detail=change.detail,
                started_at=row.started_at,
                resolved_at=row.resolved_at,
            ).to_json()
            for sink in sinks:
                s.add(
                    NotifyOutbox(
                        environment=change.environment,
                        credential=change.credential,
                        condition=change.condition,
                        sink=sink,
                        firing=change.firing,
                        notice=notice,
                        created_at=now,
                        status=PENDING,
                        next_at=now,
                        attempts=0,
                    )
                )
    except JournalError as exc:
        if type(exc.__cause__).__name__ == "IntegrityError":
            return False  # another process turned it on at the same moment
        raise
    return True


def claim(
    journal: Journal, now: datetime, window: timedelta, limit: int = 50
) -> list[NotifyOutbox]:
    """Take up to ``limit`` due rows for ``window`` (one attempt), oldest first; a row waits for
    an older one of the same condition and sink (a resolve never overtakes its start). A row
    another sender holds is skipped: on PostgreSQL the UPDATE re-checks the claim of a row another
    transaction changed meanwhile, on SQLite writers take turns."""
    owner = uuid.uuid4().hex
    free = or_(NotifyOutbox.claimed_until.is_(None), NotifyOutbox.claimed_until < now)
    earlier = aliased(NotifyOutbox)
    waits = (
        select(earlier.id)
        .where(
            earlier.status == PENDING,
            earlier.id < NotifyOutbox.id,
            earlier.sink == NotifyOutbox.sink,
            earlier.environment == NotifyOutbox.environment,
            earlier.credential == NotifyOutbox.credential,
            earlier.condition == NotifyOutbox.condition,
        )
        .exists()
    )
    due = (
        select(NotifyOutbox.id)
        .where(NotifyOutbox.status == PENDING, NotifyOutbox.next_at <= now, free, ~waits)
        .order_by(NotifyOutbox.id)
        .limit(limit)
    )
    with journal.session("claim notifications") as s:
        s.execute(
            update(NotifyOutbox)
            .where(NotifyOutbox.id.in_(due.scalar_subquery()), NotifyOutbox.status == PENDING, free)
            .values(claimed_by=owner, claimed_until=now + window)
            .execution_options(synchronize_session=False)
        )
    with journal.reader() as s:
        rows = s.scalars(
            select(NotifyOutbox).where(NotifyOutbox.claimed_by == owner).order_by(NotifyOutbox.id)
        )
        return list(rows)


def finish(journal: Journal, row: NotifyOutbox, **values: object) -> bool:
    """Record what became of a claimed row (and give the claim back); False when the claim was
    lost meanwhile (the window passed and another sender took the row)."""
    with journal.session("record a delivery") as s:
        result = s.execute(
            update(NotifyOutbox)
            .where(NotifyOutbox.id == row.id, NotifyOutbox.claimed_by == row.claimed_by)
            .values(claimed_by=None, claimed_until=None, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def delivered_since(
    journal: Journal, environment: str, sink: str, since: datetime
) -> list[datetime]:
    """When the sink was delivered to since ``since``, oldest first (its rate limit)."""
    with journal.reader() as s:
        return list(
            s.scalars(
                select(NotifyOutbox.delivered_at)
                .where(
                    NotifyOutbox.environment == environment,
                    NotifyOutbox.sink == sink,
                    NotifyOutbox.delivered_at >= since,
                )
                .order_by(NotifyOutbox.delivered_at)
            )
        )


def rows(journal: Journal, environment: str | None = None) -> list[NotifyOutbox]:
    """The queue, oldest first (what was sent, what waits, and why)."""
    with journal.reader() as s:
        q = select(NotifyOutbox).order_by(NotifyOutbox.id)
        if environment:
            q = q.where(NotifyOutbox.environment == environment)
        return list(s.scalars(q))


def latest_revokes(journal: Journal) -> dict[tuple[str, str], Rotation]:
    """Each credential's latest emergency revoke (open or finished)."""
    with journal.reader() as s:
        found = s.scalars(
            select(Rotation).where(Rotation.kind == "revoke").order_by(Rotation.started_at)
        )
        return {(r.environment, r.credential): r for r in found}


KEEP = timedelta(days=7)
"""How long delivered and dropped notifications stay in the outbox (the rate limit looks back a
minute; the rest is for a person asking what was sent)."""


def purge(journal: Journal, before: datetime) -> int:
    """Forget the delivered and dropped notifications created before ``before``."""
    with journal.session("purge delivered notifications") as s:
        result = s.execute(
            delete(NotifyOutbox)
            .where(NotifyOutbox.status != PENDING, NotifyOutbox.created_at < before)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
