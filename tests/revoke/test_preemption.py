"""A revoke pre-empts a rotation in flight in another worker: it takes the lease over, marks the
rotation superseded, and adopts or kills the token that rotation got from Makini.

The rotating worker is another Runtime on the same journal and backends, paused inside a step
(``faults.checkpoint`` or its Makini client) while the revoke runs on its own thread and loop,
as another process would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from rotator import faults
from rotator.errors import LockBusy
from rotator.journal import Rotation, Step
from rotator.makini.sim import SimServer
from rotator.revoke import CredentialReport, resume_held
from rotator.rotation.runtime import Runtime
from tests.revoke.conftest import Factory, current, readable_anywhere, revoke, status_of


def in_other_worker(
    config: Any, work: Callable[[Runtime], Coroutine[Any, Any, list[CredentialReport]]]
) -> list[CredentialReport]:
    """Run ``work`` with a fresh Runtime on a thread of its own (another worker), and wait."""
    out: list[list[CredentialReport]] = []
    errors: list[BaseException] = []

    async def main() -> None:
        runtime = Runtime.open(config, resume_revoke=resume_held)
        try:
            out.append(await work(runtime))
        finally:
            await runtime.aclose()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return out[0]


def rotation_row(runtime: Runtime) -> Rotation:
    [row] = [r for r in runtime.journal.rotations("prod") if r.kind == "rotate"][:1]
    return row


async def test_revoke_adopts_the_token_of_a_rotation_paused_after_issue(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_runtime()
    await worker.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(worker)
    assert old is not None
    reports: list[CredentialReport] = []

    def revoke_now(step: str, _cred: str) -> None:
        if step == Step.ISSUED and not reports:
            reports.extend(in_other_worker(worker.config, lambda rt: revoke(rt, "a")))

    monkeypatch.setattr(faults, "checkpoint", revoke_now)
    result = await worker.engine.rotate("prod", "a", reason="scheduled", actor="scheduler")
    monkeypatch.undo()

    # the rotating worker stopped at its next fence, without writing anything
    assert (
        not result.ok and result.error and ("lease" in result.error or "superseded" in result.error)
    )
    [report] = reports
    row = rotation_row(worker)
    assert row.step == Step.SUPERSEDED and row.sealed is None
    assert report.outcome == "revoked" and report.superseded == [row.id], report
    # its token X killed the old one when Makini issued it, and Makini accepts it: adopted
    assert report.adopted_from == row.id and report.replacement_version == row.version_id
    versions = current(worker)
    assert {v.version_id for v in versions if v} == {row.version_id} and None not in versions
    assert status_of(sim, old) == "revoked"
    live = {t["fingerprint"] for t in sim.tokens("conn-a", kind="access", status="active")}
    assert live == {row.fingerprint}
    assert not readable_anywhere(worker, "a", old.version_id)
    [superseded] = worker.journal.audit_entries(action="rotation.superseded")
    assert superseded.version_id == row.version_id


async def test_a_token_that_does_not_verify_is_killed_not_adopted(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_runtime()
    await worker.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(worker)
    assert old is not None
    reports: list[CredentialReport] = []

    def revoke_now(step: str, _cred: str) -> None:
        if step == Step.STAGED and not reports:
            pending = worker.journal.open_rotation("prod", "a")
            assert pending is not None and pending.fingerprint
            sim.revoke(pending.fingerprint)  # the pre-empted rotation's token died meanwhile
            reports.extend(in_other_worker(worker.config, lambda rt: revoke(rt, "a")))

    monkeypatch.setattr(faults, "checkpoint", revoke_now)
    result = await worker.engine.rotate("prod", "a", reason="scheduled", actor="scheduler")
    monkeypatch.undo()

    assert not result.ok
    [report] = reports
    row = rotation_row(worker)
    assert report.outcome == "revoked" and report.adopted_from is None, report
    assert report.replacement_version != row.version_id
    # the staged (pending) version of the pre-empted rotation is readable nowhere
    assert not readable_anywhere(worker, "a", row.version_id)
    assert not readable_anywhere(worker, "a", old.version_id)
    [new, _] = current(worker)
    assert new is not None and new.version_id == report.replacement_version
    live = {t["fingerprint"] for t in sim.tokens("conn-a", kind="access", status="active")}
    assert live == {new.tokens.access.fingerprint}
    assert row.sealed is None
    assert any("is dead" in n for n in report.notes)


async def test_a_token_received_after_the_revoke_is_kept_and_accounted_for(
    make_runtime: Factory, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst race: the pre-empted worker's issue answer arrives after the revoke finished
    (here its issue is sent only then). The journal keeps that token sealed, status says so,
    and ``--resume`` makes it current because it killed the revoke's replacement."""
    worker = make_runtime(makini={"timeout_s": 0.5})
    await worker.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(worker)
    assert old is not None
    makini = worker.environments["prod"].makini
    real_issue = makini.issue_token
    reports: list[CredentialReport] = []

    async def issue_late(connection_id: str) -> Any:
        reports.extend(in_other_worker(worker.config, lambda rt: revoke(rt, "a")))
        return await real_issue(connection_id)

    monkeypatch.setattr(makini, "issue_token", issue_late)
    result = await worker.engine.rotate("prod", "a", reason="scheduled", actor="scheduler")
    monkeypatch.undo()

    [report] = reports
    assert report.outcome == "revoked"
    assert not result.ok and "superseded" in (result.error or "")
    row = rotation_row(worker)
    assert row.step == Step.SUPERSEDED and row.sealed is not None  # kept, never lost
    state = worker.journal.state("prod", "a")
    assert state is not None and state.attention and "--resume" in state.attention
    [replacement, _] = current(worker)
    assert replacement is not None and status_of(sim, replacement) == "revoked"  # killed by X

    [resumed] = await revoke(worker, "a", resume=True, reason="")

    assert resumed.outcome == "revoked", resumed
    [now, _] = current(worker)
    assert now is not None and now.version_id == row.version_id and status_of(sim, now) == "active"
    assert worker.journal.rotation(row.id).sealed is None  # type: ignore[union-attr]
    state = worker.journal.state("prod", "a")
    assert state is not None and state.attention is None
    assert worker.journal.audit_entries(action="revoke.late_token_adopted")


