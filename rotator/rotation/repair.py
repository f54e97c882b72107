"""Backends against the journal: find drift and repair it, and probe each backend's access.

``sync`` makes every backend of an environment hold, as current, the version the journal says
is current (the journal is the truth: it records only what every backend was told). A backend
that lacks the version gets it copied from one that holds it, then promoted. Nothing is deleted.

``probe`` checks that each backend is reachable and that the identity in use may write, read and
make unreadable in its own environment's location, with a throwaway credential.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backends.base import Backend
from rotator.errors import BackendError, RotatorError
from rotator.model import Secret, Stage, StoredVersion, TokenPair, new_version_id
from rotator.rotation.runtime import Runtime

PROBE_CREDENTIAL = "rotator-probe"


@dataclass
class SyncChange:
    credential: str
    backend: str
    action: str
    """in-sync | promoted | copied+promoted | failed | no-truth | busy; a dry run says
    would-promote | would-copy+promote where sync would change something"""
    detail: str = ""
    version: str | None = None
    """the journal's current version (what the backend is made to hold)"""
    held: str | None = None
    """the version the backend held as current before"""

    def as_dict(self) -> dict[str, str | None]:
        return {
            "credential": self.credential,
            "backend": self.backend,
            "action": self.action,
            "detail": self.detail,
            "version": self.version,
            "held": self.held,
        }


def _sync_one(
    rt_backends: list[Backend], credential: str, truth: str, *, dry_run: bool = False
) -> list[SyncChange]:
    """Make each backend hold ``truth`` as current; with ``dry_run``, the same reads and
    decisions, and no write (actions ``would-...``)."""
    source: StoredVersion | None = None
    for backend in rt_backends:
        try:
            source = backend.read_version(credential, truth)
        except BackendError:
            continue
        if source is not None:
            break
    changes: list[SyncChange] = []
    for backend in rt_backends:
        held: str | None = None
        try:
            current = backend.read(credential, Stage.CURRENT)
            held = current.version_id if current else None
            if held == truth:
                action, detail = "in-sync", ""
            elif backend.read_version(credential, truth) is not None:
                if not dry_run:
                    backend.promote(credential, truth)
                action, detail = ("would-promote" if dry_run else "promoted"), ""
            elif source is not None:
                if not dry_run:
                    backend.stage_pending(source.with_stage(None))
                    backend.promote(credential, truth)
                action, detail = ("would-copy+promote" if dry_run else "copied+promoted"), ""
            else:
                action = "failed"
                detail = (
                    "no backend holds the journal's current version any more: rotate this "
                    "credential"
                )
        except BackendError as exc:
            action, detail = "failed", exc.message
        changes.append(SyncChange(credential, backend.name, action, detail, truth, held))
    return changes


async def sync(
    runtime: Runtime, environment: str, *, dry_run: bool = False, actor: str
) -> list[SyncChange]:
    """Repair every backend of ``environment`` that drifted from the journal's current version."""
    rt = runtime.environments[environment]
    engine = runtime.engine
    states = runtime.journal.states(environment)
    out: list[SyncChange] = []
    for cred in rt.settings.credentials:
        state = states.get((environment, cred.name))
        truth = state.current_version_id if state else None
        if truth is None:
            out.append(SyncChange(cred.name, "*", "no-truth", "never rotated: nothing to sync"))
            continue
        if dry_run:
            out += await asyncio.to_thread(_sync_one, rt.backends, cred.name, truth, dry_run=True)
            continue
        # the truth is read again under the lease: a rotation that promoted a newer version
        # since the list above was read must not be "repaired" back to the older one
        lease = engine.new_lease(environment, cred.name, "sync")
        if not await asyncio.to_thread(runtime.journal.acquire, *lease.key):
            out.append(SyncChange(cred.name, "*", "busy", "a rotation holds it; try again"))
            continue
        engine.leases.add(lease)
        try:
            state = await asyncio.to_thread(runtime.journal.state, environment, cred.name)
            truth = state.current_version_id if state else None
            if truth is None:
                continue
            await engine.leases.check(lease, f"{environment}/{cred.name}")
            changes = await asyncio.to_thread(_sync_one, rt.backends, cred.name, truth)
        finally:
            engine.leases.drop(lease)
            await asyncio.to_thread(runtime.journal.release, *lease.key)
        repaired = [c for c in changes if c.action in ("promoted", "copied+promoted")]
        if repaired:
            await asyncio.to_thread(
                functools.partial(
                    runtime.journal.audit,
                    actor=actor,
                    action="backend.synced",
                    outcome="success",
                    environment=environment,
                    credential=cred.name,
                    version_id=truth,
                    backends=[c.as_dict() for c in repaired],
                )
            )
        out += changes
    return out


@dataclass
class ProbeResult:
    environment: str
    backend: str
    location: str
    ok: bool
    steps: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "backend": self.backend,
            "location": self.location,
            "ok": self.ok,
            "steps": self.steps,
        }


def _probe_backend(environment: str, backend: Backend, now: datetime) -> ProbeResult:
    result = ProbeResult(environment, backend.name, backend.location, ok=True)

    def step(name: str, fn: Any) -> bool:
        started = time.perf_counter()
        try:
            fn()
        except RotatorError as exc:
            result.ok = False
            result.steps[name] = f"FAILED: {exc.describe().splitlines()[0]}" + (
                f" ({exc.hint})" if exc.hint else ""
            )
            return False
        result.steps[name] = f"ok ({(time.perf_counter() - started) * 1000:.0f} ms)"
        return True

    version = StoredVersion(
        environment,
        PROBE_CREDENTIAL,
        new_version_id(),
        TokenPair(Secret("probe-" + new_version_id()), None, now),
    )
    if not step("reach", backend.check):
        return result
    if step("write", lambda: backend.stage_pending(version)):
        step("read", lambda: _expect(backend.read_version(PROBE_CREDENTIAL, version.version_id)))
        step("promote", lambda: backend.promote(PROBE_CREDENTIAL, version.version_id))
        step(
            "make unreadable", lambda: backend.make_unreadable(PROBE_CREDENTIAL, version.version_id)
        )
        step("delete", lambda: backend.delete(PROBE_CREDENTIAL))
    return result


def _expect(version: StoredVersion | None) -> None:
    if version is None:
        raise BackendError("wrote a probe version but could not read it back")


async def probe(runtime: Runtime, environment: str | None = None) -> list[ProbeResult]:
    jobs = [
        asyncio.to_thread(_probe_backend, name, backend, runtime.engine.clock.now())
        for name, rt in runtime.environments.items()
        if environment in (None, name)
        for backend in rt.backends
    ]
    return list(await asyncio.gather(*jobs))
