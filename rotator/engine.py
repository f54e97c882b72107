"""The rotation engine: the journaled state machine of DESIGN.md.

One rotation moves through ``started → issued → staged → verified → promoted → done``. Each
step first checks whether its effect is already there, and the journal records a step only once
its effect is durable, so the process may die between any two lines: the next run resumes the
open rotation from its last recorded step.

1. **issue**: ask Makini for a new token pair and seal it into the journal before anything else.
2. **stage**: write it as *pending* to every backend of the environment (idempotent per version).
3. **verify**: Makini must accept it *and* name the expected connection. A definite rejection
   rolls back; a transient failure leaves the rotation staged for the next run.
4. **promote**: make it *current* in every backend, drop the sealed copy, tell the readers.
5. **retire**: after the grace period (zero when Makini already killed the old token) make the
   old version unreadable everywhere and revoke it at Makini where Makini allows.

A credential is rotated by one worker at a time: the engine holds the credential's lease in the
journal for the whole drive and renews it before each step that writes outside the journal.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from backends.base import Backend
from rotator import faults
from rotator.crypto import KeyRing
from rotator.errors import (
    BackendError,
    CryptoError,
    InvalidToken,
    LockBusy,
    MakiniError,
    MakiniRejected,
    MakiniTransient,
    MakiniUntrusted,
    RotationError,
    RotatorError,
)
from rotator.journal import Journal, Rotation, Step
from rotator.makini import MakiniClient
from rotator.model import Stage, StoredVersion, TokenPair, new_version_id, utcnow
from rotator.settings import CredentialSettings, EnvironmentSettings

log = structlog.get_logger("rotator.engine")
T = TypeVar("T")

PromotionListener = Callable[[str, str, StoredVersion], None]


@dataclass
class EnvironmentRuntime:
    """Everything one environment needs at run time; built from its settings.

    The Makini client and the sealing key are only needed to rotate; where their secret is
    missing the runtime still serves reads (status, get) and raises the stored ConfigError,
    which names the missing variable, when a rotation touches them.
    """

    name: str
    settings: EnvironmentSettings
    backends: list[Backend]
    makini_client: MakiniClient | None = None
    sealing_keys: KeyRing | None = None
    missing: RotatorError | None = None

    @property
    def primary(self) -> Backend:
        return self.backends[0]

    @property
    def makini(self) -> MakiniClient:
        if self.makini_client is None:
            raise self.missing or RotationError(f"environment {self.name} has no Makini client")
        return self.makini_client

    @property
    def sealer(self) -> KeyRing:
        if self.sealing_keys is None:
            raise self.missing or RotationError(f"environment {self.name} has no sealing key")
        return self.sealing_keys


@dataclass
class RotationResult:
    environment: str
    credential: str
    outcome: str
    """rotated | retired | waiting | rolled_back | failed | busy | deferred | nothing"""
    rotation_id: str | None = None
    version_id: str | None = None
    step: str | None = None
    error: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("rotated", "retired", "waiting", "nothing", "busy", "revoked")

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "credential": self.credential,
            "outcome": self.outcome,
            "rotation_id": self.rotation_id,
            "version_id": self.version_id,
            "step": self.step,
            "error": self.error,
            "duration_s": round(self.duration_s, 3),
        }


Work = tuple[str, str, bool, str]
"""One credential to drive: (environment, credential, start a new rotation, reason)."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def journal_aad(env: str, cred: str, version_id: str) -> str:
    """What a token sealed into a journal row is bound to (it opens for that row only)."""
    return f"journal/{env}/{cred}/{version_id}"


def unseal(rt: EnvironmentRuntime, cred: CredentialSettings, row: Rotation) -> StoredVersion:
    """The token pair a journal row holds sealed. Raises CryptoError naming the sealing key."""
    assert row.sealed is not None
    try:
        plain = rt.sealer.open(row.sealed, journal_aad(rt.name, cred.name, row.version_id))
    except CryptoError as exc:
        raise CryptoError(
            f"cannot unseal the token held by journal row {row.id}: {exc.message}",
            where=f"sealing key of environment {rt.name}",
            hint=exc.hint or "configure the sealing key this journal was written with",
        ) from exc
    return StoredVersion.from_json(plain)


