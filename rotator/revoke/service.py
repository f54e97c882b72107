"""Running revokes: leases, pre-emption, many credentials at once, and the entry points for the
CLI, the admin API and the scheduler."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from rotator.errors import NotFound, RotatorError
from rotator.journal import Lease, Rotation, Step
from rotator.model import Stage, StoredVersion, new_version_id
from rotator.rotation.engine import RotationEngine
from rotator.rotation.environment import EnvironmentRuntime
from rotator.rotation.sealing import unseal
from rotator.rotation.work import Outcome, RotationResult
from rotator.scrub import mask
from rotator.settings import CredentialSettings

from . import custody, kill, planner
from .accounting import account_for, short
from .driver import CredentialRevoke
from .model import (
    KIND,
    CredentialPlan,
    CredentialReport,
    Preempted,
    Record,
    RevokeRequest,
    RevokeStep,
)
from .reads import first_readable, read_by_id, resolve_target

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime

log = structlog.get_logger("rotator.revoke")

Progress = Callable[[CredentialReport], None]


class Revoker:
    """Plans and runs revokes with one engine (its journal, environments and worker threads)."""

    def __init__(self, engine: RotationEngine) -> None:
        self.engine = engine
        self.journal = engine.journal

    def runtime(self, env: str) -> EnvironmentRuntime:
        try:
            return self.engine.environments[env]
        except KeyError:
            raise NotFound(
                f"no environment named {env!r}",
                hint=f"known environments: {', '.join(self.engine.environments)}",
            ) from None

    async def plan(self, req: RevokeRequest) -> list[CredentialPlan]:
        """What ``req`` would do, per credential. Changes nothing (no Makini call either).
        Raises ConfigError for a malformed request, NotFound for an unknown name."""
        req.validate()
        return await planner.plan(self.engine, self.runtime(req.environment), req)

    async def run(
        self,
        req: RevokeRequest,
        plans: list[CredentialPlan],
        progress: Progress | None = None,
    ) -> list[CredentialReport]:
        """Run the planned revokes, ``scheduler.concurrency`` credentials at once and at most
        ``makini.max_concurrency`` of them at Makini, shared with the rotations in flight (each
        one's Makini calls in sequence: the per-connection rate limits see one caller at a
        time; and none records a token request as sent while it waits for a connection)."""
        rt = self.runtime(req.environment)
        gate = asyncio.Semaphore(self.engine.concurrency)
        makini = self.engine.makini_gate(rt.name)

        async def one(p: CredentialPlan) -> CredentialReport:
            async with gate, makini:
                report = await self.run_one(rt, req, p)
            if progress is not None:
                progress(report)
            return report

        with self.engine.working():
            return list(await asyncio.gather(*(one(p) for p in plans)))

    async def run_one(
        self, rt: EnvironmentRuntime, req: RevokeRequest, p: CredentialPlan
    ) -> CredentialReport:
        """Revoke (or resume revoking) one credential under its lease, taking the lease over
        from a rotation in flight."""
        report = CredentialReport(rt.name, p.credential)
        if p.action == "skip":
            report.outcome = "skipped"
            report.notes.append(p.why)
            return report
        cred = rt.settings.credential(p.credential, rt.name)
        lease = self.engine.new_lease(rt.name, cred.name, "revoke")
        started = time.monotonic()
        try:
            took, stolen = await self._take_lease(lease, report)
        except RotatorError as exc:
            report.outcome, report.error = "failed", exc.message
            return report
        if not took:
            return report
        self.engine.leases.add(lease)
        try:
            row = await self.engine.worker.journal(self.journal.open_revoke, rt.name, cred.name)
            if row is not None:
                report.resumed = True
                record = await recorded(self.engine, row)
                await CredentialRevoke(self.engine, rt, cred, row, record, lease, report).run()
            elif p.action == "revoke":
                begun = await self._begin(rt, cred, req, p, stolen, report, lease)
                if begun is not None:
                    row, old, record = begun
                    fresh = row.attempts > 0
                    await CredentialRevoke(
                        self.engine,
                        rt,
                        cred,
                        row,
                        record,
                        lease,
                        report,
                        old=old,
                        fresh=fresh,
                        last=True,  # nothing follows it under the lease
                    ).run()
            if req.resume or report.resumed:
                await self._orphans(rt, cred, req.actor or "revoke --resume", report)
            if row is None and not report.revoke_id and report.outcome == "incomplete":
                report.outcome = "skipped"
        except RotatorError as exc:
            report.outcome, report.error = "failed", exc.message
            log.error("revoke.failed", environment=rt.name, credential=cred.name, error=exc.message)
        except Exception as exc:  # noqa: BLE001 - one credential's bug must not cancel the others
            report.outcome = "failed"
            report.error = f"unexpected error ({type(exc).__name__}); this is a bug, report it"
            report.next(f"the revoke is journaled: `rotator revoke {rt.name} {cred.name} --resume`")
            log.error(
                "revoke.crashed",
                environment=rt.name,
                credential=cred.name,
                error=type(exc).__name__,
            )
        finally:
            self.engine.leases.drop(lease)
            await self.engine.worker.journal(self.journal.release, *lease.key)
            report.timings.setdefault("total_s", time.monotonic() - started)
        return report

    async def _take_lease(self, lease: Lease, report: CredentialReport) -> tuple[bool, str | None]:
        """Take the lease, from a rotation in flight if need be: (taken, the previous live
        holder it was taken from). Not taken when another worker drives an unfinished revoke
        of the credential (``report`` says so)."""
        lock, owner = lease.key
        if await self.engine.worker.journal(self.journal.acquire, lock, owner):
            return True, None
        env, name = lock.split("/", 1)
        if await self.engine.worker.journal(self.journal.open_revoke, env, name) is not None:
            holder = await self.engine.worker.read(self.journal.lock_holder, lock)
            until = holder.expires_at.isoformat(timespec="seconds") if holder else "?"
            report.outcome = "busy"
            report.error = "another worker is driving this credential's unfinished revoke"
            report.next(f"wait for it (its lease runs until {until}), then `rotator status`")
            return False, None
        stolen = await self.engine.worker.journal(self.journal.steal, lock, owner)
        if stolen is not None:
            log.warning("revoke.preempted_worker", environment=env, credential=name, worker=stolen)
        return True, stolen

    async def _begin(
        self,
        rt: EnvironmentRuntime,
        cred: CredentialSettings,
        req: RevokeRequest,
        p: CredentialPlan,
        stolen: str | None,
        report: CredentialReport,
        lease: Lease,
    ) -> tuple[Rotation, StoredVersion, Record] | None:
        """Write the revoke's row and supersede the rotations in flight (one transaction), then
        give a pre-empted worker whose issue request is on the wire time to receive its token."""
        target = await self.engine.worker.call(resolve_target, rt.backends, cred.name, req.version)
        old = target.version
        if old is None or old.version_id != p.target_version:
            old = await self.engine.worker.call(
                read_by_id, rt.backends, cred.name, p.target_version or ""
            )
        if old is None:
            report.outcome = "failed"
            report.error = f"the planned version {p.target_version} is no longer readable anywhere"
            report.next(f"plan again: `rotator revoke {rt.name} {cred.name} --dry-run`")
            return None
        stage = target.stage if old is target.version else "other"
        if target.current is not None and old.version_id == target.current.version_id:
            stage = "current"
        has_refresh = any(
            v is not None and v.tokens.refresh is not None for v in (target.current, old)
        )
        strategy = req.strategy or cred.revoke_strategy
        method, escalate, notes = kill.resolve(strategy, cred, rt.settings.makini, has_refresh)
        now = self.engine.clock.now()
        row = Rotation(
            id=str(uuid.uuid4()),
            environment=rt.name,
            credential=cred.name,
            kind=KIND,
            step=RevokeStep.STARTED,
            version_id=new_version_id(),
            old_version_id=old.version_id,
            old_fingerprint=old.tokens.access.fingerprint,
            reason=_without_tokens(req.reason, old, target.current)[:500],
            actor=req.actor[:200],
            started_at=now,
            updated_at=now,
            attempts=1 if method in ("issue", "refresh") else 0,  # the kill asks for a token next
            asked_at=now if method in ("issue", "refresh") else None,
            notes="[]",
        )
        record = Record(
            strategy=strategy,
            method=method,
            escalate=escalate,
            # an off-boarded credential's connection is gone at Makini: nothing replaces it
            replace=req.replace and cred.name not in rt.settings.offboarded,
            target_stage=stage,
            current_version=target.current.version_id if target.current else None,
        )
        preempted = await self.engine.worker.journal(
            custody.begin,
            self.journal,
            lease.key,
            row,
            record,
            {
                "actor": row.actor,
                "action": "revoke.started",
                "outcome": "started",
                "version_id": old.version_id,
                "fingerprint": old.tokens.access.fingerprint,
                "reason": row.reason,
                "strategy": strategy,
                "method": method,
                "may_disconnect": method == "disconnect" or escalate,
                "warnings": p.warnings,
                "replace": record.replace,
                "target_stage": stage,
                "notes": notes,
            },
        )
        log.info(
            "revoke.started",
            environment=rt.name,
            credential=cred.name,
            revoke=row.id,
            version=old.version_id,
            token=old.tokens.access.short,
            method=method,
            reason=row.reason,
            actor=row.actor,
            superseded=[x.info.id for x in preempted],
        )
        if stolen is not None:
            await self._await_in_flight(rt, preempted, now)
        return row, old, record

    async def _await_in_flight(
        self, rt: EnvironmentRuntime, preempted: list[Preempted], since: Any
    ) -> None:
        """A worker that had asked Makini for a token when its rotation was superseded may
        still receive it: wait (at most the Makini timeout) until its token is kept sealed on
        the superseded row or the worker records that it stopped, so the revoke adopts or kills
        that token like any other."""
        waiting = [
            x
            for x in preempted
            if x.info.step == Step.STARTED and x.attempts > 0 and not x.holds_token
        ]
        if not waiting:
            return
        deadline = time.monotonic() + rt.settings.makini.timeout_s + 1.0
        for x in waiting:
            while time.monotonic() < deadline:
                rot = await self.engine.worker.journal(self.journal.rotation, x.info.id)
                state = await self.engine.worker.journal(
                    self.journal.state, rt.name, rot.credential if rot else ""
                )
                if rot is None or rot.sealed is not None:
                    break
                if (
                    state is not None
                    and state.last_attempt_at is not None
                    and state.last_attempt_at >= since
                ):
                    break
                await asyncio.sleep(0.05)

    async def _orphans(
        self, rt: EnvironmentRuntime, cred: CredentialSettings, actor: str, report: CredentialReport
    ) -> None:
        """Account for tokens Makini issued to pre-empted workers after their revoke ended (the
        journal kept them sealed on the superseded rotations' rows). One that still works
        becomes current where the stored current token no longer works (its late issue killed
        it); otherwise it is killed where Makini allows, or reported."""
        orphans = await self.engine.worker.journal(
            custody.orphans, self.journal, rt.name, cred.name
        )
        for rot in orphans:
            version = unseal(rt, rot)
            if not await kill.rejected(rt.makini, version.tokens.access, cred.connection_id):
                stored = await self.engine.worker.call(
                    first_readable, rt.backends, lambda b: b.read(cred.name, Stage.CURRENT)
                )
                if stored is None or await kill.rejected(
                    rt.makini, stored.tokens.access, cred.connection_id
                ):
                    await self._adopt_orphan(rt, cred, rot, version, actor, report)
                    continue
            await account_for(
                self.engine, rt, cred, [rot], actor=actor, disconnected=False, report=report
            )
        state = await self.engine.worker.journal(self.journal.state, rt.name, cred.name)
        if state is not None and state.attention and "pre-empted rotation" in state.attention:
            await self.engine.worker.journal(
                self.journal.set_state, rt.name, cred.name, attention=None
            )
        if orphans and not report.revoke_id:
            report.outcome = "unconfirmed" if report.next_steps else "revoked"

    async def _adopt_orphan(
        self,
        rt: EnvironmentRuntime,
        cred: CredentialSettings,
        rot: Rotation,
        version: StoredVersion,
        actor: str,
        report: CredentialReport,
    ) -> None:
        """Make a late token current everywhere (the stored one is dead); then drop its sealed
        copy. Raises BackendError (the token stays sealed for the next resume)."""
        for b in rt.backends:
            entry = report.backend(b.name)
            await self.engine.worker.call(b.stage_pending, version)
            await self.engine.worker.call(b.promote, cred.name, version.version_id)
            entry.actions.append(f"stored {version.version_id[:13]} (a late token) as current")
        now = self.engine.clock.now()
        note = (
            f"the token {version.tokens.access.short} Makini issued to pre-empted rotation "
            f"{rot.id[:8]} after the revoke works while the stored one does not: it is current now"
        )
        await self.engine.worker.journal(
            self.journal.set_state,
            rt.name,
            cred.name,
            current_version_id=version.version_id,
            current_fingerprint=version.tokens.access.fingerprint,
            expires_at=version.tokens.expires_at,
            rotated_at=now,
        )
        await self.engine.worker.journal(custody.drop, self.journal, rot.id, note)
        await self.engine.worker.journal(
            self.journal.audit,
            actor=actor,
            action="revoke.late_token_adopted",
            outcome="success",
            environment=rt.name,
            credential=cred.name,
            version_id=version.version_id,
            fingerprint=version.tokens.access.fingerprint,
            rotation_id=rot.id,
        )
        self.engine.events.promoted.publish(rt.name, cred.name, version.with_stage(Stage.CURRENT))
        report.notes.append(note)
        report.replacement_version = version.version_id
        report.replacement_fingerprint = version.tokens.access.short


async def recorded(engine: RotationEngine, row: Rotation) -> Record:
    """The decisions the revoke ``row`` recorded last."""
    return await engine.worker.read(Record.latest, engine.journal, row.id)


async def resume_held(
    engine: RotationEngine, env: str, name: str, row: Rotation, lease: Lease
) -> RotationResult:
    """Finish ``row`` (an unfinished revoke) for the rotation engine, whose drive holds
    ``lease``: the scheduler and ``run-due`` resume revokes this way."""
    rt = engine.runtime(env)
    cred = rt.settings.credential(name, env)
    report = CredentialReport(env, name, resumed=True)
    record = await recorded(engine, row)
    await CredentialRevoke(engine, rt, cred, row, record, lease, report, last=True).run()
    outcome = {
        "revoked": Outcome.REVOKED,
        "incomplete": Outcome.DEFERRED,
        "busy": Outcome.BUSY,
    }.get(report.outcome, Outcome.FAILED)
    return RotationResult(
        env,
        name,
        outcome,
        rotation_id=row.id,
        version_id=report.replacement_version,
        step=report.step,
        error=report.error,
    )


async def revoke_from_api(
    runtime: Runtime,
    env: str,
    names: list[str] | None,
    all_: bool,
    version: str | None,
    no_replace: bool,
    reason: str,
    actor: str,
    dry_run: bool,
) -> dict[str, Any]:
    """The admin API's emergency revoke: plan, then (unless ``dry_run``) run, and return the
    plan and the per-credential reports. Raises ConfigError/NotFound for a bad request."""
    req = RevokeRequest(
        environment=env,
        names=tuple(names or ()),
        all=all_,
        version=version,
        replace=not no_replace,
        reason=reason,
        actor=actor,
    )
    revoker = Revoker(runtime.engine)
    plans = await revoker.plan(req)
    out: dict[str, Any] = {
        "environment": env,
        "dry_run": dry_run,
        "plan": [p.as_dict() for p in plans],
    }
    if dry_run:
        out["ok"] = True
        return out
    reports = await revoker.run(req, plans)
    out["results"] = [r.as_dict() for r in reports]
    out["ok"] = all(r.ok for r in reports)
    out["next_steps"] = [s for r in reports for s in r.next_steps]
    return out


__all__ = ["Revoker", "resume_held", "revoke_from_api", "short"]


def _without_tokens(reason: str, *versions: StoredVersion | None) -> str:
    """The reason as recorded (journal, audit, logs): an operator may paste the leaked token
    itself into ``--reason``; each token of these versions becomes its masked fingerprint, and
    anything else shaped like a token is masked as in the logs."""
    for version in versions:
        if version is None:
            continue
        for secret in (version.tokens.access, version.tokens.refresh):
            if secret is not None and secret.reveal():
                reason = reason.replace(secret.reveal(), f"[token {secret.short}]")
    return mask(reason)
