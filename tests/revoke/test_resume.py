"""A revoke that stops halfway (Makini down, a backend down, a crash) is recorded, shown loudly,
and finished by ``--resume`` or by the scheduler without losing or leaking a token."""

from __future__ import annotations

import pytest

from rotator import faults
from rotator.errors import BackendUnavailable
from rotator.makini.sim import SimServer
from rotator.model import StoredVersion, utcnow
from rotator.revoke import RevokeStep
from rotator.rotation.schedule import RESUME, plan
from rotator.rotation.status import collect
from rotator.service import run_due_once
from tests.fakes.memory import MemoryBackend
from tests.revoke.conftest import Factory, current, readable_anywhere, revoke, status_of


class Crash(BaseException):
    """Stands in for SIGKILL inside one process."""


async def test_makini_outage_mid_revoke_then_resume(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(runtime)
    assert old is not None

    def outage_after_issue(step: str, _cred: str) -> None:
        if step == RevokeStep.ISSUED:
            sim.set(outage_s=30)

    monkeypatch.setattr(faults, "checkpoint", outage_after_issue)
    [report] = await revoke(runtime, "a")
    monkeypatch.undo()

    assert report.outcome == "incomplete" and not report.ok and report.error
    assert any("--resume" in s for s in report.next_steps)
    row = runtime.journal.open_revoke("prod", "a")
    assert row is not None and row.step == RevokeStep.ISSUED
    assert row.sealed is not None  # the new token Makini issued is held, sealed
    [status] = await collect(runtime, "prod")
    assert status.open_revoke == RevokeStep.ISSUED and status.attention and not status.healthy
    assert "--resume" in status.attention
    [item] = plan(runtime.config, runtime.journal, utcnow())
    assert item.action == RESUME and item.urgent

    sim.set(outage_until=None)
    [resumed] = await revoke(runtime, "a", resume=True, reason="")

    assert resumed.outcome == "revoked" and resumed.resumed, resumed
    [new, _] = current(runtime)
    assert new is not None and status_of(sim, new) == "active"
    assert new.tokens.access.fingerprint == row.fingerprint  # the sealed token, not a new one
    assert status_of(sim, old) == "revoked"
    assert not readable_anywhere(runtime, "a", old.version_id)
    [status] = await collect(runtime, "prod")
    assert status.healthy and status.open_revoke is None


async def test_the_scheduler_finishes_an_unfinished_revoke(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(runtime)
    assert old is not None
    sim.set(outage_s=30)
    [report] = await revoke(runtime, "a")
    assert report.outcome == "incomplete" and report.step == RevokeStep.STARTED
    sim.set(outage_until=None)

    [result] = await run_due_once(runtime)

    assert result.outcome == "revoked" and result.ok, result
    assert runtime.journal.open_revoke("prod", "a") is None
    assert status_of(sim, old) == "revoked"
    [new, _] = current(runtime)
    assert new is not None and status_of(sim, new) == "active"


class Flaky(MemoryBackend):
    broken = True

    def _fail(self) -> None:
        if self.broken:
            raise BackendUnavailable("cannot reach the store", backend=self.name)

    def stage_pending(self, version: StoredVersion) -> None:
        self._fail()
        super().stage_pending(version)

    def make_unreadable(self, credential: str, version_id: str) -> None:
        self._fail()
        super().make_unreadable(credential, version_id)


async def test_one_backend_down_then_resume(make_runtime: Factory, sim: SimServer) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(runtime)
    assert old is not None
    rt = runtime.environments["prod"]
    flaky = Flaky(rt.backends[0].settings, "prod", stores=rt.backends[0].stores)
    rt.backends[0] = flaky

    [report] = await revoke(runtime, "a")

    assert report.outcome == "incomplete" and report.step == RevokeStep.KILLED
    assert report.old_dead is True and status_of(sim, old) == "revoked"  # bleeding stopped first
    assert not report.backends["mem"].ok and report.backends["file"].ok
    assert "cannot reach the store" in (report.error or "")
    file_backend = rt.backends[1]
    # the reachable backend already serves the replacement and no longer holds the old token
    fresh = file_backend.read("a")
    assert fresh is not None and fresh.version_id != old.version_id
    assert file_backend.read_version("a", old.version_id) is None
    assert flaky.read_version("a", old.version_id) is not None
    row = runtime.journal.open_revoke("prod", "a")
    assert row is not None and row.sealed is not None

    flaky.broken = False
    [resumed] = await revoke(runtime, "a", resume=True)

    assert resumed.outcome == "revoked", resumed
    versions = current(runtime)
    assert {v.version_id for v in versions if v} == {fresh.version_id} and None not in versions
    assert not readable_anywhere(runtime, "a", old.version_id)
    assert status_of(sim, fresh) == "active"


@pytest.mark.parametrize("where", ["issue", RevokeStep.ISSUED, "install", "purge"])
async def test_a_crash_anywhere_resumes_losing_nothing(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Dies while Makini issues (the answer is lost), right after the new token is sealed,
    while storing the replacement (one backend has it), or while purging (the replacement is
    current everywhere; the journal still says *issued*)."""
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(runtime)
    assert old is not None
    rt = runtime.environments["prod"]

    def crash(s: str, _cred: str) -> None:
        if s == where:
            raise Crash

    async def issued_then_crash(connection_id: str) -> object:
        await real_issue(connection_id)  # Makini issued it (and killed the old token)...
        raise Crash  # ...and the process died before it read the answer

    def crash_in_backend(*_a: object) -> None:
        raise Crash

    real_issue = rt.makini.issue_token
    if where == "issue":
        monkeypatch.setattr(rt.makini, "issue_token", issued_then_crash)
    elif where == "install":
        monkeypatch.setattr(rt.backends[1], "promote", crash_in_backend)
    elif where == "purge":
        monkeypatch.setattr(rt.backends[1], "make_unreadable", crash_in_backend)
    monkeypatch.setattr(faults, "checkpoint", crash)
    with pytest.raises(Crash):
        await revoke(runtime, "a")
    monkeypatch.undo()
    holder = runtime.journal.lock_holder("prod/a")  # a SIGKILLed holder's lease expires
    if holder is not None:
        runtime.journal.release("prod/a", holder.owner)

    survivor = make_runtime()
    [report] = await revoke(survivor, "a", resume=True)

    assert report.outcome == "revoked", report
    [new, _] = current(survivor)
    assert new is not None
    assert status_of(sim, old) == "revoked"
    assert not readable_anywhere(survivor, "a", old.version_id)
    # every token Makini issued for the connection is the stored one, or dead
    live = {t["fingerprint"] for t in sim.tokens("conn-a", kind="access", status="active")}
    assert live == {new.tokens.access.fingerprint}
    assert all(r.sealed is None for r in survivor.journal.rotations("prod"))
