"""The state of every credential: what the journal knows, what each backend holds, what is next.

:func:`collect` reads it through a live :class:`~rotator.rotation.runtime.Runtime`;
:func:`read_status` (``rotator status``) opens only what status reads: the journal read as a
snapshot with the database's own driver where it can be (see :mod:`rotator.journal.snapshot`)
and the backends of the environments shown, not the Makini clients, the engine or the
journal's engine. Both end in :func:`gather`, which reads each table once and each backend's
current version of each credential once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.errors import BackendError
from rotator.journal.snapshot import Snapshot
from rotator.readers import Activity, ReaderView, stale_in
from rotator.rotation.schedule import human, plan_from

if TYPE_CHECKING:
    from backends.base import Backend
    from rotator.clock import Clock
    from rotator.journal.rows import LockView
    from rotator.rotation.runtime import Runtime
    from rotator.settings import Config


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
    """The current version id ``backend`` holds for ``credential`` (read as the backend likes:
    :meth:`~backends.base.Backend.current_version_id`), or the error it gave."""
    try:
        return backend.current_version_id(credential)
    except BackendError as exc:
        return f"error: {exc.message}"


@dataclass(frozen=True)
class Sources:
    """What :func:`gather` reads: the configuration (with each environment's effective
    credentials), the journal's rows, the readers' recent activity and the live backends of
    the environments shown."""

    config: Config
    snapshot: Snapshot
    activity: Activity
    backends: Mapping[str, Sequence[Backend]]
    lock_ttl: timedelta
    now: datetime


def _workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)  # what asyncio.to_thread would use


def current_ids(
    backends: Mapping[str, Sequence[Backend]], keys: Sequence[tuple[str, str]]
) -> list[dict[str, str | None]]:
    """For each (environment, credential) of ``keys``, the current version id each backend of
    its environment holds (``"error: ..."`` where a backend could not be read). A remote
    backend's reads run in a pool of threads, a share of its credentials per task (each waits
    on the network); a local one's (``capabilities.local``) in this thread meanwhile, where
    more threads would only contend for the interpreter lock."""
    from backends.base import read_many

    names: dict[str, list[str]] = {}
    for env, cred in keys:
        names.setdefault(env, []).append(cred)
    workers = _workers()
    held: dict[tuple[str, int], list[str | None]] = {}
    tasks: list[tuple[Backend, list[str], list[str | None], int]] = []
    for env, creds in names.items():
        for i, backend in enumerate(backends[env]):
            ids = held[(env, i)] = [None] * len(creds)
            local = backend.capabilities.local
            share = len(creds) if local else max(1, -(-len(creds) // (workers * 4)))
            for start in range(0, len(creds), share):
                tasks.append((backend, creds[start : start + share], ids, start))

    def run(task: tuple[Backend, list[str], list[str | None], int]) -> None:
        backend, creds, ids, start = task
        for j, cred in enumerate(creds):
            ids[start + j] = _current_id(backend, cred)

    read_many(tasks, run, local=lambda task: task[0].capabilities.local, workers=workers)
    out: list[dict[str, str | None]] = []
    seen: dict[str, int] = {}
    for env, _ in keys:
        n = seen[env] = seen.get(env, -1) + 1
        out.append({b.name: held[(env, i)][n] for i, b in enumerate(backends[env])})
    return out


def gather(src: Sources, environments: list[str]) -> list[CredentialStatus]:
    """Every credential of ``environments`` (in the configuration's order) with its state."""
    config, snap, now = src.config, src.snapshot, src.now
    items = plan_from(
        config, snap.states, snap.open_rotations, snap.open_revokes, now, environments=environments
    )
    # a holder renews its leases every third of lock_ttl: one with less than a third left has
    # missed a heartbeat and more (it crashed, or it is stopped)
    missed = src.lock_ttl / 3
    stalled = {lock.name: lock for lock in snap.locks if lock.expires_at - now < missed}
    held_by = current_ids(src.backends, [(i.environment, i.credential) for i in items])
    settings = {
        name: {c.name: c for c in config.environments[name].credentials} for name in environments
    }
    out = []
    for item, held in zip(items, held_by, strict=True):
        key = (item.environment, item.credential)
        cred = settings[item.environment][item.credential]
        state = snap.states.get(key)
        rot = snap.open_rotations.get(key)
        revoke = snap.open_revokes.get(key)
        views = stale_in(src.activity.get(key, {}), state.current_version_id if state else None)
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
                stale_readers=tuple(views),
                open_revoke=revoke.step if revoke is not None else None,
                stalled_lease=_stalled(stalled, item.environment, item.credential, now)
                if item.is_due
                else None,
                unaccounted=state.unaccounted if state else 0,
            )
        )
    return out


