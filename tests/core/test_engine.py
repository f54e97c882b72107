"""The rotation engine against the simulator over a real socket, with real backends."""

from __future__ import annotations

import asyncio

import pytest

from rotator import faults
from rotator.errors import BackendUnavailable
from rotator.journal import Step
from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.rotation.importing import import_pair
from rotator.rotation.work import Work
from tests.clock import FakeClock
from tests.core.conftest import Factory, active, current
from tests.fakes.memory import MemoryBackend
from tests.wait import asked, highest, issuing, until, wait_until


async def test_first_rotation_stores_a_verified_token_everywhere(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    result = await runtime.engine.rotate("prod", "a", reason="test", actor="t")
    assert result.outcome == "rotated" and result.step == Step.DONE
    versions = current(runtime)
    assert all(v is not None for v in versions)
    assert len({v.version_id for v in versions if v}) == 1
    stored = versions[0]
    assert stored is not None
    assert active(sim) == {stored.tokens.access.fingerprint}
    rot = runtime.journal.rotation(result.rotation_id or "")
    assert rot is not None and rot.sealed is None  # no token material left in the journal
    [entry] = runtime.journal.audit_entries(action="rotation.promoted")
    assert entry.fingerprint == stored.tokens.access.fingerprint


async def test_rotation_replaces_and_retires_the_old_version(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [first, _] = current(runtime)
    assert first is not None
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "rotated"
    [second, _] = current(runtime)
    assert second is not None and second.version_id != first.version_id
    for backend in runtime.environments["prod"].backends:
        assert backend.read_version("a", first.version_id) is None
    assert active(sim) == {second.tokens.access.fingerprint}
    token = sim.token(first.tokens.access.fingerprint)
    assert token is not None and token["status"] == "revoked"
    assert runtime.journal.lock_holder("prod/a") is None  # given back with the retire's record


async def test_grace_period_keeps_previous_readable_then_retires(
    make_runtime: Factory, sim: SimServer
) -> None:
    sim.set(issue_invalidates_previous=False)
    clock = FakeClock()
    runtime = make_runtime(
        makini={"issue_invalidates_previous": False},
        schedule={"interval": "1h", "grace_period": "300ms"},
        clock=clock,
    )
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [first, _] = current(runtime)
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "rotated" and result.step == Step.PROMOTED
    assert runtime.journal.lock_holder("prod/a") is None  # given back after the drive
    primary = runtime.environments["prod"].primary
    previous = primary.read("a", Stage.PREVIOUS)
    assert first is not None and previous is not None
    assert previous.version_id == first.version_id
    assert (await runtime.engine.run_due("prod", "a")).outcome == "nothing"  # not yet
    clock.advance(0.35)
    retired = await runtime.engine.run_due("prod", "a")
    assert retired.outcome == "retired" and retired.step == Step.DONE
    assert primary.read_version("a", first.version_id) is None
    rot = runtime.journal.rotation(retired.rotation_id or "")
    assert rot is not None
    assert any("stays valid at Makini until it expires" in n for n in rot.note_list())


async def test_unknown_invalidation_is_probed(make_runtime: Factory, sim: SimServer) -> None:
    runtime = make_runtime(schedule={"interval": "1h", "grace_period": "1h"})
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    rot = runtime.journal.rotation(result.rotation_id or "")
    # the simulator killed the old token on issue: the probe saw it, so no grace period
    assert rot is not None and rot.invalidated_old is True and rot.step == Step.DONE


class Crash(BaseException):
    """Stands in for SIGKILL inside one process: nothing after the checkpoint runs."""


@pytest.mark.parametrize("invalidates", [True, False], ids=["issue-invalidates", "issue-keeps"])
@pytest.mark.parametrize("step", [Step.ISSUED, Step.STAGED, Step.VERIFIED, Step.PROMOTED])
async def test_crash_after_each_step_resumes_without_losing_a_token(
    make_runtime: Factory,
    sim: SimServer,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    invalidates: bool,
) -> None:
    sim.set(issue_invalidates_previous=invalidates)
    runtime = make_runtime(
        makini={"issue_invalidates_previous": invalidates},
        schedule={"interval": "1h", "grace_period": "0s"},
    )
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [first, _] = current(runtime)
    assert first is not None

    def crash_at(s: str, _cred: str) -> None:
        if s == step:
            raise Crash

    monkeypatch.setattr(faults, "checkpoint", crash_at)
    with pytest.raises(Crash):
        await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    monkeypatch.undo()
    # the crashed worker's lease would expire; a new worker in a new process resumes
    runtime.journal.release("prod/a", runtime.engine.owner)
    survivor = make_runtime(
        makini={"issue_invalidates_previous": invalidates},
        schedule={"interval": "1h", "grace_period": "0s"},
    )
    result = await survivor.engine.run_due("prod", "a")
    assert result.step == Step.DONE, result
    versions = current(survivor)
    assert versions[0] is not None
    assert {v.version_id for v in versions if v} == {versions[0].version_id}
    # every token Makini issued is stored as current, dead, or reported as still valid
    expected = {versions[0].tokens.access.fingerprint}
    if not invalidates:
        [retired] = survivor.journal.audit_entries(action="rotation.retired", limit=1)
        assert retired.fingerprint == first.tokens.access.fingerprint
        assert "stays valid at Makini" in " ".join(retired.as_dict()["detail"]["notes"])
        expected.add(first.tokens.access.fingerprint)
    assert active(sim) == expected
    assert survivor.journal.open_rotation("prod", "a") is None


async def test_rejected_new_token_rolls_back(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [before, _] = current(runtime)

    def revoke_after_stage(s: str, _cred: str) -> None:
        if s == Step.STAGED:
            rot = runtime.journal.open_rotation("prod", "a")
            assert rot is not None and rot.fingerprint
            sim.revoke(rot.fingerprint)

    monkeypatch.setattr(faults, "checkpoint", revoke_after_stage)
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "rolled_back"
    after = current(runtime)
    assert before is not None and all(
        v is not None and v.version_id == before.version_id for v in after
    )
    for backend in runtime.environments["prod"].backends:
        assert backend.read("a", Stage.PENDING) is None
    state = runtime.journal.state("prod", "a")
    # issuing killed the old token and the new one was rejected: said loudly
    assert state is not None and state.attention and "reconnect" in state.attention
    assert runtime.journal.audit_entries(action="rotation.rolled_back")


async def test_makini_outage_at_verify_defers_then_resumes(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime()

    def outage_after_stage(s: str, _cred: str) -> None:
        if s == Step.STAGED:
            sim.set(outage_s=30)

    monkeypatch.setattr(faults, "checkpoint", outage_after_stage)
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "deferred" and result.step == Step.STAGED
    assert result.error
    monkeypatch.undo()
    sim.set(outage_until=None)
    resumed = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert resumed.outcome == "rotated" and resumed.step == Step.DONE


class Flaky(MemoryBackend):
    broken = True

    def stage_pending(self, version: StoredVersion) -> None:
        if self.broken:
            raise BackendUnavailable(
                "cannot reach the store", backend=self.name, location=self.location
            )
        super().stage_pending(version)


async def test_a_backend_down_never_promotes_a_partial_version(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    [before, _] = current(runtime)
    rt = runtime.environments["prod"]
    flaky = Flaky(rt.backends[0].settings, "prod", stores=rt.backends[0].stores)
    rt.backends[0] = flaky
    result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "deferred" and result.step == Step.ISSUED
    assert result.error and "cannot reach the store" in result.error
    assert all(
        v is not None and before is not None and v.version_id == before.version_id
        for v in current(runtime)
    )
    state = runtime.journal.state("prod", "a")
    # the simulator killed the old token at issue: the stall is an alert, with its cause
    assert state is not None and state.attention and "dead token" in state.attention
    assert "cannot reach the store" in state.attention
    flaky.broken = False
    resumed = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    assert resumed.step == Step.DONE
    versions = current(runtime)
    assert versions[0] is not None and versions[0].version_id == resumed.version_id
    assert active(sim) == {versions[0].tokens.access.fingerprint}
    cleared = runtime.journal.state("prod", "a")
    assert cleared is not None and cleared.attention is None


async def test_two_workers_never_rotate_one_credential(make_runtime: Factory) -> None:
    a = make_runtime()
    b = make_runtime()
    results = await asyncio.gather(
        a.engine.rotate("prod", "a", reason="t", actor="a"),
        b.engine.rotate("prod", "a", reason="t", actor="b"),
    )
    outcomes = sorted(r.outcome for r in results)
    assert outcomes in (["busy", "rotated"], ["rotated", "rotated"])
    promoted = a.journal.audit_entries(action="rotation.promoted")
    assert len(promoted) == len([o for o in outcomes if o == "rotated"])


async def test_refresh_method_needs_a_bootstrap_then_refreshes(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime([{"name": "r", "connection_id": "conn-r", "method": "refresh"}])
    first = await runtime.engine.rotate("prod", "r", reason="t", actor="t")
    assert (
        first.outcome == "failed" and first.error and "rotator import" in (first.error or "")
    ) or first.outcome == "failed"
    rt = runtime.environments["prod"]
    code = sim.link_code("conn-r", client_id="test-prod")
    issued = await rt.makini.exchange_code(code, "http://localhost/cb")
    await import_pair(runtime.engine, "prod", "r", issued.tokens, actor="t", reason="bootstrap")
    result = await runtime.engine.rotate("prod", "r", reason="t", actor="t")
    assert result.outcome == "rotated", result
    [v, _] = current(runtime, "r")
    assert v is not None and v.tokens.refresh is not None
    assert v.tokens.access != issued.tokens.access


async def test_environments_stay_apart_at_makini(make_runtime: Factory, sim: SimServer) -> None:
    dev = make_runtime([{"name": "a", "connection_id": "conn-shared"}], env="dev")
    await dev.engine.rotate("dev", "a", reason="t", actor="t")
    prod = make_runtime([{"name": "a", "connection_id": "conn-shared"}])
    result = await prod.engine.rotate("prod", "a", reason="t", actor="t")
    assert result.outcome == "failed"
    assert result.error and "refused" in result.error


async def test_journal_on_postgresql(make_runtime: Factory, pg_url: str, sim: SimServer) -> None:
    runtime = make_runtime(journal_url=pg_url)
    results = await runtime.engine.rotate_many([Work("prod", "a", "t", forced=True)], actor="t")
    assert results[0].outcome == "rotated"
    assert runtime.journal.state("prod", "a") is not None


async def test_a_failing_journal_is_each_credentials_failure_not_a_crash(
    make_runtime: Factory,
) -> None:
    runtime = make_runtime(
        [{"name": "a", "connection_id": "conn-a"}, {"name": "b", "connection_id": "conn-b"}]
    )
    runtime.journal.close()  # every journal call now fails
    results = await runtime.engine.rotate_many(
        [Work("prod", "a", "t", forced=True), Work("prod", "b", "t", forced=True)], actor="t"
    )
    assert [(r.credential, r.outcome) for r in results] == [("a", "failed"), ("b", "failed")]
    assert all("journal" in (r.error or "") for r in results)
    assert runtime.engine.active == 0


async def test_no_more_requests_are_recorded_as_sent_than_makini_may_take(
    make_runtime: Factory, sim: SimServer
) -> None:
    # makini.max_concurrency below scheduler.concurrency: drives used to record their request
    # for a token as sent (asked_at) and then queue for one of the client's connections, so a
    # kill reported tokens for requests that never left the process
    names = [f"c{i}" for i in range(8)]
    runtime = make_runtime(
        [{"name": n, "connection_id": f"conn-{n}"} for n in names],
        makini={"max_concurrency": 2},
    )
    sim.set(latency_ms=150)
    async with highest(lambda: asked(runtime.journal.open_rotations("prod"))) as peak:
        results = await runtime.engine.rotate_many(
            [Work("prod", n, "t", forced=True) for n in names], actor="t"
        )
    assert {r.outcome for r in results} == {"rotated"}
    assert 1 <= peak[0] <= 2
    # and Makini itself never answered more than max_concurrency requests at once
    assert 1 <= sim.stats()["peak_inflight"] <= 2


async def test_a_drive_leaves_its_makini_slot_to_another_while_it_writes(
    make_runtime: Factory, sim: SimServer
) -> None:
    # a drive used to hold its slot of makini.max_concurrency from its first journal write to
    # its last: with rotations in flight above the Makini limit, Makini sat idle while drives
    # wrote their backends and journal (first tokens for 10,000 took 45 s instead of 39 s)
    names = [f"c{i}" for i in range(4)]
    runtime = make_runtime(
        [{"name": n, "connection_id": f"conn-{n}"} for n in names],
        makini={"max_concurrency": 1},
        top={"scheduler": {"concurrency": 4}},
    )
    sim.set(latency_ms=40)
    backend = runtime.environments["prod"].backends[0]
    stage = backend.stage_pending
    seen: list[bool] = []

    def slow_stage(version: StoredVersion) -> None:
        # while this drive writes, another drive may talk to Makini
        try:
            wait_until("another drive's call to Makini", sim.inflight, 3, every_s=0.005)
        except AssertionError:
            seen.append(False)
        else:
            seen.append(True)
        stage(version)

    backend.stage_pending = slow_stage  # type: ignore[method-assign]
    results = await runtime.engine.rotate_many(
        [Work("prod", n, "t", forced=True) for n in names], actor="t"
    )
    assert {r.outcome for r in results} == {"rotated"}
    assert any(seen), "no drive's write overlapped another drive's call to Makini"
    assert sim.stats()["peak_inflight"] == 1  # and the limit held


async def test_a_drive_cancelled_while_it_asks_makini_gives_its_slot_back(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime(makini={"max_concurrency": 1})
    gate = runtime.engine.makini_gate("prod")
    sim.set(latency_ms=2000)
    drive = asyncio.ensure_future(runtime.engine.rotate("prod", "a", reason="t", actor="t"))
    await until("the drive asks Makini", lambda: asyncio.to_thread(issuing, sim))
    assert gate.locked()  # the drive holds the environment's only slot while it asks
    drive.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drive
    assert not gate.locked()
    await asyncio.wait_for(gate.acquire(), 1)  # the next drive gets it
    gate.release()


async def test_an_import_is_journaled_like_any_change(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    before = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    rt = runtime.environments["prod"]
    issued = await rt.makini.issue_token("conn-a")
    version = await import_pair(runtime.engine, "prod", "a", issued.tokens, actor="t", reason="x")
    [row] = [r for r in runtime.journal.rotations("prod") if r.kind == "import"]
    assert (row.step, row.version_id, row.old_version_id) == (
        Step.DONE,
        version,
        before.version_id,
    )
    assert row.sealed is None and row.actor == "t" and row.reason == "x"
    assert all(v is not None and v.version_id == version for v in current(runtime))
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.last_outcome == "imported"
    assert len(runtime.journal.audit_entries(action="credential.imported")) == 1
