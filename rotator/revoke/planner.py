"""The plan of a revoke: what it will do to each credential, computed without changing anything
(no Makini call, no write to a backend or the journal). ``--dry-run`` prints it and stops; the
command prints it and asks before running it."""

from __future__ import annotations

import asyncio

from rotator.journal import Rotation
from rotator.rotation.engine import RotationEngine
from rotator.rotation.environment import EnvironmentRuntime
from rotator.rotation.schedule import human
from rotator.settings import CredentialSettings

from . import custody, kill
from .model import CredentialPlan, RevokeRequest
from .reads import resolve_target


def _short(vid: str | None) -> str:
    return vid[:13] if vid else "-"


async def plan(
    engine: RotationEngine, rt: EnvironmentRuntime, req: RevokeRequest
) -> list[CredentialPlan]:
    """One plan per credential in scope, in the configuration's order."""
    names = [c.name for c in rt.settings.credentials] if req.all else list(req.names)
    creds = [rt.settings.credential(n, rt.name) for n in dict.fromkeys(names)]
    if req.resume:
        if not names:
            open_names = {
                r.credential
                for r in await engine.worker.journal(engine.journal.open_revokes, rt.name)
            }
            creds = [c for c in rt.settings.credentials if c.name in open_names]
        return list(await asyncio.gather(*(_plan_resume(engine, rt, c) for c in creds)))
    # what is open in the journal, read once for the whole environment
    revokes = {
        r.credential for r in await engine.worker.journal(engine.journal.open_revokes, rt.name)
    }
    rotations = {
        r.credential: r for r in await engine.worker.journal(engine.journal.open_rotations, rt.name)
    }
    return list(
        await asyncio.gather(
            *(
                plan_one(
                    engine,
                    rt,
                    c,
                    req,
                    open_revoke=c.name in revokes,
                    rotation=rotations.get(c.name),
                )
                for c in creds
            )
        )
    )


async def _plan_resume(
    engine: RotationEngine, rt: EnvironmentRuntime, cred: CredentialSettings
) -> CredentialPlan:
    base = CredentialPlan(
        rt.name, cred.name, cred.connection_id, "resume", backends=[b.name for b in rt.backends]
    )
    row = await engine.worker.journal(engine.journal.open_revoke, rt.name, cred.name)
    orphans = await engine.worker.journal(custody.orphans, engine.journal, rt.name, cred.name)
    if row is None and not orphans:
        base.action, base.why = "skip", "no unfinished revoke"
        return base
    if row is not None:
        base.open_revoke = row.id
        base.target_version = row.old_version_id
        age = human(engine.clock.now() - row.started_at)
        base.why = (
            f"revoke {row.id[:8]} by {row.actor} ({age} ago) "
            f"stopped at {row.step}" + (f": {row.error}" if row.error else "")
        )
    if orphans:
        base.notes.append(
            f"{len(orphans)} pre-empted rotation(s) hold a token Makini issued after the revoke "
            "took over: each is checked and killed or reported"
        )
    return base


async def plan_one(
    engine: RotationEngine,
    rt: EnvironmentRuntime,
    cred: CredentialSettings,
    req: RevokeRequest,
    *,
    open_revoke: bool,
    rotation: Rotation | None,
) -> CredentialPlan:
    """The plan for one credential (``open_revoke``: it has an unfinished revoke; ``rotation``:
    its rotation in flight). Reads the backends and the journal only."""
    p = CredentialPlan(
        rt.name,
        cred.name,
        cred.connection_id,
        "revoke",
        backends=[b.name for b in rt.backends],
        replace=req.replace and cred.name not in rt.settings.offboarded,
    )
    if open_revoke:
        resumed = await _plan_resume(engine, rt, cred)
        resumed.notes.insert(0, "an unfinished revoke of this credential is finished instead")
        return resumed
    target = await engine.worker.call(resolve_target, rt.backends, cred.name, req.version)
    p.current_version = target.current.version_id if target.current else None
    if target.version is None:
        p.action, p.why = "skip", f"nothing to revoke: {target.missing}"
        return p
    p.target_version = target.version.version_id
    p.target_stage = target.stage
    p.target_fingerprint = target.version.tokens.access.short
    p.strategy = req.strategy or cred.revoke_strategy
    has_refresh = any(
        v is not None and v.tokens.refresh is not None for v in (target.current, target.version)
    )
    method, escalate, notes = kill.resolve(
        req.strategy or cred.revoke_strategy, cred, rt.settings.makini, has_refresh
    )
    p.method, p.escalate = method, escalate
    p.notes.extend(notes)
    p.notes.insert(0, f"kill: {kill.describe(method)}, then check that Makini answers 401")
    wants = p.replace and target.stage == "current"
    if req.replace and not p.replace:
        issues = method in ("issue", "refresh")
        p.warnings.append(
            f"{cred.name} is off-boarded (Makini no longer lists its connection "
            f"{cred.connection_id}): no replacement is asked for"
            + (
                "; the kill itself asks Makini for a new token, which Makini refuses if it "
                "deleted the connection (its tokens died with it; the revoke then reports the "
                "refusal), and stores it if Makini still issues one"
                if issues else "; its tokens are killed and purged only"
            )
        )
    if method == "disconnect":
        p.replacement = "none: the connection is deleted"
        p.warnings.append(kill.DISCONNECT_WARNING.format(conn=cred.connection_id))
    else:
        if escalate:
            p.warnings.append(
                kill.ESCALATION_WARNING.format(how=kill.describe(method), conn=cred.connection_id)
            )
        if method in ("issue", "refresh"):
            p.replacement = "the token the kill produces, verified and made current everywhere"
            if not p.replace:
                p.notes.append(
                    "--no-replace: the kill itself produces a new token; it is stored as current "
                    "anyway (it may be the connection's only working token, and a token Makini "
                    "issued is never dropped)"
                )
        elif wants:
            p.replacement = f"a new token ({cred.method}), verified and made current everywhere"
        elif not p.replace:
            p.replacement = "none (--no-replace)" if not req.replace else "none: off-boarded"
        else:
            p.replacement = "none: the current version is not the target and is left as it is"
    if rotation is not None:
        await _plan_preemption(engine, rt, cred, rotation, p)
    p.purge = [p.target_version]
    replaced = method in ("issue", "refresh") or wants
    if replaced and p.current_version not in (None, p.target_version):
        p.purge.append(p.current_version)
        p.notes.append(
            f"the current version {_short(p.current_version)} is replaced too (no grace)"
        )
    if replaced and method != "disconnect" and p.current_version:
        p.notes.append("no grace period: readers get the replacement at once")
    return p


async def _plan_preemption(
    engine: RotationEngine,
    rt: EnvironmentRuntime,
    cred: CredentialSettings,
    rot: Rotation,
    p: CredentialPlan,
) -> None:
    holder = await engine.worker.read(engine.journal.lock_holder, f"{rt.name}/{cred.name}")
    p.preempts = f"rotation {rot.id[:8]} at step {rot.step}" + (
        " (running in another worker: its lease is taken over)" if holder is not None else ""
    )
    if rot.sealed is not None:
        p.notes.append(
            f"rotation {rot.id[:8]} holds a new token: adopted as the replacement if Makini "
            "accepts it (and the kill leaves it alive), otherwise killed or reported"
        )
