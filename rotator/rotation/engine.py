"""The rotation engine: the journaled state machine of DESIGN.md.

One rotation moves through ``started → issued → staged → verified → promoted → (retiring →)
done``. Each step first checks whether its effect is already there, and the journal records a
step only once its effect is durable, or before an effect that would make a retry impossible
(``retiring`` seals the old pair before it becomes unreadable), so the process may die between
any two lines: the next run resumes the open rotation from its last recorded step.

1. **issue**: ask Makini for a new token pair and seal it into the journal before anything else.
2. **stage**: write it as *pending* to every backend of the environment (idempotent per version).
3. **verify**: Makini must accept it *and* name the expected connection. A definite rejection
   rolls back; a transient failure leaves the rotation staged for the next run.
4. **promote**: make it *current* in every backend, drop the sealed copy, tell the readers.
5. **retire**: after the grace period (zero when Makini already killed the old token) make the
   old version unreadable everywhere and revoke its pair at Makini where Makini allows.

A credential is driven by one worker at a time, across every process on the journal: each drive
holds the credential's lease (:mod:`rotator.journal.leases`) under a holder name of its own,
kept alive by a heartbeat; every journal write of the drive is conditional on it, and it is
checked before every write outside the journal. Whether the credential is still due is decided
again once the lease is held, from what the journal says then (never from a plan read before):
a credential that another worker rotated meanwhile is not rotated twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.engine import Connection

from rotator import faults
from rotator.clock import SYSTEM, Clock
from rotator.errors import (
    InvalidToken,
    LeaseLost,
    LockBusy,
    MakiniError,
    MakiniRejected,
    RotationError,
    RotatorError,
    Stopping,
)
from rotator.journal import DriveStart, Journal, Lease, LeaseKeeper, Rotation, Step
from rotator.model import Stage, StoredVersion, TokenPair, new_version_id
from rotator.rotation import discovery, unaccounted
from rotator.rotation.environment import EnvironmentRuntime
from rotator.rotation.events import Events
from rotator.rotation.schedule import plan_credential
from rotator.rotation.sealing import seal, unseal
from rotator.rotation.work import Outcome, RotationResult, Work
from rotator.rotation.worker import Worker
from rotator.settings import CredentialSettings

log = structlog.get_logger("rotator.engine")


def default_owner() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Turn:
    """A drive's turn at Makini: one of its environment's ``makini.max_concurrency`` slots.

    A drive holds one only while it talks to Makini, not for its whole length: its journal
    writes and backend writes leave the slot to another drive, so ``scheduler.concurrency``
    drives keep Makini busy with no more than ``max_concurrency`` calls at once. For a token's
    issue the slot is taken before the request is recorded as sent (``asked_at``) and given
    back once its answer is recorded: no request is recorded as sent while it waits for a slot,
    and a row with ``asked_at`` set is one of at most ``max_concurrency``.
    """

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self._gate = gate
        self.held = False

    async def take(self) -> None:
        if not self.held:
            await self._gate.acquire()
            self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self._gate.release()

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Around one call to Makini: the slot, unless the drive holds it already."""
        took = not self.held
        await self.take()
        try:
            yield
        finally:
            if took:
                self.give()


@dataclass
class _Drive:
    """The state of one drive of one credential (lives for one call)."""

    rt: EnvironmentRuntime
    cred: CredentialSettings
    lease: Lease
    makini: _Turn
    request_ids: list[str | None] = field(default_factory=list)
    fresh: bool = False
    """The rotation was started by this drive (its first attempt is recorded already)."""
    old: StoredVersion | None = None
    """The version current when this drive started the rotation, as read then."""
    new: StoredVersion | None = None
    """The rotation's new version, as issued or unsealed by this drive."""
    asked_at: datetime | None = None
    """When this drive asked Makini for the token it received."""
    request: datetime | None = None
    """The ``asked_at`` stamped on the row for the request in flight: with the rotation, what
    names the request in ``unaccounted_tokens``."""
    unaccounted: int = 0
    """Open unaccounted tokens of the credential (see :mod:`rotator.rotation.unaccounted`)."""
    holder_gone_by: datetime | None = None
    """Where this drive took the lease over from a holder that stopped renewing it: by when that
    holder was gone (it renews every third of the lease, so it missed the renewal due two
    thirds of a lease before the expiry)."""
    released: asyncio.Task[None] | None = None
    """The lease's release, once submitted (see ``RotationEngine._release``)."""
    lease_returned: bool = False
    """The drive's last journal write gave the lease back with it (no release to submit)."""

    @property
    def where(self) -> str:
        return f"{self.rt.name}/{self.cred.name}"


RevokeResumer = Callable[["RotationEngine", str, str, Rotation, Lease], Awaitable[RotationResult]]
"""Finishes an unfinished emergency revoke of a credential whose lease the caller holds
(environment, credential, the revoke's row, the lease)."""