@dataclass
class _Drive:
    """The state of one drive of one credential (lives for one call)."""

    rt: EnvironmentRuntime
    cred: CredentialSettings
    lock: str
    request_ids: list[str | None] = field(default_factory=list)
    renewed_at: float = 0.0
    fresh: bool = False
    """The rotation was started by this drive (its first attempt is recorded already)."""
    old: StoredVersion | None = None
    """The version current when this drive started the rotation, as read then."""
    new: StoredVersion | None = None
    """The rotation's new version, as issued or unsealed by this drive."""
    released: asyncio.Task[None] | None = None
    """The lease's release, once submitted (see ``RotationEngine._release``)."""
    lease_returned: bool = False
    """The drive's last journal write gave the lease back with it (no release to submit)."""


class RotationEngine:
    def __init__(
        self,
        journal: Journal,
        environments: dict[str, EnvironmentRuntime],
        *,
        concurrency: int = 32,
        owner: str | None = None,
    ) -> None:
        self.journal = journal
        self.environments = environments
        self.owner = owner or default_owner()
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(
            max_workers=max(4, concurrency), thread_name_prefix="rotator-io"
        )
        self.listeners: list[PromotionListener] = []
        self.revoke_listeners: list[Callable[[str, str, str], None]] = []
        """Called with (environment, credential, version id) right after an emergency revoke
        made a version unreadable in the backends (readers' caches drop it)."""
        self.result_listeners: list[Callable[[RotationResult], None]] = []
        self.active = 0
        """Drives in progress (``serve`` waits for them before it exits)."""

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (backends, the journal) on the engine's worker threads."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _journal(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a function that touches nothing but the journal: on SQLite inside the journal
        writer's current batch (no worker thread in between), elsewhere on a worker thread."""
        call = functools.partial(fn, *args, **kwargs)
        future = self.journal.submit_async(call)
        if future is None:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        return await future

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """A quick read of the journal (a lease, a row): inline on SQLite, where reading the
        local file costs less than handing the call to a thread; elsewhere on a worker thread."""
        if self.journal.is_sqlite:
            return fn(*args)
        return await self._io(fn, *args)

    def _release(self, d: _Drive) -> asyncio.Task[None]:
        """Give the lease back, as a task: on SQLite the release joins the writer's queue
        behind this drive's own writes and ahead of any later acquire, so a caller may free its
        concurrency slot first and await the task after. A lease not released expires."""

        async def release() -> None:
            try:
                await self._journal(self.journal.release, d.lock, self.owner)
            except RotatorError as exc:
                log.warning("lock.release_failed", lock=d.lock, error=exc.message)

        return asyncio.ensure_future(release())

    async def _each_backend(self, rt: EnvironmentRuntime, fn: Callable[[Backend], T]) -> list[T]:
        """Run ``fn`` on every backend at once; raise the first error after all have finished."""
        results = await asyncio.gather(
            *(self._io(fn, b) for b in rt.backends), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def runtime(self, env: str) -> EnvironmentRuntime:
        return self.environments[env]

    # public entry points ---------------------------------------------------------------------

    async def rotate(
        self, env: str, name: str, *, reason: str, actor: str, start_new: bool = True
    ) -> RotationResult:
        """Drive ``env/name``: resume an open rotation, or start one (``start_new``), up to
        promotion, and retire at once when no grace period applies.

        Never raises for an operational failure: the result says what happened and the journal
        keeps the rotation open where a later run can resume it.
        """
        result, released = await self._rotate(env, name, reason, actor, start_new)
        if released is not None:
            await released
        return result

    async def _rotate(
        self, env: str, name: str, reason: str, actor: str, start_new: bool
    ) -> tuple[RotationResult, asyncio.Task[None] | None]:
        """:meth:`rotate`, returning before the lease's release is durable (and the task that
        makes it so). ``active`` counts the drive until its lease is released."""
        rt = self.runtime(env)
        cred = rt.settings.credential(name, env)
        started = asyncio.get_running_loop().time()
        d = _Drive(rt, cred, f"{env}/{name}")
        self.active += 1
        try:
            result = await self._drive_locked(d, reason, actor, start_new)
        finally:
            if d.released is None:
                self.active -= 1
            else:
                d.released.add_done_callback(self._drive_finished)
        result.duration_s = asyncio.get_running_loop().time() - started
        for listener in self.result_listeners:
            listener(result)
        return result, d.released

    def _drive_finished(self, _: object) -> None:
        self.active -= 1

    async def rotate_many(
        self,
        items: Iterable[Work],
        *,
        actor: str,
        progress: Callable[[RotationResult], None] | None = None,
    ) -> list[RotationResult]:
        """Drive many ``(env, name, start_new, reason)`` concurrently, ``concurrency`` at once."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(env: str, name: str, start_new: bool, reason: str) -> RotationResult:
            async with gate:
                result, released = await self._rotate(env, name, reason, actor, start_new)
            if progress:
                progress(result)
            if released is not None:  # outside the gate: the next drive starts meanwhile
                await released
            return result

        return list(await asyncio.gather(*(one(*item) for item in items)))

    # the drive -------------------------------------------------------------------------------

    async def _drive_locked(
        self, d: _Drive, reason: str, actor: str, start_new: bool
    ) -> RotationResult:
        env, name = d.rt.name, d.cred.name
        try:
            taken, revoke, rot = await self._journal(
                self.journal.begin_drive, d.lock, self.owner, env, name
            )
        except RotatorError as exc:  # the journal failed: nothing was started
            log.warning("rotation.stopped", environment=env, credential=name, error=exc.message)
            return RotationResult(env, name, "failed", error=exc.message)
        if not taken:
            return RotationResult(env, name, "busy", error="another worker holds this credential")
        d.renewed_at = asyncio.get_running_loop().time()
        try:
            if revoke is not None:  # an unfinished emergency revoke comes first
                return await self._resume_revoke(env, name, revoke)
            if rot is not None and rot.step == Step.PROMOTED and start_new:
                rot = await self._retire(d, rot, early=True)
                rot = None
            if rot is None:
                if not start_new:
                    return RotationResult(env, name, "nothing")
                rot = await self._begin(d, reason, actor)
                d.fresh = True
            return await self._advance(d, rot)
        except RotatorError as exc:
            if rot is not None:
                rot = await self._journal(self.journal.rotation, rot.id) or rot
                if not isinstance(exc, LockBusy):  # pre-empted: the new holder owns the state
                    dead = await self._old_is_dead(d, rot)
                    await self._journal(self._record_failure, rot, exc, dead)
            log.warning(
                "rotation.stopped",
                environment=env,
                credential=name,
                step=rot.step if rot else None,
                error=exc.message,
            )
            return RotationResult(
                env,
                name,
                "deferred" if rot is not None and rot.is_open else "failed",
                rotation_id=rot.id if rot else None,
                version_id=rot.version_id if rot else None,
                step=rot.step if rot else None,
                error=exc.message,
            )
        finally:
            if not d.lease_returned:
                d.released = self._release(d)

    async def _resume_revoke(self, env: str, name: str, row: Rotation) -> RotationResult:
        """Finish an unfinished revoke (this drive holds the lease) instead of rotating."""
        from rotator.revoke import resume_held

        return await resume_held(self, env, name, row)

    async def _old_is_dead(self, d: _Drive, rot: Rotation) -> bool | None:
        """For a rotation stopped after issue: did Makini kill the old token? (None: unknown)"""
        if rot.invalidated_old is not None or rot.step not in (Step.ISSUED, Step.STAGED):
            return rot.invalidated_old
        try:
            return await self._probe_old(d, rot)
        except RotatorError:
            return None

    def _record_failure(self, rot: Rotation, exc: RotatorError, old_dead: bool | None) -> None:
        values: dict[str, Any] = {
            "last_attempt_at": utcnow(),
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
        self.journal.set_state(rot.environment, rot.credential, **values)

    async def _advance(self, d: _Drive, rot: Rotation) -> RotationResult:
        steps: dict[str, Callable[[_Drive, Rotation], Awaitable[Rotation]]] = {
            Step.STARTED: self._issue,
            Step.ISSUED: self._stage,
            Step.STAGED: self._verify,
            Step.VERIFIED: self._promote,
        }
        promoted_now = False
        while rot.step in steps:
            rot = await steps[rot.step](d, rot)
            promoted_now = promoted_now or rot.step == Step.PROMOTED
            faults.checkpoint(rot.step, d.cred.name)
        outcome = {Step.ROLLED_BACK: "rolled_back", Step.FAILED: "failed"}.get(rot.step)
        if rot.step == Step.PROMOTED:
            if rot.retire_after is not None and rot.retire_after <= utcnow():
                rot = await self._retire(d, rot, last=True)
                faults.checkpoint(rot.step, d.cred.name)
                outcome = "rotated" if promoted_now else "retired"
            else:
                outcome = "rotated" if promoted_now else "waiting"
        return RotationResult(
            d.rt.name,
            d.cred.name,
            outcome or "nothing",
            rotation_id=rot.id,
            version_id=rot.version_id,
            step=rot.step,
            error=rot.error,
        )

    async def _begin(self, d: _Drive, reason: str, actor: str) -> Rotation:
        current = await self._io(d.rt.primary.read, d.cred.name, Stage.CURRENT)
        if d.cred.method == "refresh" and (current is None or current.tokens.refresh is None):
            raise RotationError(
                f"credential {d.cred.name} uses the refresh grant but the primary backend "
                "holds no refresh token to start from",
                where=f"{d.rt.name}/{d.cred.name} on {d.rt.primary.name}",
                hint=f"bootstrap it once: rotator import {d.rt.name} {d.cred.name} "
                "(a token pair from Makini Link), then rotations continue on their own",
            )
        now = utcnow()
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
            attempts=1,  # written before Makini is asked: the first attempt is about to happen
            notes="[]",
        )
        await self._journal(self.journal.add_rotation, rot)
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
        """Get a new token pair from Makini and seal it into the journal before anything else."""
        if rot.sealed is not None:
            return await self._journal(self.journal.commit_step, rot.id, {"step": Step.ISSUED})
        if not d.fresh:
            # an earlier attempt (counted in ``attempts``) died or failed before sealing
            await self._journal(
                self.journal.add_note,
                rot.id,
                f"attempt {rot.attempts} to issue ended without a recorded token; if Makini "
                "issued one then, it was never received",
            )
            rot = await self._journal(
                self.journal.update_rotation, rot.id, attempts=rot.attempts + 1
            )
        try:
            issued = await self._ask_makini(d, rot)
        except MakiniRejected as exc:
            return await self._fail(d, rot, f"Makini refused to issue a token: {exc.message}", exc)
        except MakiniError as exc:
            if exc.ambiguous:
                await self._journal(
                    self.journal.add_note,
                    rot.id,
                    f"Makini may have issued a token that was not received ({exc.message}; "
                    f"request id {exc.request_id or 'unknown'})",
                )
            raise
        d.request_ids.append(issued.request_id)
        version = StoredVersion(
            environment=d.rt.name,
            credential=d.cred.name,
            version_id=rot.version_id,
            tokens=issued.tokens,
            created_at=utcnow(),
        )
        d.new = version
        sealed = d.rt.sealer.seal(
            version.to_json().encode(), journal_aad(d.rt.name, d.cred.name, rot.version_id)
        )
        return await self._journal(
            self.journal.commit_step,
            rot.id,
            {
                "step": Step.ISSUED,
                "sealed": sealed,
                "fingerprint": issued.tokens.access.fingerprint,
                "expires_at": issued.tokens.expires_at,
                "invalidated_old": d.rt.settings.makini.issue_invalidates_previous,
            },
        )

    async def _ask_makini(self, d: _Drive, rot: Rotation) -> Any:
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
        return await self._io(d.rt.primary.read_version, d.cred.name, rot.old_version_id)

    def _unseal(self, d: _Drive, rot: Rotation) -> StoredVersion:
        if rot.sealed is None:
            raise RotationError(
                "the journal no longer holds the new token for this rotation",
                where=f"{d.rt.name}/{d.cred.name}",
                rotation_id=rot.id,
            )
        if d.new is None or d.new.version_id != rot.version_id:
            d.new = unseal(d.rt, d.cred, rot)
        return d.new

    # step 2 ------------------------------------------------------------------------------------

    async def _stage(self, d: _Drive, rot: Rotation) -> Rotation:
        """Write the new version as pending to every backend (each write idempotent)."""
        version = self._unseal(d, rot)
        await self._fence(d, rot)
        await self._each_backend(d.rt, lambda b: b.stage_pending(version))
        return await self._journal(self.journal.commit_step, rot.id, {"step": Step.STAGED})

    # step 3 ------------------------------------------------------------------------------------

    async def _verify(self, d: _Drive, rot: Rotation) -> Rotation:
        """Makini must accept the new token and name the expected connection."""
        version = self._unseal(d, rot)
        try:
            info = await d.rt.makini.verify(version.tokens.access, d.cred.connection_id)
        except MakiniRejected as exc:
            return await self._rollback(d, rot, version, exc)
        d.request_ids.append(info.request_id)
        invalidated = rot.invalidated_old
        if invalidated is None and rot.old_version_id is not None:
            invalidated = await self._probe_old(d, rot)
        return await self._journal(
            self.journal.commit_step,
            rot.id,
            {"step": Step.VERIFIED, "invalidated_old": invalidated},
        )

    async def _probe_old(self, d: _Drive, rot: Rotation) -> bool | None:
        """Where it is unknown whether issuing killed the old token, ask Makini."""
        old = await self._old_version(d, rot)
        if old is None:
            return None
        try:
            await d.rt.makini.verify(old.tokens.access, d.cred.connection_id)
        except InvalidToken:
            return True
        except MakiniError:
            return None
        return False

    async def _rollback(
        self, d: _Drive, rot: Rotation, version: StoredVersion, exc: MakiniRejected
    ) -> Rotation:
        await self._fence(d, rot)
        await self._each_backend(d.rt, lambda b: b.make_unreadable(d.cred.name, rot.version_id))
        revoked = await self._revoke_quietly(d, version)
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
        current = await self._io(d.rt.primary.read, d.cred.name, Stage.CURRENT)
        if current is None:
            return True
        try:
            await d.rt.makini.verify(current.tokens.access, d.cred.connection_id)
        except InvalidToken:
            return True
        except MakiniError:
            return False
        return False

    async def _revoke_quietly(self, d: _Drive, version: StoredVersion) -> bool:
        try:
            return await d.rt.makini.revoke_token(version.tokens.access)
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
        now = utcnow()
        return await self._journal(
            self.journal.commit_step,
            rot.id,
            {"step": step, "sealed": None, "error": message, "finished_at": now},
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
        await self._fence(d, rot)
        await self._each_backend(d.rt, lambda b: b.promote(d.cred.name, rot.version_id))
        now = utcnow()
        grace = (
            timedelta(0)
            if rot.invalidated_old or rot.old_version_id is None
            else d.rt.settings.schedule_for(d.cred).grace_period or timedelta(0)
        )
        rot = await self._journal(
            self.journal.commit_step,
            rot.id,
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
        for listener in self.listeners:
            try:
                listener(d.rt.name, d.cred.name, version.with_stage(Stage.CURRENT))
            except Exception:
                log.exception("listener.failed", environment=d.rt.name, credential=d.cred.name)
        return rot

    # step 5 ------------------------------------------------------------------------------------

    async def _retire(
        self, d: _Drive, rot: Rotation, *, early: bool = False, last: bool = False
    ) -> Rotation:
        """Make the old version unreadable everywhere and revoke it at Makini where possible.
        ``last``: the drive ends here, and the step's record gives the lease back with it."""
        notes: list[str] = []
        revoked = False
        if rot.old_version_id is not None:
            # read before it becomes unreadable, where it is to be revoked at Makini
            old = None if rot.invalidated_old else await self._old_version(d, rot)
            await self._fence(d, rot)
            await self._each_backend(
                d.rt, lambda b: b.make_unreadable(d.cred.name, rot.old_version_id or "")
            )
            if rot.invalidated_old:
                notes.append("Makini invalidated the old token when it issued the new one")
            elif old is not None:
                revoked = await self._revoke_quietly(d, old)
                if not revoked:
                    expiry = old.tokens.expires_at.isoformat() if old.tokens.expires_at else "?"
                    notes.append(
                        "Makini offers no single-token revocation here: the old token stays "
                        f"valid at Makini until it expires ({expiry}); it is readable nowhere"
                    )
        if early:
            notes.append("grace period cut short by a newer rotation")
        audit = None
        if rot.old_version_id is not None:
            audit = {
                "actor": rot.actor,
                "action": "rotation.retired",
                "outcome": "success",
                "version_id": rot.old_version_id,
                "fingerprint": rot.old_fingerprint,
                "revoked_at_makini": revoked,
                "notes": notes,
            }
        rot = await self._journal(
            self.journal.commit_step,
            rot.id,
            {
                "step": Step.DONE,
                "finished_at": utcnow(),
                "notes": json.dumps([*rot.note_list(), *notes]),
            },
            audit=audit,
            release=(d.lock, self.owner) if last else None,
        )
        d.lease_returned = last
        if rot.old_version_id is not None:
            log.info(
                "rotation.retired",
                environment=d.rt.name,
                credential=d.cred.name,
                rotation=rot.id,
                old_version=rot.old_version_id,
            )
        return rot

    async def retire_due(self, env: str, name: str) -> RotationResult:
        """Retire the promoted rotation of ``env/name`` if its grace period is over."""
        return await self.rotate(
            env, name, reason="grace period over", actor="scheduler", start_new=False
        )

    async def _fence(self, d: _Drive, rot: Rotation) -> None:
        """Stop unless this worker still holds the credential's lease (a revoke may have taken
        it over). A read; the lease is renewed (a write) only once a third of it is used."""
        loop = asyncio.get_running_loop()
        if loop.time() - d.renewed_at < self.journal.lock_ttl.total_seconds() / 3:
            holder = await self._read(self.journal.lock_holder, d.lock)
            held = holder is not None and holder.owner == self.owner
        else:
            held = await self._journal(self.journal.renew, d.lock, self.owner)
            d.renewed_at = loop.time()
        if not held:
            raise LockBusy(
                "this worker lost the credential's lease; another worker took over",
                where=f"{d.rt.name}/{d.cred.name}",
                hint="nothing to do: the other worker resumes the rotation",
            )

    # reads used by the CLI ---------------------------------------------------------------------

    async def current(self, env: str, name: str) -> StoredVersion | None:
        rt = self.runtime(env)
        rt.settings.credential(name, env)
        return await self._io(rt.primary.read, name, Stage.CURRENT)

    async def verify_current(self, env: str, name: str) -> tuple[bool, str]:
        rt = self.runtime(env)
        cred = rt.settings.credential(name, env)
        version = await self.current(env, name)
        if version is None:
            return False, "no current token in the primary backend"
        try:
            info = await rt.makini.verify(version.tokens.access, cred.connection_id)
        except MakiniRejected as exc:
            await self._journal(self.journal.set_state, env, name, attention=exc.message)
            return False, exc.message
        except (MakiniTransient, MakiniUntrusted) as exc:
            return False, f"could not check: {exc.message}"
        return True, f"accepted for connection {info.connection_id}"

    async def backend_versions(self, env: str, name: str) -> dict[str, str | None]:
        """The current version id in each backend (None where absent), keyed by backend name."""
        rt = self.runtime(env)

        def current_id(b: Backend) -> str | None:
            try:
                v = b.read(name, Stage.CURRENT)
            except BackendError as exc:
                return f"error: {exc.message}"
            return v.version_id if v else None

        ids = await self._each_backend(rt, current_id)
        return {b.name: vid for b, vid in zip(rt.backends, ids, strict=True)}

    async def import_pair(
        self, env: str, name: str, tokens: TokenPair, *, actor: str, reason: str
    ) -> str:
        """Store a token pair obtained outside the rotator (Makini Link) as current, verified."""
        rt = self.runtime(env)
        cred = rt.settings.credential(name, env)
        await rt.makini.verify(tokens.access, cred.connection_id)
        version = StoredVersion(env, name, new_version_id(), tokens, created_at=utcnow())
        await self._each_backend(rt, lambda b: b.stage_pending(version))
        await self._each_backend(rt, lambda b: b.promote(name, version.version_id))
        now = utcnow()
        await self._journal(
            lambda: self.journal.set_state(
                env,
                name,
                current_version_id=version.version_id,
                current_fingerprint=tokens.access.fingerprint,
                expires_at=tokens.expires_at,
                rotated_at=now,
                last_outcome="imported",
                last_error=None,
                attention=None,
            )
        )
        await self._journal(
            lambda: self.journal.audit(
                actor=actor,
                action="credential.imported",
                outcome="success",
                environment=env,
                credential=name,
                version_id=version.version_id,
                fingerprint=tokens.access.fingerprint,
                reason=reason,
            )
        )
        return version.version_id


def expired_soon(expires_at: datetime | None, margin: timedelta, now: datetime) -> bool:
    return expires_at is not None and expires_at - margin <= now
