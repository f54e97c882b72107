"""Leases: one drive per credential across drives and processes, kept alive by a heartbeat,
fenced when lost; and the due decision made again under the lease."""

from __future__ import annotations

import asyncio

import pytest

from rotator.errors import LeaseLost
from rotator.journal import LeaseKeeper, Rotation, Step
from rotator.makini.sim import SimServer
from rotator.model import utcnow
from rotator.rotation import unaccounted
from rotator.rotation.work import Work
from rotator.service import due_work, rotate_work
from tests.clock import FakeClock
from tests.core.conftest import Factory, active, current
from tests.wait import issuing, until


def issued(sim: SimServer, connection: str = "conn-a") -> int:
    return len(sim.tokens(connection, kind="access"))


async def test_two_drives_in_one_process_never_drive_one_credential_together(
    make_runtime: Factory, sim: SimServer
) -> None:
    # an admin rotate overlapping a scheduler tick in one process: before, both "held" the
    # process's lease, and the second drive raised a false alarm about a dead token
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="first", actor="t")
    sim.set(latency_ms=150)
    forced, scheduled = await asyncio.gather(
        runtime.engine.rotate("prod", "a", reason="admin api", actor="ops"),
        runtime.engine.rotate_many([Work("prod", "a", "scheduled", forced=True)], actor="tick"),
    )
    outcomes = sorted([forced.outcome, scheduled[0].outcome])
    assert outcomes in (["busy", "rotated"], ["nothing", "rotated"]), outcomes
    assert issued(sim) == 2  # the first token and exactly one more
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.attention is None and state.last_outcome == "rotated"
    [one, two] = current(runtime)
    assert one is not None and two is not None and one.version_id == two.version_id


async def test_a_stale_plan_does_not_rotate_again(make_runtime: Factory, sim: SimServer) -> None:
    # a replica planned "no token yet", another replica rotated meanwhile: the first one's
    # drive decides again under the lease and does nothing
    replica_a, replica_b = make_runtime(), make_runtime()
    stale = await due_work(replica_a)
    assert [(w.credential, w.reason) for w in stale] == [("a", "no token yet")]
    [done] = await rotate_work(replica_b, await due_work(replica_b))
    assert done.outcome == "rotated"
    [again] = await rotate_work(replica_a, stale)
    assert again.outcome == "nothing" and "no longer due" in (again.detail or "")
    assert issued(sim) == 1