class RotationEngine:
    def __init__(
        self,
        journal: Journal,
        environments: dict[str, EnvironmentRuntime],
        *,
        concurrency: int = 64,
        owner: str | None = None,
        retry_after_failure: timedelta = timedelta(minutes=10),
        clock: Clock = SYSTEM,
        resume_revoke: RevokeResumer | None = None,
    ) -> None:
        """``resume_revoke``: what a drive does when it finds an unfinished emergency revoke of
        its credential (without one, it leaves the revoke to ``rotator revoke --resume``)."""
        self.journal = journal
        self.environments = environments
        self.owner = owner or default_owner()
        self.concurrency = concurrency
        self.retry_after_failure = retry_after_failure
        self.clock = clock
        self.resume_revoke = resume_revoke
        self.worker = Worker(journal, threads=max(4, concurrency))
        self.leases = LeaseKeeper(
            journal.lock_ttl.total_seconds(),
            lambda owners: self.worker.journal(journal.renew_many, owners),
            lambda name, holder: self.worker.journal(journal.renew, name, holder),
            clock=clock,
        )
        self.events = Events()
        self._drives = itertools.count(1)
        self._active = 0
        self.stopping = False
        """Set by :meth:`stop`: no drive starts, nor a new rotation; drives in flight go on."""
        self._driving: set[asyncio.Task[Any]] = set()
        self._makini_gates: dict[str, asyncio.Semaphore] = {}

    @property
    def active(self) -> int:
        """Drives and revokes in progress (the drain waits for them)."""
        return self._active

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Count work outside a drive (a revoke) as in progress while the block runs."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    @property
    def driving(self) -> set[asyncio.Task[Any]]:
        """The tasks driving a credential right now (the drain waits for them, then cancels)."""
        return set(self._driving)

    def close(self) -> None:
        self.worker.close()

    async def aclose(self) -> None:
        """Stop the heartbeat, give back any lease still held, and stop the worker threads."""
        if self.leases.held:
            await self.drain(0)
        await self.leases.aclose()
        self.close()

    def new_lease(self, env: str, name: str, kind: str = "drive") -> Lease:
        """A lease on ``env/name`` under a holder name of its own (this process, this drive)."""
        return self.leases.new(f"{env}/{name}", f"{self.owner}/{kind}-{next(self._drives)}")

    async def fence(self, lease: Lease, where: str) -> None:
        """Stop (LeaseLost) unless ``lease`` is still held, before a write outside the journal
        (see :mod:`rotator.journal.leases`). Every write of a drive or a revoke to a backend or to
        Makini is fenced by it."""
        await self.leases.check(lease, where)

    def _release(self, d: _Drive) -> asyncio.Task[None]:
        """Give the lease back, as a task: on SQLite the release joins the writer's queue
        behind this drive's own writes and ahead of any later acquire, so a caller may free its
        concurrency slot first and await the task after. A lease not released expires."""
        self.leases.drop(d.lease)

        async def release() -> None:
            try:
                await self.worker.journal(self.journal.release, *d.lease.key)
            except RotatorError as exc:
                log.warning("lock.release_failed", lock=d.lease.name, error=exc.message)

        return asyncio.ensure_future(release())

    def runtime(self, env: str) -> EnvironmentRuntime:
        return self.environments[env]

    # stopping ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new work: drives not started yet end ``parked``, and so does a drive that
        was about to start a new rotation; drives in flight go on (:meth:`drain` bounds them)."""
        self.stopping = True

    async def drain(self, timeout_s: float) -> int:
        """After :meth:`stop`: wait up to ``timeout_s`` for the drives in flight, cancel the
        rest (each waits for its backend call in progress to return, so nothing of it runs
        on), then give back every lease this process holds, for another worker to take over at
        once. Returns how many drives had to be cancelled."""
        self.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._driving and loop.time() < deadline:
            await asyncio.wait(set(self._driving), timeout=deadline - loop.time())
        cancelled = [t for t in self._driving if not t.done()]
        for task in cancelled:
            task.cancel()
        if cancelled:
            await asyncio.wait(cancelled)
        await self.leases.aclose()
        held = self.leases.forget_all()
        if held:
            try:
                await self.worker.journal(self.journal.release_many, held)
            except RotatorError as exc:
                log.warning("lock.release_failed", leases=len(held), error=exc.message)
        return len(cancelled)

    # public entry points ---------------------------------------------------------------------

    async def rotate(
        self,
        env: str,
        name: str,
        *,
        reason: str,
        actor: str,
        seen_version: str | None = None,
        seen: bool = False,
    ) -> RotationResult:
        """Rotate ``env/name`` now, whatever the schedule says: resume an open rotation, else
        start one, up to promotion, and retire at once when no grace period applies. With
        ``seen``, only if ``seen_version`` is still current (else ``nothing``); without, the
        current version when this is called.

        Never raises for an operational failure: the result says what happened and the journal
        keeps the rotation open where a later run can resume it.
        """
        work = Work(env, name, reason, forced=True, seen_version=seen_version, seen=seen)
        [result] = await self.rotate_many([work], actor=actor)
        return result

    async def run_due(
        self, env: str, name: str, *, reason: str = "scheduled", actor: str = "scheduler"
    ) -> RotationResult:
        """Drive ``env/name`` as the scheduler does: whatever is due once the lease is held
        (resume, retire, rotate), else ``nothing``."""
        [result] = await self.rotate_many([Work(env, name, reason)], actor=actor)
        return result

    async def rotate_many(
        self,
        items: Iterable[Work],
        *,
        actor: str,
        progress: Callable[[RotationResult], None] | None = None,
    ) -> list[RotationResult]:
        """Drive many credentials concurrently: ``concurrency`` at once, with at most each
        environment's ``makini.max_concurrency`` calls to Makini at once among them (see
        :class:`_Turn`)."""
        work = await self._pinned(list(items))
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: Work) -> RotationResult:
            async with gate:
                result, released = await self._rotate(item, actor)
            if progress:
                progress(result)
            if released is not None:  # outside the gate: the next drive starts meanwhile
                await released
            return result

        return list(await asyncio.gather(*(one(item) for item in work)))

    async def _pinned(self, items: list[Work]) -> list[Work]:
        """Forced work pinned to the current version as the journal says now."""
        envs = {w.environment for w in items if w.forced and not w.seen}
        if not envs:
            return items
        states: dict[tuple[str, str], Any] = {}
        for env in envs:
            states.update(await self.worker.call(self.journal.states, env))

        def pin(w: Work) -> Work:
            if not w.forced or w.seen:
                return w
            st = states.get((w.environment, w.credential))
            return replace(w, seen=True, seen_version=st.current_version_id if st else None)

        return [pin(w) for w in items]

    async def _rotate(
        self, work: Work, actor: str
    ) -> tuple[RotationResult, asyncio.Task[None] | None]:
        """One drive, returning before the lease's release is durable (and the task that makes
        it so). ``active`` counts the drive until its lease is released."""
        env, name = work.environment, work.credential
        rt = self.runtime(env)
        cred = rt.settings.credential(name, env)
        if self.stopping:
            parked = RotationResult(env, name, Outcome.PARKED, detail="the process is stopping")
            return parked, None
        refused = await self._refuse_offboarded(rt, cred, work)
        if refused is not None:  # not a failed rotation: none was started
            return refused, None
        started = asyncio.get_running_loop().time()
        d = _Drive(rt, cred, self.new_lease(env, name), _Turn(self.makini_gate(env)))
        task = asyncio.current_task()
        if task is not None:
            self._driving.add(task)
        self._active += 1
        try:
            result = await self._drive_locked(d, work, actor)
        except asyncio.CancelledError:
            if not self.stopping or task is None:
                raise
            task.uncancel()  # the drain cancelled it: a result like any other
            result = RotationResult(
                env,
                name,
                Outcome.PARKED,
                detail="stopped mid-step by the drain; the next run resumes it from the last "
                "journaled step",
            )
        finally:
            d.makini.give()
            if task is not None:
                self._driving.discard(task)
            if d.released is None:
                self._active -= 1
            else:
                d.released.add_done_callback(self._drive_finished)
        result.duration_s = asyncio.get_running_loop().time() - started
        self.events.result.publish(result)
        return result, d.released

    async def _refuse_offboarded(
        self, rt: EnvironmentRuntime, cred: CredentialSettings, work: Work
    ) -> RotationResult | None:
        """Nothing issues a token for a discovered credential whose connection is gone at
        Makini: the schedule skips it, and a forced rotation (a person, the admin API, a
        re-enrolment) is checked against the journal as it is now, since another process may
        have off-boarded it or enrolled it again after this one last looked."""
        if cred.name not in rt.settings.offboarded and not (
            work.forced and not any(c is cred for c in rt.settings.configured_credentials)
        ):
            return None
        row = await self.worker.read(discovery.gone_row, self.journal, rt.name, cred.connection_id)
        if row is None or row.credential != cred.name:
            return None
        exc = discovery.offboarded_error(
            rt.settings, rt.name, cred.name, row.connection_id, row.gone_at,
            purged=row.status == discovery.PURGED,
        )
        log.warning("rotation.refused", environment=rt.name, credential=cred.name,
                    error=exc.message)
        return RotationResult(
            rt.name, cred.name, Outcome.FAILED, error=f"{exc.message}; next: {exc.hint}"
        )

    def makini_gate(self, env: str) -> asyncio.Semaphore:
        """The environment's ``makini.max_concurrency`` slots, shared by every drive of this
        engine (every ``rotate_many`` call at once)."""
        gate = self._makini_gates.get(env)
        if gate is None:
            limit = self.runtime(env).settings.makini.max_concurrency
            gate = self._makini_gates[env] = asyncio.Semaphore(limit)
        return gate

    def _drive_finished(self, _: object) -> None:
        self._active -= 1

    # the drive -------------------------------------------------------------------------------

    async def _drive_locked(self, d: _Drive, work: Work, actor: str) -> RotationResult:
        env, name = d.rt.name, d.cred.name
        rot: Rotation | None = None
        try:
            start = await self.worker.journal(self.journal.begin_drive, d.lease.key, env, name)
        except RotatorError as exc:  # the journal failed: nothing was started
            log.warning("rotation.stopped", environment=env, credential=name, error=exc.message)
            return RotationResult(env, name, Outcome.FAILED, error=exc.message)
        if not start.taken:
            return RotationResult(
                env, name, Outcome.BUSY, error="another worker holds this credential"
            )
        self.leases.add(d.lease)
        try:
            if start.revoke is not None:  # an unfinished emergency revoke comes first
                return await self._resume_revoke(d, start.revoke)
            rot = start.rotation
            action, why = self._decide(d, work, start)
            if action is None:
                return RotationResult(
                    env, name, Outcome.NOTHING, rotation_id=rot.id if rot else None, detail=why
                )
            d.unaccounted = start.state.unaccounted if start.state else 0
            if start.expired_holder is not None:
                d.holder_gone_by = start.expired_holder - self.journal.lock_ttl * 2 / 3
            if (
                action == "rotate"
                and rot is not None
                and rot.step in (Step.PROMOTED, Step.RETIRING)
            ):
                rot = await self._retire(d, rot, early=rot.step == Step.PROMOTED)
                rot = None
            if rot is None:
                self._park_if_stopping(d)
                rot = await self._begin(d, work.reason, actor)
                d.fresh = True
            return await self._advance(d, rot)
        except RotatorError as exc:
            return await self._stopped(d, rot, exc)
        finally:
            if not d.lease_returned:
                d.released = self._release(d)

    def _decide(self, d: _Drive, work: Work, start: DriveStart) -> tuple[str | None, str]:
        """What to do, decided under the lease from what the journal says now: ``(action,
        why)``, action ``None`` when nothing is due any more."""
        state = start.state
        if work.forced:
            current = state.current_version_id if state else None
            if current != work.seen_version:
                return None, (
                    f"another worker rotated it since this was asked (current version "
                    f"{(current or 'none')[:13]}): not rotated again"
                )
            return "rotate", work.reason
        item = plan_credential(
            d.rt.name,
            d.rt.settings,
            d.cred,
            state,
            start.rotation,
            self.clock.now(),
            self.retry_after_failure,
        )
        if not item.is_due:
            return None, f"no longer due: {item.reason}"
        return item.action, item.reason

    async def _stopped(self, d: _Drive, rot: Rotation | None, exc: RotatorError) -> RotationResult:
        env, name = d.rt.name, d.cred.name
        if rot is not None:
            rot = await self.worker.journal(self.journal.rotation, rot.id) or rot
            if not isinstance(exc, LockBusy):  # lost, parked or pre-empted: not our state
                dead = await self._old_is_dead(d, rot)
                with contextlib.suppress(LockBusy):  # lost meanwhile: the holder reports
                    await self.worker.journal(self._record_failure, d, rot, exc, dead)
        parked = isinstance(exc, Stopping)
        step = rot.step if rot else None
        if parked:
            log.info("rotation.parked", environment=env, credential=name, step=step)
        else:
            log.warning(
                "rotation.stopped", environment=env, credential=name, step=step, error=exc.message
            )
        if parked:
            outcome = Outcome.PARKED
        elif rot is not None and rot.is_open:
            outcome = Outcome.DEFERRED
        else:
            outcome = Outcome.FAILED
        return RotationResult(
            env,
            name,
            outcome,
            rotation_id=rot.id if rot else None,
            version_id=rot.version_id if rot else None,
            step=step,
            error=None if parked else exc.message,
            detail=exc.message if parked else None,
        )

    async def _resume_revoke(self, d: _Drive, row: Rotation) -> RotationResult:
        """Finish an unfinished revoke (this drive holds the lease) instead of rotating."""
        if self.resume_revoke is None:
            return RotationResult(
                d.rt.name,
                d.cred.name,
                Outcome.DEFERRED,
                rotation_id=row.id,
                step=row.step,
                error="an emergency revoke of this credential is unfinished: "
                f"`rotator revoke {d.rt.name} {d.cred.name} --resume` finishes it",
            )
        async with d.makini.call():  # the revoke's calls to Makini take one slot
            return await self.resume_revoke(self, d.rt.name, d.cred.name, row, d.lease)

    async def _old_is_dead(self, d: _Drive, rot: Rotation) -> bool | None:
        """For a rotation stopped after issue: did Makini kill the old token? (None: unknown)"""
        if rot.invalidated_old is not None or rot.step not in (Step.ISSUED, Step.STAGED):
            return rot.invalidated_old
        try:
            return await self._probe_old(d, rot)
        except RotatorError:
            return None

    def _record_failure(
        self, d: _Drive, rot: Rotation, exc: RotatorError, old_dead: bool | None
    ) -> None:
        values: dict[str, Any] = {
            "last_attempt_at": self.clock.now(),
            "last_outcome": "error",
            "last_error": exc.message,
        }
        if old_dead and rot.step in (Step.ISSUED, Step.STAGED, Step.VERIFIED):
            # Makini killed the old token when it issued the new one: until this rotation is
            # promoted, readers get a token Makini rejects. Say so, with the cause.
            values["attention"] = (
                f"Makini invalidated the old token when it issued the new one, and the rotation "
                f"stopped at {rot.step}: the backends serve a dead token until it completes "
                f"(cause: {exc.message}); the new token is sealed in the journal, `rotator "
                f"run-due` resumes it once the cause is fixed"
            )
        self.journal.set_state(rot.environment, rot.credential, lease=d.lease.key, **values)

    def _park_if_stopping(self, d: _Drive) -> None:
        """Before a new rotation starts: not once the process is stopping."""
        if self.stopping:
            raise Stopping(
                "the process is stopping: no new rotation started",
                where=d.where,
                hint="nothing to do: another replica or the next run resumes it at once",
            )

    async def _advance(self, d: _Drive, rot: Rotation) -> RotationResult:
        steps: dict[str, Callable[[_Drive, Rotation], Awaitable[Rotation]]] = {
            Step.STARTED: self._issue,
            Step.ISSUED: self._stage,
            Step.STAGED: self._verify,
            Step.VERIFIED: self._promote,
        }
        promoted_now = False
        while rot.step in steps:  # once started, a drive finishes (the drain's deadline aside)
            rot = await steps[rot.step](d, rot)
            promoted_now = promoted_now or rot.step == Step.PROMOTED
            faults.checkpoint(rot.step, d.cred.name)
        ended = {Step.ROLLED_BACK: Outcome.ROLLED_BACK, Step.FAILED: Outcome.FAILED}
        outcome = ended.get(Step(rot.step))
        if rot.step == Step.RETIRING or (
            rot.step == Step.PROMOTED
            and rot.retire_after is not None
            and rot.retire_after <= self.clock.now()
        ):
            rot = await self._retire(d, rot, last=True)
            faults.checkpoint(rot.step, d.cred.name)
            outcome = Outcome.ROTATED if promoted_now else Outcome.RETIRED
        elif rot.step == Step.PROMOTED:
            outcome = Outcome.ROTATED if promoted_now else Outcome.WAITING
        return RotationResult(
            d.rt.name,
            d.cred.name,
            outcome or Outcome.NOTHING,
            rotation_id=rot.id,
            version_id=rot.version_id,
            step=rot.step,
            error=rot.error,
        )

    async def _begin(self, d: _Drive, reason: str, actor: str) -> Rotation:
        # a secret the rotation needs and cannot read (the Makini client secret, the sealing
        # key) stops it here, before a rotation is opened that nothing could finish
        _ = d.rt.makini, d.rt.sealer
        current = await self.worker.call(d.rt.primary.read, d.cred.name, Stage.CURRENT)
        if d.cred.method == "refresh" and (current is None or current.tokens.refresh is None):
            raise RotationError(
                f"credential {d.cred.name} uses the refresh grant but the primary backend "
                "holds no refresh token to start from",
                where=f"{d.rt.name}/{d.cred.name} on {d.rt.primary.name}",
                hint=f"bootstrap it once: rotator import {d.rt.name} {d.cred.name} "
                "(a token pair from Makini Link), then rotations continue on their own",
            )
        now = self.clock.now()
        rot = Rotation(
            id=str(uuid.uuid4()),
            environment=d.rt.name,
            credential=d.cred.name,
            kind="rotate",
            step=Step.STARTED,
            version_id=new_version_id(),
            old_version_id=current.version_id if current else None,
            old_fingerprint=current.tokens.access.fingerprint if current else None,
            reason=reason[:500],
            actor=actor[:200],
            started_at=now,
            updated_at=now,
            # written before Makini is asked: the first attempt is about to happen
            attempts=1,
            asked_at=now,
            notes="[]",
        )
        started = {
            "actor": rot.actor,
            "action": "rotation.started",
            "outcome": "started",
            "version_id": rot.version_id,
            "rotation_id": rot.id,
            "reason": rot.reason,
            "old_version_id": rot.old_version_id,
        }
        await d.makini.take()  # before the row records the request as sent (see _issue)
        await self.worker.journal(
            self.journal.add_rotation, rot, lease=d.lease.key, audit=started
        )
        d.old = current
        log.info(
            "rotation.started",
            environment=d.rt.name,
            credential=d.cred.name,
            rotation=rot.id,
            version=rot.version_id,
            reason=reason,
        )
        return rot

    # step 1 ------------------------------------------------------------------------------------

    async def _issue(self, d: _Drive, rot: Rotation) -> Rotation:
        """Get a new token pair from Makini and seal it into the journal before anything else.

        ``asked_at`` is set on the row before each request and cleared once its answer is
        recorded: a resume that finds it set records the lost answer as an unaccounted token.
        """
        if rot.sealed is not None:
            return await self._commit(d, rot, {"step": Step.ISSUED, "asked_at": None})
        if not d.fresh and rot.asked_at is not None:  # the last answer was never recorded
            unanswered = self._lost(
                d,
                rot,
                rot.asked_at,
                "the rotator stopped (a crash, a kill, a lost lease) after it asked Makini "
                "for a token and before it recorded the answer: if the request reached "
                "Makini, a token was issued that no backend holds",
            )
            rot = await self._commit(d, rot, {"asked_at": None}, lost=unanswered)
            await unaccounted.outlast(
                d.rt.settings.makini,
                unanswered.asked_at,
                gone_by=d.holder_gone_by,
                clock=self.clock,
            )
            await self._fence(d)
        await d.makini.take()  # before the request is recorded as sent (fresh: _begin took it)
        try:
            return await self._ask(d, rot)
        finally:
            d.makini.give()  # its answer, or that none came, is recorded

    async def _ask(self, d: _Drive, rot: Rotation) -> Rotation:
        """Ask Makini for the token pair and record the answer (the drive holds its turn)."""
        if not d.fresh:
            rot = await self._commit(
                d, rot, {"attempts": rot.attempts + 1, "asked_at": self.clock.now()}
            )
        # stamped after every unaccounted entry recorded so far (the one just recorded too):
        # the request goes out after them all, so where Makini kills older tokens on issue, a
        # token it brings kills theirs
        d.asked_at = self.clock.now()
        d.request = rot.asked_at
        try:
            issued = await self._ask_makini(d, rot)
        except MakiniRejected as exc:
            return await self._fail(d, rot, f"Makini refused to issue a token: {exc.message}", exc)
        except MakiniError as exc:
            lost = None
            if exc.ambiguous:
                lost = self._lost(
                    d,
                    rot,
                    d.request or d.asked_at,
                    f"Makini may have issued a token that was not received ({exc.message})",
                    request_id=exc.request_id,
                )
            await self._commit(d, rot, {"asked_at": None}, lost=lost)
            raise
        except RotatorError:
            await self._commit(d, rot, {"asked_at": None})
            raise
        d.request_ids.append(issued.request_id)
        version = StoredVersion(
            environment=d.rt.name,
            credential=d.cred.name,
            version_id=rot.version_id,
            tokens=issued.tokens,
            created_at=self.clock.now(),
        )
        d.new = version
        invalidates = d.rt.settings.makini.issue_invalidates_previous
        try:
            return await self._commit(
                d,
                rot,
                {
                    "step": Step.ISSUED,
                    "sealed": seal(d.rt, version),
                    "fingerprint": issued.tokens.access.fingerprint,
                    "expires_at": issued.tokens.expires_at,
                    "invalidated_old": invalidates,
                    "asked_at": None,
                },
                after=self._settle_unaccounted(d, issued.tokens, invalidates is True),
            )
        except LeaseLost:
            await self._account_late_token(d, rot, version)
            raise

    def _lost(
        self,
        d: _Drive,
        rot: Rotation,
        asked_at: datetime,
        cause: str,
        *,
        request_id: str | None = None,
        fingerprint: str | None = None,
        live_until: datetime | None = None,
    ) -> unaccounted.Lost:
        d.unaccounted += 1
        return unaccounted.Lost(
            environment=d.rt.name,
            credential=d.cred.name,
            connection_id=d.cred.connection_id,
            rotation_id=rot.id,
            asked_at=asked_at,
            cause=cause,
            request_id=request_id,
            fingerprint=fingerprint,
            live_until=live_until,
        )

    def _settle_unaccounted(
        self, d: _Drive, tokens: TokenPair, invalidates: bool
    ) -> Callable[[Connection, Rotation], None] | None:
        """What a step that records a newly issued token does for the credential's unaccounted
        tokens (nothing, and no statement, when it has none)."""
        if d.unaccounted <= 0 or d.asked_at is None:
            return None
        return unaccounted.settle_hook(
            self.journal,
            asked_at=d.asked_at,
            expires_at=tokens.expires_at,
            late=timedelta(seconds=d.rt.settings.makini.timeout_s),
            invalidates=invalidates,
            clock=self.clock,
        )

    async def _account_late_token(self, d: _Drive, rot: Rotation, version: StoredVersion) -> None:
        """This drive received a token after it lost the lease (it was paused or cut off
        longer than the lease): the journal refused to record it. Never drop a token silently:
        revoke it at Makini where that is possible, and report it either way."""
        tokens = version.tokens
        revoked = await self._revoke_quietly(d, tokens)
        lost = unaccounted.Lost(
            environment=d.rt.name,
            credential=d.cred.name,
            connection_id=d.cred.connection_id,
            rotation_id=rot.id,
            asked_at=d.request or d.asked_at or self.clock.now(),
            cause="Makini's answer arrived after this worker lost the credential's lease (it was "
            "paused or cut off for longer than journal.lock_ttl), so the token was not stored",
            fingerprint=tokens.access.fingerprint,
            live_until=tokens.expires_at,
        )

        def report(conn: Connection) -> None:
            entry = unaccounted.record(self.journal, conn, lost, actor=rot.actor, clock=self.clock)
            if revoked:
                unaccounted.close(
                    self.journal,
                    conn,
                    [entry],
                    "revoked at makini.revoke_path as soon as it arrived",
                    rot.actor,
                    clock=self.clock,
                )

        try:
            await self.worker.journal(self.journal.transaction, "report a late token", report)
        except RotatorError as exc:
            log.error(
                "rotation.late_token_unrecorded",
                environment=d.rt.name,
                credential=d.cred.name,
                token=tokens.access.short,
                revoked=revoked,
                error=exc.message,
            )

    async def _commit(
        self,
        d: _Drive,
        rot: Rotation,
        values: dict[str, Any],
        *,
        lost: unaccounted.Lost | None = None,
        after: Callable[[Connection, Rotation], None] | None = None,
        **kw: Any,
    ) -> Rotation:
        """Record a step of ``rot`` under the drive's lease (with an unaccounted token to
        report, and more work of the same transaction)."""
        hook = unaccounted.recording(self.journal, lost, after, clock=self.clock)
        return await self.worker.journal(
            self.journal.commit_step, rot.id, values, lease=d.lease.key, after=hook, **kw
        )

    async def _ask_makini(self, d: _Drive, rot: Rotation) -> Any:
        assert d.makini.held, "a drive takes its turn before it records a request as sent"
        if d.cred.method == "issue":
            return await d.rt.makini.issue_token(d.cred.connection_id)
        old = await self._old_version(d, rot)
        if old is None or old.tokens.refresh is None:
            raise RotationError(
                "the version to refresh from is no longer readable in the primary backend",
                where=f"{d.rt.name}/{d.cred.name}",
                rotation_id=rot.id,
                hint=f"import a fresh pair: rotator import {d.rt.name} {d.cred.name}",
            )
        return await d.rt.makini.refresh(old.tokens.refresh)

    async def _old_version(self, d: _Drive, rot: Rotation) -> StoredVersion | None:
        if rot.old_version_id is None:
            return None
        if d.old is not None and d.old.version_id == rot.old_version_id:
            return d.old
        return await self.worker.call(d.rt.primary.read_version, d.cred.name, rot.old_version_id)

    def _unseal(self, d: _Drive, rot: Rotation) -> StoredVersion:
        if rot.sealed is None:
            raise RotationError(
                "the journal no longer holds the new token for this rotation",
                where=f"{d.rt.name}/{d.cred.name}",
                rotation_id=rot.id,
            )
        if d.new is None or d.new.version_id != rot.version_id:
            d.new = unseal(d.rt, rot)
        return d.new

    # step 2 ------------------------------------------------------------------------------------

    async def _stage(self, d: _Drive, rot: Rotation) -> Rotation:
        """Write the new version as pending to every backend (each write idempotent)."""
        version = self._unseal(d, rot)
        await self._fence(d)
        await self.worker.each(d.rt.backends, lambda b: b.stage_pending(version))
        return await self._commit(d, rot, {"step": Step.STAGED})

    # step 3 ------------------------------------------------------------------------------------

    async def _verify(self, d: _Drive, rot: Rotation) -> Rotation:
        """Makini must accept the new token and name the expected connection."""
        version = self._unseal(d, rot)
        try:
            async with d.makini.call():
                info = await d.rt.makini.verify(version.tokens.access, d.cred.connection_id)
        except MakiniRejected as exc:
            return await self._rollback(d, rot, version, exc)
        d.request_ids.append(info.request_id)
        invalidated = rot.invalidated_old
        settle = None
        if invalidated is None and rot.old_version_id is not None:
            invalidated = await self._probe_old(d, rot)
            if invalidated:  # Makini kills older tokens on issue: earlier lost ones too
                settle = self._settle_unaccounted(d, version.tokens, True)
        return await self._commit(
            d, rot, {"step": Step.VERIFIED, "invalidated_old": invalidated}, after=settle
        )

    async def _probe_old(self, d: _Drive, rot: Rotation) -> bool | None:
        """Where it is unknown whether issuing killed the old token, ask Makini."""
        old = await self._old_version(d, rot)
        return None if old is None else await self._dead(d, old)

    @staticmethod
    async def _dead(d: _Drive, version: StoredVersion) -> bool | None:
        """Whether Makini refuses ``version``'s token for the credential (None: it cannot say)."""
        try:
            async with d.makini.call():
                await d.rt.makini.verify(version.tokens.access, d.cred.connection_id)
        except InvalidToken:
            return True
        except MakiniError:
            return None
        return False

    async def _rollback(
        self, d: _Drive, rot: Rotation, version: StoredVersion, exc: MakiniRejected
    ) -> Rotation:
        await self._fence(d)
        await self.worker.each(
            d.rt.backends, lambda b: b.make_unreadable(d.cred.name, rot.version_id)
        )
        revoked = await self._revoke_quietly(d, version.tokens)
        attention = None
        if rot.invalidated_old or await self._current_dead(d):
            attention = (
                "the new token was rejected and the current token no longer works: the "
                "connection has no working token; the customer must reconnect in Makini"
            )
        message = f"Makini rejected the new token at verify: {exc.message}"
        return await self._stop(
            d,
            rot,
            Step.ROLLED_BACK,
            message,
            attention,
            request_ids=[*d.request_ids, exc.request_id],
            new_token_revoked=revoked,
        )

    async def _current_dead(self, d: _Drive) -> bool:
        current = await self.worker.call(d.rt.primary.read, d.cred.name, Stage.CURRENT)
        return current is None or await self._dead(d, current) is True

    async def _revoke_quietly(self, d: _Drive, tokens: TokenPair) -> bool:
        """Revoke a pair (access and refresh token) at makini.revoke_path; False where none is
        configured or Makini failed (logged)."""
        try:
            async with d.makini.call():
                return await d.rt.makini.revoke_pair(tokens)
        except MakiniError as exc:
            log.warning(
                "makini.revoke_failed",
                environment=d.rt.name,
                credential=d.cred.name,
                error=exc.message,
            )
            return False

    async def _fail(self, d: _Drive, rot: Rotation, message: str, exc: MakiniError) -> Rotation:
        return await self._stop(d, rot, Step.FAILED, message, message, request_ids=[exc.request_id])

    async def _stop(
        self,
        d: _Drive,
        rot: Rotation,
        step: str,
        message: str,
        attention: str | None,
        *,
        request_ids: list[str | None],
        **detail: Any,
    ) -> Rotation:
        """End a rotation that will not complete (rolled back or failed): no sealed token kept,
        the credential's state and the audit log say why, and whether a person must act."""
        log.error(
            f"rotation.{step}",
            environment=d.rt.name,
            credential=d.cred.name,
            rotation=rot.id,
            error=message,
            attention=attention,
        )
        now = self.clock.now()
        return await self._commit(
            d,
            rot,
            {"step": step, "sealed": None, "error": message, "finished_at": now, "asked_at": None},
            state={
                "last_attempt_at": now,
                "last_outcome": step,
                "last_error": message,
                "attention": attention,
            },
            audit={
                "actor": rot.actor,
                "action": f"rotation.{step}",
                "outcome": step,
                "version_id": rot.version_id,
                "fingerprint": rot.fingerprint,
                "request_ids": request_ids,
                "error": message,
                "attention": attention,
                **detail,
            },
        )

    # step 4 ------------------------------------------------------------------------------------

    async def _promote(self, d: _Drive, rot: Rotation) -> Rotation:
        """Make the new version current in every backend, then record it and tell readers."""
        version = self._unseal(d, rot)
        await self._fence(d)
        await self.worker.each(d.rt.backends, lambda b: b.promote(d.cred.name, rot.version_id))
        now = self.clock.now()
        grace = (
            timedelta(0)
            if rot.invalidated_old or rot.old_version_id is None
            else d.rt.settings.schedule_for(d.cred).grace_period or timedelta(0)
        )
        rot = await self._commit(
            d,
            rot,
            {"step": Step.PROMOTED, "sealed": None, "retire_after": now + grace},
            state={
                "current_version_id": rot.version_id,
                "current_fingerprint": rot.fingerprint,
                "expires_at": version.tokens.expires_at,
                "rotated_at": now,
                "last_attempt_at": now,
                "last_outcome": "rotated",
                "last_error": None,
                "attention": None,
            },
            audit={
                "actor": rot.actor,
                "action": "rotation.promoted",
                "outcome": "success",
                "version_id": rot.version_id,
                "fingerprint": rot.fingerprint,
                "request_ids": d.request_ids,
                "reason": rot.reason,
                "old_version_id": rot.old_version_id,
                "old_fingerprint": rot.old_fingerprint,
                "expires_at": version.tokens.expires_at,
                "backends": [b.name for b in d.rt.backends],
            },
        )
        log.info(
            "rotation.promoted",
            environment=d.rt.name,
            credential=d.cred.name,
            rotation=rot.id,
            version=rot.version_id,
            token=version.tokens.access.short,
        )
        self.events.promoted.publish(d.rt.name, d.cred.name, version.with_stage(Stage.CURRENT))
        return rot

    # step 5 ------------------------------------------------------------------------------------

    async def _retire(
        self, d: _Drive, rot: Rotation, *, early: bool = False, last: bool = False
    ) -> Rotation:
        """Make the old version unreadable everywhere and revoke its pair (access and refresh
        token) at Makini where Makini allows. ``last``: the drive ends here, and the step's
        record gives the lease back with it.

        Where the old pair is to be revoked, it is sealed into the journal first (step
        *retiring*): once unreadable in the backends, the journal is the only place a resume
        finds it. A transient Makini failure leaves the rotation at *retiring* for the next run;
        nothing ends with an old token alive at Makini and unsaid.
        """
        notes: list[str] = []
        lost: unaccounted.Lost | None = None
        revoked = False
        old_id = rot.old_version_id
        if old_id is not None:
            old = None
            if rot.step == Step.RETIRING and rot.sealed is not None:
                old = unseal(d.rt, rot, old_id)
            elif rot.step == Step.PROMOTED and not rot.invalidated_old and self._can_revoke(d):
                old = await self._old_version(d, rot)  # before it becomes unreadable
                if old is not None:
                    rot = await self._commit(
                        d, rot, {"step": Step.RETIRING, "sealed": seal(d.rt, old)}
                    )
                    faults.checkpoint(rot.step, d.cred.name)
            await self._fence(d)
            await self.worker.each(d.rt.backends, lambda b: b.make_unreadable(d.cred.name, old_id))
            faults.checkpoint("retire-unreadable", d.cred.name)
            if rot.invalidated_old:
                notes.append("Makini invalidated the old token when it issued the new one")
            elif old is not None:
                try:
                    async with d.makini.call():
                        revoked = await d.rt.makini.revoke_pair(old.tokens)
                except MakiniRejected as exc:
                    cause = (
                        f"Makini refused to revoke the retired token at makini.revoke_path "
                        f"({exc.code or exc.status}): it stays valid at Makini until it "
                        f"expires ({self._expiry(old)}) and is readable nowhere"
                    )
                    lost = self._old_lost(d, rot, cause, old)
                    notes.append(cause)
                faults.checkpoint("retire-revoked", d.cred.name)
                if revoked:
                    notes.append("the old access and refresh token were revoked at Makini")
            elif self._can_revoke(d):
                # unreadable before it could be sealed (a backend lost it, or a journal
                # written by a release without the retiring step)
                cause = (
                    "the retired version could not be read to revoke its token at Makini: it may "
                    "stay valid until it expires and is readable nowhere"
                )
                lost = self._old_lost(d, rot, cause, None)
                notes.append(cause)
            else:
                notes.append(
                    "Makini offers no single-token revocation here (no makini.revoke_path): the "
                    "old token stays valid at Makini until it expires; it is readable nowhere"
                )
        if early:
            notes.append("grace period cut short by a newer rotation")
        audit = None
        if old_id is not None:
            audit = {
                "actor": rot.actor,
                "action": "rotation.retired",
                "outcome": "success",
                "version_id": old_id,
                "fingerprint": rot.old_fingerprint,
                "revoked_at_makini": revoked,
                "notes": notes,
            }
        rot = await self._commit(
            d,
            rot,
            {
                "step": Step.DONE,
                "sealed": None,
                "finished_at": self.clock.now(),
                "notes": json.dumps([*rot.note_list(), *notes]),
            },
            audit=audit,
            release=last,
            lost=lost,
        )
        if last:
            d.lease_returned = True
            self.leases.drop(d.lease)
        if old_id is not None:
            log.info(
                "rotation.retired",
                environment=d.rt.name,
                credential=d.cred.name,
                rotation=rot.id,
                old_version=old_id,
                revoked_at_makini=revoked,
            )
        return rot

    def _old_lost(
        self, d: _Drive, rot: Rotation, cause: str, old: StoredVersion | None
    ) -> unaccounted.Lost:
        """A retired token that may stay valid at Makini, held by nobody: reported."""
        return self._lost(
            d,
            rot,
            old.created_at if old is not None and old.created_at else rot.started_at,
            cause,
            fingerprint=rot.old_fingerprint,
            live_until=old.tokens.expires_at if old is not None else None,
        )

    @staticmethod
    def _can_revoke(d: _Drive) -> bool:
        return d.rt.settings.makini.revoke_path is not None

    @staticmethod
    def _expiry(version: StoredVersion) -> str:
        at = version.tokens.expires_at
        return at.isoformat(timespec="seconds") if at else "unknown"

    async def _fence(self, d: _Drive) -> None:
        await self.fence(d.lease, d.where)


def expired_soon(expires_at: datetime | None, margin: timedelta, now: datetime) -> bool:
    return expires_at is not None and expires_at - margin <= now
