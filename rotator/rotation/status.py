"""The state of every credential: what the journal knows, what each backend holds, what is next."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backends.base import Backend
from rotator.errors import BackendError
from rotator.journal import CredentialState, Lock, Rotation
from rotator.model import Stage
from rotator.readers import ReaderView, activity, stale_in
from rotator.rotation.runtime import Runtime
from rotator.rotation.schedule import PlanItem, human, plan


@dataclass(frozen=True)
class CredentialStatus:
    environment: str
    credential: str
    connection_id: str
    current_version: str | None
    fingerprint: str | None
    rotated_at: datetime | None
    expires_at: datetime | None
    next_action: str
    next_at: datetime | None
    next_reason: str
    last_outcome: str | None
    last_error: str | None
    attention: str | None
    open_step: str | None
    backends: dict[str, str | None]
    """current version id per backend (``"error: ..."`` where a backend could not be read)"""
    stale_readers: tuple[ReaderView, ...] = ()
    """API readers active recently whose latest read was not the current version"""
    open_revoke: str | None = None
    """the step at which an unfinished emergency revoke stopped"""
    stalled_lease: str | None = None
    """work on the credential is due, and its lease is held by a holder that stopped renewing
    it (it crashed or was stopped mid-drive): what, by whom, since when. An expired lease on a
    credential with nothing due holds up nothing (the next worker takes it at once) and is not
    reported: a holder killed after promoting, or while finding a credential already done,
    leaves one that nobody takes over until the credential is next due."""
    unaccounted: int = 0
    """open entries of tokens Makini may have issued that no backend holds"""

    @property
    def backends_agree(self) -> bool:
        return (
            len(set(self.backends.values())) == 1 and self.current_version in self.backends.values()
        )

    @property
    def healthy(self) -> bool:
        return (
            self.backends_agree
            and not self.attention
            and self.current_version is not None
            and self.open_revoke is None
            and self.stalled_lease is None
            and self.unaccounted == 0
        )

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "credential": self.credential,
            "connection_id": self.connection_id,
            "current_version": self.current_version,
            "fingerprint": self.fingerprint[:12] if self.fingerprint else None,
            "rotated_at": self.rotated_at.isoformat() if self.rotated_at else None,
            "token_age_s": int((now - self.rotated_at).total_seconds())
            if self.rotated_at
            else None,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "expires_in_s": int((self.expires_at - now).total_seconds())
            if self.expires_at
            else None,
            "next_action": self.next_action,
            "next_at": self.next_at.isoformat() if self.next_at else None,
            "next_reason": self.next_reason,
            "last_outcome": self.last_outcome,
            "last_error": self.last_error,
            "attention": self.attention,
            "open_step": self.open_step,
            "backends": self.backends,
            "backends_agree": self.backends_agree,
            "stale_readers": [v.as_dict() for v in self.stale_readers],
            "open_revoke": self.open_revoke,
            "stalled_lease": self.stalled_lease,
            "unaccounted": self.unaccounted,
        }


def _current_id(backend: Backend, credential: str) -> str | None:
    try:
        version = backend.read(credential, Stage.CURRENT)
    except BackendError as exc:
        return f"error: {exc.message}"
    return version.version_id if version else None


async def collect(runtime: Runtime, environment: str | None = None) -> list[CredentialStatus]:
    config = runtime.config
    envs = [environment] if environment else list(runtime.environments)
    for name in envs:
        config.environment(name)
    now = runtime.engine.clock.now()
    items = plan(config, runtime.journal, now, environments=envs)
    states = runtime.journal.states()
    open_rot = {(r.environment, r.credential): r for r in runtime.journal.open_rotations()}
    revokes = {(r.environment, r.credential): r for r in runtime.journal.open_revokes()}
    # a holder renews its leases every third of lock_ttl: one with less than a third left has
    # missed a heartbeat and more (it crashed, or it is stopped)
    missed = runtime.journal.lock_ttl / 3
    stalled = {
        lock.name: lock for lock in runtime.journal.locks() if lock.expires_at - now < missed
    }

    async def one(env: str, cred: str) -> dict[str, str | None]:
        rt = runtime.environments[env]
        ids = await asyncio.gather(*(asyncio.to_thread(_current_id, b, cred) for b in rt.backends))
        return {b.name: vid for b, vid in zip(rt.backends, ids, strict=True)}

    per_backend = await asyncio.gather(*(one(i.environment, i.credential) for i in items))
    stale = await asyncio.to_thread(_stale_readers, runtime, items, states)
    out = []
    for item, held in zip(items, per_backend, strict=True):
        env = config.environments[item.environment]
        cred = env.credential(item.credential, item.environment)
        state = states.get((item.environment, item.credential))
        rot = open_rot.get((item.environment, item.credential))
        out.append(
            CredentialStatus(
                environment=item.environment,
                credential=item.credential,
                connection_id=cred.connection_id,
                current_version=state.current_version_id if state else None,
                fingerprint=state.current_fingerprint if state else None,
                rotated_at=state.rotated_at if state else None,
                expires_at=state.expires_at if state else None,
                next_action=item.action,
                next_at=item.due_at,
                next_reason=item.reason,
                last_outcome=state.last_outcome if state else None,
                last_error=state.last_error if state else None,
                attention=state.attention if state else None,
                open_step=rot.step if rot else None,
                backends=held,
                stale_readers=stale.get((item.environment, item.credential), ()),
                open_revoke=_revoke_step(revokes, item.environment, item.credential),
                stalled_lease=_stalled(stalled, item.environment, item.credential, now)
                if item.is_due
                else None,
                unaccounted=state.unaccounted if state else 0,
            )
        )
    return out


def _stalled(locks: dict[str, Lock], env: str, cred: str, now: datetime) -> str | None:
    lock = locks.get(f"{env}/{cred}")
    if lock is None:
        return None
    left = lock.expires_at - now
    if left.total_seconds() <= 0:
        when = f"expired {human(-left)} ago"
    else:
        when = f"expires in {human(left)}"
    return (
        f"its lease is held by {lock.owner}, which stopped renewing it (it {when}): the "
        "process crashed or is stopped mid-drive; once it expires another replica or the next "
        "`rotator run-due` takes the credential over from its last journaled step"
    )


def _stale_readers(
    runtime: Runtime, items: list[PlanItem], states: dict[tuple[str, str], CredentialState]
) -> dict[tuple[str, str], tuple[ReaderView, ...]]:
    found = activity(runtime.journal, window=runtime.config.api.readers.active_window)
    out = {}
    for item in items:
        key = (item.environment, item.credential)
        state = states.get(key)
        views = stale_in(found.get(key, {}), state.current_version_id if state else None)
        if views:
            out[key] = tuple(views)
    return out


def _revoke_step(revokes: dict[tuple[str, str], Rotation], env: str, cred: str) -> str | None:
    row = revokes.get((env, cred))
    return row.step if row is not None else None
