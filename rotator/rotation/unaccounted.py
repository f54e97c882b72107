"""Tokens Makini may have issued that no backend holds, until they are accounted for.

The rotator cannot know what a request did whose answer it never received: the process died
while Makini was issuing, the connection broke after the request was sent, or the answer came
after this worker lost the credential's lease. Without an idempotency key at Makini it cannot
prevent such a token either. It makes each one visible instead: an entry here (what was asked,
when, for which connection, why the answer was lost), an audit entry, a count on the
credential's state that ``rotator status`` shows (and exits 3 for) until the entry is closed.

An entry is closed

* *resolved* by the rotator: where Makini kills a connection's older tokens when it issues a new
  one, once a token was issued for the connection after the entry was recorded; once its latest
  possible expiry has passed (``live_until``, set from the lifetime of the next token issued;
  checked at each later issue for the credential and by ``rotator unaccounted list``); when an
  emergency revoke disconnected the connection;
* *acknowledged* by a person (``rotator unaccounted ack``), who has dealt with it at Makini
  (for example by disconnecting the connection, or by accepting that it expires).

Entries never hold a token; one received late is named by its fingerprint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, func, select, update
from sqlalchemy.engine import Connection

from rotator.clock import SYSTEM, Clock
from rotator.journal import CredentialState, Journal
from rotator.journal.schema import UnaccountedToken
from rotator.settings import MakiniSettings

OPEN, RESOLVED, ACKNOWLEDGED = "open", "resolved", "acknowledged"


_TABLE = cast(Table, UnaccountedToken.__table__)
_STATE = cast(Table, CredentialState.__table__)


@dataclass(frozen=True)
class Lost:
    """A request whose answer was lost, as the engine or a revoke reports it."""

    environment: str
    credential: str
    connection_id: str
    rotation_id: str | None
    asked_at: datetime
    cause: str
    request_id: str | None = None
    fingerprint: str | None = None
    live_until: datetime | None = None


def record(
    journal: Journal, conn: Connection, lost: Lost, *, actor: str, clock: Clock = SYSTEM
) -> int:
    """Add an open entry, count it on the credential's state and audit it (in ``conn``'s
    transaction). Returns the entry's id.

    A request is named by its rotation and the ``asked_at`` stamped on the rotation's row
    before it was sent: a request already recorded is not recorded twice (a resume and the late
    answer of the same request, two resumes of one rotation), and the late answer, which names
    its token, closes the blind entry a resume recorded for it."""
    now = clock.now()
    same_request = (
        (_TABLE.c.rotation_id == lost.rotation_id) & (_TABLE.c.asked_at == lost.asked_at)
        if lost.rotation_id is not None
        else None
    )
    if same_request is not None:
        known = conn.execute(
            select(_TABLE.c.id, _TABLE.c.fingerprint).where(same_request).order_by(_TABLE.c.id)
        ).all()
        if known and (lost.fingerprint is None or any(fp for _, fp in known)):
            return int(known[0][0])
    entry_id = conn.execute(
        _TABLE.insert()
        .values(
            environment=lost.environment,
            credential=lost.credential,
            connection_id=lost.connection_id,
            rotation_id=lost.rotation_id,
            asked_at=lost.asked_at,
            recorded_at=now,
            cause=lost.cause,
            request_id=lost.request_id,
            fingerprint=lost.fingerprint,
            live_until=lost.live_until,
            status=OPEN,
        )
        .returning(_TABLE.c.id)
    ).scalar_one()
    _count(journal, conn, lost.environment, lost.credential, +1)
    journal.audit_in(
        conn,
        actor=actor,
        action="token.unaccounted",
        outcome="open",
        environment=lost.environment,
        credential=lost.credential,
        fingerprint=lost.fingerprint,
        request_ids=[lost.request_id],
        unaccounted_id=entry_id,
        connection_id=lost.connection_id,
        rotation_id=lost.rotation_id,
        asked_at=lost.asked_at,
        cause=lost.cause,
        live_until=lost.live_until,
    )
    if same_request is not None and lost.fingerprint is not None:
        blind = same_request & _TABLE.c.fingerprint.is_(None) & (_TABLE.c.status == OPEN)
        _close(
            journal,
            conn,
            blind,
            RESOLVED,
            f"its answer arrived after all: entry {entry_id} names the token",
            actor,
            now,
        )
    return int(entry_id)


async def outlast(
    makini: MakiniSettings,
    asked_at: datetime,
    *,
    gone_by: datetime | None = None,
    clock: Clock = SYSTEM,
) -> float:
    """Before asking Makini again after a request whose answer was lost: wait until that request
    is surely over, at most one request timeout from now. Where Makini kills older tokens on
    issue, a lost request Makini answers late would otherwise kill the token asked for next,
    and the entry would be resolved on the false premise that the newer token killed it. Not
    where Makini keeps old tokens.

    The request is over one timeout after its client gave up on it: after its last attempt
    (``asked_at`` plus the retry budget), or after the asking process was gone (``gone_by``:
    a crashed holder, whose lease showed when it stopped renewing). A drain that gave the lease
    back leaves no such bound: then the full timeout. Returns the seconds waited."""
    if makini.issue_invalidates_previous is False:
        return 0.0
    timeout = timedelta(seconds=makini.timeout_s)
    now = clock.now()
    over = asked_at + timedelta(seconds=makini.retry.total_timeout_s) + timeout
    if gone_by is not None:
        over = min(over, gone_by + timeout)
    until = min(over, now + timeout)
    delay = (until - now).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)
    return max(delay, 0.0)


Hook = Callable[[Connection, Any], None]
"""More work of a journal transaction that records a step: ``hook(conn, row)``."""


def recording(
    journal: Journal, lost: Lost | None, after: Hook | None, *, clock: Clock = SYSTEM
) -> Hook | None:
    """``after`` (if any), preceded by recording ``lost`` (if any) in the same transaction."""
    if lost is None:
        return after

    def hook(conn: Connection, row: Any) -> None:
        record(journal, conn, lost, actor=row.actor, clock=clock)
        if after is not None:
            after(conn, row)

    return hook


def settle_hook(
    journal: Journal,
    *,
    asked_at: datetime,
    expires_at: datetime | None,
    late: timedelta,
    invalidates: bool,
    clock: Clock = SYSTEM,
) -> Hook:
    """What the step that records a token issued by a request sent at ``asked_at`` does, in its
    own transaction, for the credential's open entries (see :func:`after_issue`)."""
    lifetime = expires_at - asked_at if expires_at else None

    def settle(conn: Connection, row: Any) -> None:
        after_issue(
            journal,
            conn,
            row.environment,
            row.credential,
            asked_at=asked_at,
            lifetime=lifetime,
            late=late,
            invalidates=invalidates,
            actor=row.actor,
            now=clock.now(),
        )

    return settle