async def test_the_journal_refuses_writes_to_a_superseded_rotation(make_runtime: Factory) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    row = rotation_row(runtime)
    runtime.journal.commit_step(row.id, {"step": Step.SUPERSEDED})
    with pytest.raises(LockBusy):
        runtime.journal.update_rotation(row.id, attempts=9)
    with pytest.raises(LockBusy):
        runtime.journal.commit_step(row.id, {"step": Step.PROMOTED}, state={"attention": None})
    again = runtime.journal.rotation(row.id)
    assert again is not None and again.step == Step.SUPERSEDED and again.attempts != 9


async def test_a_second_revoke_of_a_credential_being_revoked_is_busy(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    sim.set(outage_s=30)
    [first] = await revoke(runtime, "a")
    assert first.outcome == "incomplete"
    sim.set(outage_until=None)
    runtime.journal.acquire("prod/a", "someone-finishing-it")
    [second] = await revoke(runtime, "a")
    assert second.outcome == "busy" and second.next_steps
    runtime.journal.release("prod/a", "someone-finishing-it")
    [third] = await revoke(runtime, "a")  # finishes the open one instead of starting another
    assert third.outcome == "revoked" and third.resumed and third.revoke_id == first.revoke_id


@pytest.mark.postgres
async def test_preemption_on_postgresql(
    make_runtime: Factory, sim: SimServer, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_runtime(journal_url=pg_url)
    await worker.engine.rotate("prod", "a", reason="t", actor="t")
    [old, _] = current(worker)
    assert old is not None
    reports: list[CredentialReport] = []

    def revoke_now(step: str, _cred: str) -> None:
        if step == Step.STAGED and not reports:
            reports.extend(in_other_worker(worker.config, lambda rt: revoke(rt, "a")))

    monkeypatch.setattr(faults, "checkpoint", revoke_now)
    result = await worker.engine.rotate("prod", "a", reason="scheduled", actor="scheduler")
    monkeypatch.undo()

    assert not result.ok
    [report] = reports
    row = rotation_row(worker)
    assert report.outcome == "revoked" and report.adopted_from == row.id, report
    assert row.step == Step.SUPERSEDED
    with pytest.raises(LockBusy):
        worker.journal.commit_step(row.id, {"step": Step.PROMOTED})
    assert status_of(sim, old) == "revoked" and not readable_anywhere(worker, "a", old.version_id)