async def collect(runtime: Runtime, environment: str | None = None) -> list[CredentialStatus]:
    """Every credential's status, read through the live ``runtime`` (of ``environment`` or of
    every environment it holds)."""
    import asyncio

    from rotator.journal.snapshot import of_journal
    from rotator.readers import activity

    config = runtime.config
    envs = [environment] if environment else list(runtime.environments)
    for name in envs:
        config.environment(name)

    def read() -> list[CredentialStatus]:
        journal = runtime.journal
        src = Sources(
            config=config,
            snapshot=of_journal(journal),
            activity=activity(journal, window=config.api.readers.active_window),
            backends={name: runtime.environments[name].backends for name in envs},
            lock_ttl=journal.lock_ttl,
            now=runtime.engine.clock.now(),
        )
        return gather(src, envs)

    return await asyncio.to_thread(read)


def read_status(
    config: Config, environment: str | None = None, *, clock: Clock | None = None
) -> list[CredentialStatus] | None:
    """``rotator status`` without a runtime: the journal's snapshot, the effective credentials
    (configured, and discovered where the journal holds discovered connections), and the
    backends of the environments shown, closed on the way out. ``None`` where the journal
    cannot be read that way (see :func:`rotator.journal.snapshot.read`): open the runtime and
    :func:`collect`. Raises ConfigError for keys shared across environments, as a runtime
    does, and for a backend that cannot be opened. ``clock``: the system's unless given."""
    import backends as registry
    from rotator.apart import refuse_shared_keys
    from rotator.clock import SYSTEM
    from rotator.journal import snapshot
    from rotator.readers import fold

    envs = [environment] if environment else list(config.environments)
    refuse_shared_keys(config)
    now = (clock or SYSTEM).now()
    snap = snapshot.read(
        config.journal.url, since=now - config.api.readers.active_window, environments=envs
    )
    if snap is None:
        return None
    for name in envs:
        if snap.discovered.get(name):  # the credentials discovery enrolled join the configured
            from rotator.rotation import enrolled  # not discovery: SQLAlchemy, the Makini client

            known = [enrolled.Known(*_fields(r)) for r in snap.discovered[name]]
            config.environments[name] = enrolled.effective(config.environments[name], known)
    opened: dict[str, list[Backend]] = {}
    try:
        for name in envs:
            opened[name] = []
            for settings in config.environments[name].backend_settings:
                opened[name].append(registry.build(settings, name))
        src = Sources(
            config=config,
            snapshot=snap,
            activity=fold(snap.reads),
            backends=opened,
            lock_ttl=config.journal.lock_ttl,
            now=now,
        )
        return gather(src, envs)
    finally:
        for built in opened.values():
            for backend in built:
                backend.close()


def _fields(row: Any) -> tuple[Any, ...]:
    return (
        row.connection_id, row.credential, row.status, row.platform, row.company, row.name,
        row.gone_at,
    )  # fmt: skip


def _stalled(locks: dict[str, LockView], env: str, cred: str, now: datetime) -> str | None:
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