def after_issue(
    journal: Journal,
    conn: Connection,
    environment: str,
    credential: str,
    *,
    asked_at: datetime,
    lifetime: timedelta | None,
    late: timedelta = timedelta(0),
    invalidates: bool,
    actor: str,
    now: datetime | None = None,
) -> None:
    """A token was issued for the credential by a request sent at ``asked_at``: where Makini
    kills older tokens on issue, every entry recorded before that is resolved; otherwise the
    new token's lifetime bounds how long an earlier one can live, and entries past that bound
    are resolved.

    An entry's token was issued, if at all, before its answer was known lost (when the entry
    was recorded), or at most ``late`` after (the request timeout: a gateway that gave up may
    leave Makini finishing the request): its latest expiry is ``recorded_at + late +
    lifetime``. Never earlier: an entry resolved before its token expired would hide a live
    token. (Anchored on ``asked_at`` it would be early by however long the request took.)
    ``now``: the time of the transaction (the system clock's by default)."""
    now = now or SYSTEM.now()
    where = _open(environment, credential)
    if invalidates:
        _close(
            journal,
            conn,
            where & (_TABLE.c.recorded_at <= asked_at),
            RESOLVED,
            "Makini killed it: issuing a newer token for the connection kills the older ones",
            actor,
            now,
        )
        return
    if lifetime is not None and lifetime > timedelta(0):
        rows = conn.execute(
            select(_TABLE.c.id, _TABLE.c.recorded_at).where(where, _TABLE.c.live_until.is_(None))
        ).all()
        for entry_id, recorded_at in rows:
            conn.execute(
                update(_TABLE)
                .where(_TABLE.c.id == entry_id)
                .values(live_until=recorded_at + late + lifetime)
            )
    _close(journal, conn, where & (_TABLE.c.live_until < now), RESOLVED, EXPIRED, actor, now)