async def test_a_forced_rotation_is_not_repeated_for_a_version_already_replaced(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    state = runtime.journal.state("prod", "a")
    assert state is not None
    seen = state.current_version_id
    await runtime.engine.rotate("prod", "a", reason="someone else", actor="t")
    late = await runtime.engine.rotate(
        "prod", "a", reason="asked on the old version", actor="t", seen=True, seen_version=seen
    )
    assert late.outcome == "nothing" and "another worker rotated it" in (late.detail or "")
    assert issued(sim) == 2
    fresh = await runtime.engine.rotate("prod", "a", reason="asked now", actor="t")
    assert fresh.outcome == "rotated" and issued(sim) == 3


async def test_the_heartbeat_keeps_a_lease_past_its_ttl(
    make_runtime: Factory, sim: SimServer
) -> None:
    # a drive longer than the lease (a slow Makini) keeps it: before, the lease was renewed
    # only at the next step, and a second replica took the credential over mid-issue
    holder, other = make_runtime(lock_ttl="1s"), make_runtime(lock_ttl="1s")
    sim.set(latency_ms=1600)  # the issue alone outlasts the 1 s lease
    drive = asyncio.ensure_future(holder.engine.rotate("prod", "a", reason="t", actor="t"))
    taken = await until("the drive's lease", lambda: holder.journal.lock_holder("prod/a"))
    first_expiry = taken.expires_at

    def renewed_past_its_first_expiry() -> bool:
        lease = holder.journal.lock_holder("prod/a")
        return lease is not None and lease.expires_at > first_expiry and utcnow() > first_expiry

    await until("the lease to outlive its first expiry", renewed_past_its_first_expiry)
    [busy] = await other.engine.rotate_many([Work("prod", "a", "no token yet")], actor="tick")
    assert busy.outcome == "busy"
    result = await drive
    assert result.outcome == "rotated"
    assert issued(sim) == 1


async def test_a_holder_that_lost_its_lease_writes_nothing_and_reports_its_token(
    make_runtime: Factory, sim: SimServer
) -> None:
    # a holder paused past its lease (its heartbeat stops: SIGSTOP, a frozen VM) while Makini
    # issues its token; another replica takes the credential over and completes it. The paused
    # one wakes with a token the journal refuses: it stores it nowhere and reports it.
    sim.set(issue_invalidates_previous=False, revoke_endpoint=False)
    paused, other = make_runtime(lock_ttl="1s"), make_runtime(lock_ttl="1s")
    sim.set(latency_ms=1500)
    drive = asyncio.ensure_future(paused.engine.rotate("prod", "a", reason="t", actor="t"))
    await until("its request for a token inside Makini", lambda: asyncio.to_thread(issuing, sim))
    await paused.engine.leases.aclose()  # paused: no heartbeat any more
    await until("its lease to expire", lambda: other.journal.lock_holder("prod/a") is None)
    sim.set(latency_ms=0)
    [taken] = await other.engine.rotate_many([Work("prod", "a", "resume")], actor="tick")
    assert taken.outcome == "rotated", taken
    late = await drive
    assert late.outcome in ("deferred", "failed") and "lease" in (late.error or "")
    winner = other.journal.state("prod", "a")
    assert winner is not None
    versions = [v for v in current(other) if v is not None]
    assert len(versions) == 2 and {v.version_id for v in versions} == {winner.current_version_id}
    assert versions[0].tokens.access.fingerprint in active(sim)
    # the paused holder's token: recorded as unaccounted with its fingerprint, never stored
    [entry] = unaccounted.entries(other.journal, "prod")
    assert entry.fingerprint is not None and entry.live_until is not None
    assert entry.fingerprint != versions[0].tokens.access.fingerprint
    # the taker's resume had recorded that request blind; the late answer named its token
    # and closed that entry: one request, one open entry
    [blind] = [
        e
        for e in unaccounted.entries(other.journal, "prod", include_closed=True)
        if e.fingerprint is None
    ]
    assert blind.status == unaccounted.RESOLVED and blind.asked_at == entry.asked_at
    assert f"entry {entry.id} names the token" in (blind.resolution or "")
    state = other.journal.state("prod", "a")
    assert state is not None and state.unaccounted == 1


async def test_the_journal_refuses_a_write_under_a_lease_that_is_not_held(
    make_runtime: Factory,
) -> None:
    runtime = make_runtime()
    journal = runtime.journal
    assert journal.acquire("prod/a", "holder-1")
    now = utcnow()
    row = Rotation(
        id="r-1",
        environment="prod",
        credential="a",
        kind="rotate",
        step=Step.STARTED,
        version_id="v-1",
        reason="t",
        actor="t",
        started_at=now,
        updated_at=now,
        attempts=0,
        notes="[]",
    )
    journal.add_rotation(row, lease=("prod/a", "holder-1"))
    journal.commit_step("r-1", {"step": Step.ISSUED}, lease=("prod/a", "holder-1"))
    journal.release("prod/a", "holder-1")
    assert journal.acquire("prod/a", "holder-2")
    for write in (
        lambda: journal.commit_step("r-1", {"step": Step.STAGED}, lease=("prod/a", "holder-1")),
        lambda: journal.set_state("prod", "a", lease=("prod/a", "holder-1"), attention="x"),
        lambda: journal.add_note("r-1", "x", lease=("prod/a", "holder-1")),
    ):
        try:
            write()
        except LeaseLost:
            pass
        else:
            raise AssertionError("a write under a lost lease was accepted")
    found = journal.rotation("r-1")
    assert found is not None and found.step == Step.ISSUED and found.note_list() == []
    state = journal.state("prod", "a")
    assert state is None or state.attention is None


async def test_a_lease_is_confirmed_again_only_once_two_thirds_of_its_ttl_passed() -> None:
    # the keeper measures on the clock it is given: time moves when the test says so
    clock = FakeClock()
    asked: list[str] = []

    async def renew(owners: list[str]) -> set[str]:
        return set(owners)

    async def renew_one(name: str, owner: str) -> bool:
        asked.append(owner)
        return owner != "lost"

    keeper = LeaseKeeper(3.0, renew, renew_one, clock=clock)
    lease = keeper.new("prod/a", "holder")
    clock.advance(1.9)
    await keeper.check(lease, "prod/a")
    assert asked == []  # confirmed less than two thirds of the ttl ago
    clock.advance(0.2)
    await keeper.check(lease, "prod/a")
    assert asked == ["holder"] and lease.confirmed_at == clock.monotonic()
    gone = keeper.new("prod/b", "lost")
    clock.advance(2.0)
    with pytest.raises(LeaseLost):
        await keeper.check(gone, "prod/b")
    assert gone.lost
