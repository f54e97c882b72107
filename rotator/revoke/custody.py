"""Journal transactions of a revoke: the ones that move several rows at once.

Starting a revoke writes its row and supersedes every rotation in flight for the credential in
one transaction, so no crash leaves a rotation neither running nor superseded. Adopting a
pre-empted rotation's token moves the sealed copy from the rotation's row to the revoke's in one
transaction, so the token is held by exactly one row at every instant.

Each transaction first writes the rows it is about to read (SQLite: takes the write lock;
PostgreSQL: locks the rows), so what it reads cannot change before it commits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from rotator.errors import RotationError
from rotator.journal import Journal, LeaseKey, Rotation, Step

from .model import KIND, Preempted, Record, Superseded

__all__ = ["Preempted", "adopt", "begin", "commit", "drop", "orphans"]


def _in_flight(env: str, cred: str) -> Any:
    return (
        (Rotation.environment == env)
        & (Rotation.credential == cred)
        & (Rotation.kind != KIND)
        & Rotation.step.in_(Step.IN_FLIGHT)
    )


def begin(
    journal: Journal, lease: LeaseKey, row: Rotation, record: Record, audit: dict[str, Any]
) -> list[Preempted]:
    """Write the revoke's row and supersede the credential's rotations in flight, atomically.

    Each superseded rotation keeps its sealed token (if it has one) until the revoke adopts or
    kills it. Returns what was superseded, as it stood.
    """
    now = journal.clock.now()
    env, cred = row.environment, row.credential
    with journal.session("start a revoke") as s:
        journal.require(s.connection(), lease)
        s.execute(update(Rotation).where(_in_flight(env, cred)).values(updated_at=now))
        preempted: list[Preempted] = []
        for rot in s.scalars(select(Rotation).where(_in_flight(env, cred))):
            info = Superseded(rot.id, rot.step, rot.version_id, rot.old_version_id)
            preempted.append(Preempted(info, rot.attempts, rot.sealed is not None))
            rot.notes = json.dumps(
                [*rot.note_list(), f"superseded at step {rot.step} by emergency revoke {row.id}"]
            )
            rot.step = Step.SUPERSEDED
            rot.error = f"superseded by emergency revoke {row.id}"
            rot.finished_at = now
            journal.audit_in(
                s.connection(),
                actor=row.actor,
                action="rotation.superseded",
                outcome="superseded",
                environment=env,
                credential=cred,
                version_id=rot.version_id,
                fingerprint=rot.fingerprint,
                revoke_id=row.id,
                step=info.step,
                holds_token=rot.sealed is not None,
            )
        record.superseded = [p.info for p in preempted]
        s.add(row)
        s.flush()  # the row first: its record refers to it
        journal.save_revoke_record_in(s.connection(), row.id, record.to_dict())
        audit = {**audit, "superseded": [p.info.id for p in preempted]}
        journal.audit_in(s.connection(), environment=env, credential=cred, **audit)
    return preempted


def adopt(
    journal: Journal,
    lease: LeaseKey,
    revoke_id: str,
    rotation_id: str,
    record: Record,
    step: str,
    note: str,
) -> Rotation:
    """Move a pre-empted rotation's sealed token to the revoke (it becomes the replacement).

    The sealed copy moves as it is: it was sealed for its version id, which the revoke's row
    takes over. Raises RotationError when the rotation no longer holds a token.
    """
    now = journal.clock.now()
    with journal.session("adopt a pre-empted rotation's token") as s:
        journal.require(s.connection(), lease)
        s.execute(
            update(Rotation).where(Rotation.id.in_([revoke_id, rotation_id])).values(updated_at=now)
        )
        rev = s.get(Rotation, revoke_id, populate_existing=True)
        rot = s.get(Rotation, rotation_id, populate_existing=True)
        if rev is None or rot is None or rot.sealed is None:
            raise RotationError(
                f"rotation {rotation_id} no longer holds a token to adopt",
                rotation_id=revoke_id,
            )
        rev.sealed, rot.sealed = rot.sealed, None
        rev.version_id = rot.version_id
        rev.fingerprint = rot.fingerprint
        rev.expires_at = rot.expires_at
        rev.step = step
        record.adopted = rotation_id
        rev.notes = json.dumps([*rev.note_list(), note])
        journal.save_revoke_record_in(s.connection(), revoke_id, record.to_dict())
        rot.notes = json.dumps([*rot.note_list(), f"its token was adopted by revoke {revoke_id}"])
    return rev


def with_record(
    journal: Journal,
    record: dict[str, Any],
    recorded: dict[str, Any],
    after: Callable[[Connection, Rotation], None] | None,
) -> Callable[[Connection, Rotation], None] | None:
    """``after`` (if any), preceded in the same transaction by the revoke's record where it
    changed since ``recorded``."""
    if record == recorded:
        return after

    def hook(conn: Connection, row: Rotation) -> None:
        journal.save_revoke_record_in(conn, row.id, record)
        if after is not None:
            after(conn, row)

    return hook


def drop(journal: Journal, rotation_id: str, note: str) -> None:
    """Drop a superseded rotation's sealed token (it is dead, revoked, or reported)."""
    with journal.session("drop a sealed token") as s:
        rot = s.get(Rotation, rotation_id)
        if rot is not None and rot.sealed is not None:
            rot.sealed = None
            rot.notes = json.dumps([*rot.note_list(), note])


def orphans(journal: Journal, env: str, cred: str) -> list[Rotation]:
    """Superseded rotations still holding a sealed token: a token Makini issued to a worker
    after a revoke had taken its rotation over."""
    with journal.reader() as s:
        return list(
            s.scalars(
                select(Rotation).where(
                    Rotation.environment == env,
                    Rotation.credential == cred,
                    Rotation.step == Step.SUPERSEDED,
                    Rotation.sealed.is_not(None),
                )
            )
        )


def commit(
    journal: Journal,
    row: Rotation,
    values: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    audits: Sequence[dict[str, Any]] = (),
    lease: LeaseKey | None = None,
    release: bool = False,
    after: Callable[[Connection, Rotation], None] | None = None,
) -> Rotation:
    """Record a revoke's step with the credential's state and any number of audit entries,
    atomically, if the revoke still holds the credential's lease, and return the row as
    recorded (nothing else writes its row). ``release``: give the lease back with it."""
    return journal.commit_step(
        row.id, values, state=state, audits=audits, lease=lease, release=release, after=after
    )