def resolve_all(
    journal: Journal,
    conn: Connection,
    environment: str,
    credential: str,
    why: str,
    actor: str,
    *,
    clock: Clock = SYSTEM,
) -> int:
    """Resolve every open entry of a credential (its connection was disconnected)."""
    where = _open(environment, credential)
    return _close(journal, conn, where, RESOLVED, why, actor, clock.now())


EXPIRED = "expired: its latest possible expiry has passed"


def expire(journal: Journal, now: datetime | None = None, *, clock: Clock = SYSTEM) -> int:
    """Resolve the open entries whose token has surely expired (by ``now``); how many."""
    moment = now or clock.now()
    where = (_TABLE.c.status == OPEN) & (_TABLE.c.live_until < moment)
    return journal.transaction(
        "resolve expired unaccounted tokens",
        lambda conn: _close(journal, conn, where, RESOLVED, EXPIRED, "rotator", clock.now()),
    )


def acknowledge(
    journal: Journal,
    environment: str,
    ids: Sequence[int],
    *,
    actor: str,
    reason: str,
    clock: Clock = SYSTEM,
) -> list[int]:
    """Close open entries of ``environment`` by a person's word; the ids that were open."""
    where = (
        (_TABLE.c.environment == environment)
        & (_TABLE.c.status == OPEN)
        & _TABLE.c.id.in_(list(ids))
    )

    def work(conn: Connection) -> list[int]:
        found = [int(r[0]) for r in conn.execute(select(_TABLE.c.id).where(where)).all()]
        _close(journal, conn, where, ACKNOWLEDGED, reason, actor, clock.now())
        return found

    return journal.transaction("acknowledge unaccounted tokens", work)


def entries(
    journal: Journal, environment: str | None = None, *, include_closed: bool = False
) -> list[UnaccountedToken]:
    with journal.reader() as s:
        q = select(UnaccountedToken)
        if environment:
            q = q.where(UnaccountedToken.environment == environment)
        if not include_closed:
            q = q.where(UnaccountedToken.status == OPEN)
        return list(s.scalars(q.order_by(UnaccountedToken.id)))


def _open(environment: str, credential: str) -> Any:
    return (
        (_TABLE.c.environment == environment)
        & (_TABLE.c.credential == credential)
        & (_TABLE.c.status == OPEN)
    )


def _close(
    journal: Journal,
    conn: Connection,
    where: Any,
    status: str,
    why: str,
    actor: str,
    now: datetime,
) -> int:
    rows = conn.execute(
        select(_TABLE.c.id, _TABLE.c.environment, _TABLE.c.credential, _TABLE.c.fingerprint).where(
            where
        )
    ).all()
    if not rows:
        return 0
    conn.execute(
        update(_TABLE)
        .where(_TABLE.c.id.in_([r[0] for r in rows]))
        .values(status=status, closed_at=now, closed_by=actor[:200], resolution=why)
    )
    per_credential: dict[tuple[str, str], int] = {}
    for entry_id, env, cred, fingerprint in rows:
        per_credential[(env, cred)] = per_credential.get((env, cred), 0) + 1
        journal.audit_in(
            conn,
            actor=actor,
            action=f"token.unaccounted_{status}",
            outcome=status,
            environment=env,
            credential=cred,
            fingerprint=fingerprint,
            unaccounted_id=entry_id,
            resolution=why,
        )
    for (env, cred), count in per_credential.items():
        _count(journal, conn, env, cred, -count)
    return len(rows)


def _count(journal: Journal, conn: Connection, environment: str, credential: str, by: int) -> None:
    ins = journal.dialect_insert(_STATE).values(
        environment=environment, credential=credential, unaccounted=max(by, 0)
    )
    conn.execute(
        ins.on_conflict_do_update(
            index_elements=[_STATE.c.environment, _STATE.c.credential],
            set_={"unaccounted": func.max(_STATE.c.unaccounted + by, 0)}
            if conn.dialect.name == "sqlite"
            else {"unaccounted": func.greatest(_STATE.c.unaccounted + by, 0)},
        )
    )


def close(
    journal: Journal,
    conn: Connection,
    ids: Sequence[int],
    why: str,
    actor: str,
    status: str = RESOLVED,
    *,
    clock: Clock = SYSTEM,
) -> int:
    """Close these entries (those still open) in ``conn``'s transaction."""
    where = _TABLE.c.id.in_(list(ids)) & (_TABLE.c.status == OPEN)
    return _close(journal, conn, where, status, why, actor, clock.now())
