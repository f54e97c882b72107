"""Each way of killing a token, each scope, --no-replace and --dry-run, against the simulator
over a real socket with a memory and a file backend."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rotator.journal import Rotation
from rotator.makini.sim import SimServer
from rotator.model import Stage, utcnow
from rotator.revoke import Revoker, RevokeRequest, RevokeStep
from rotator.rotation.importing import import_pair
from rotator.rotation.runtime import Runtime
from rotator.rotation.schedule import WAIT, plan
from tests.revoke.conftest import (
    REVOKE_PATH,
    Factory,
    current,
    readable_anywhere,
    revoke,
    status_of,
)
from tests.wait import asked, highest

TWO = [{"name": "a", "connection_id": "conn-a"}, {"name": "b", "connection_id": "conn-b"}]


async def rotated(runtime: Runtime, *names: str) -> None:
    for name in names or ("a",):
        result = await runtime.engine.rotate("prod", name, reason="setup", actor="t")
        assert result.outcome == "rotated", result


def revoke_rows(runtime: Runtime) -> list[Rotation]:
    return [r for r in runtime.journal.rotations("prod") if r.kind == "revoke"]


async def test_issue_kills_replaces_purges_and_confirms(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None
    dropped: list[tuple[str, str, str]] = []
    promoted: list[str] = []
    runtime.engine.events.revoked.subscribe(lambda e, c, v: dropped.append((e, c, v)))
    runtime.engine.events.promoted.subscribe(lambda e, c, v: promoted.append(v.version_id))

    [report] = await revoke(runtime, "a")

    assert report.outcome == "revoked" and report.ok, report
    assert report.method == "issue" and report.old_dead is True
    new = current(runtime)
    assert new[0] is not None and {v.version_id for v in new if v} == {new[0].version_id}
    assert new[0].version_id == report.replacement_version != old.version_id
    assert status_of(sim, old) == "revoked"
    assert status_of(sim, new[0]) == "active"
    assert not readable_anywhere(runtime, "a", old.version_id)
    assert dropped == [("prod", "a", old.version_id)]
    assert promoted == [new[0].version_id]
    assert set(report.backends) == {"mem", "file"} and all(b.ok for b in report.backends.values())
    assert {"kill_s", "replace_s", "purge_s", "confirm_s", "total_s"} <= set(report.timings)
    [row] = revoke_rows(runtime)
    assert row.step == RevokeStep.DONE and row.sealed is None and row.finished_at is not None
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.attention is None and state.last_outcome == "revoked"
    assert state.current_version_id == new[0].version_id
    actions = [e.action for e in runtime.journal.audit_entries(environment="prod")]
    for action in (
        "revoke.started",
        "revoke.token_issued",
        "revoke.killed",
        "revoke.replaced",
        "revoke.completed",
    ):
        assert action in actions
    [done] = runtime.journal.audit_entries(action="revoke.completed")
    detail = done.as_dict()["detail"]
    assert done.actor == "tester@host" and detail["reason"] == "leaked in a build log"
    assert detail["report"]["old_token_dead"] is True
    assert detail["report"]["backends"]["file"]["actions"]
    assert done.fingerprint == old.tokens.access.fingerprint


async def test_several_and_all_credentials(make_runtime: Factory, sim: SimServer) -> None:
    creds = [{"name": f"c{i}", "connection_id": f"conn-{i}"} for i in range(6)]
    runtime = make_runtime(creds, top={"scheduler": {"concurrency": 3}})
    await rotated(runtime, *(f"c{i}" for i in range(5)))  # c5 never had a token
    olds = {f"c{i}": current(runtime, f"c{i}")[0] for i in range(5)}

    two = await revoke(runtime, "c0", "c1")
    assert [r.outcome for r in two] == ["revoked", "revoked"]

    reports = await revoke(runtime, all_=True)
    by_name = {r.credential: r for r in reports}
    assert by_name["c5"].outcome == "skipped"
    assert all(by_name[f"c{i}"].outcome == "revoked" for i in range(5))
    for name, old in olds.items():
        assert old is not None and status_of(sim, old) == "revoked"
        [now, _] = current(runtime, name)
        assert now is not None and status_of(sim, now) == "active"
        assert not readable_anywhere(runtime, name, old.version_id)


async def test_revokes_at_once_record_no_more_requests_as_sent_than_makini_may_take(
    make_runtime: Factory, sim: SimServer
) -> None:
    # a revoke of several credentials ran scheduler.concurrency of them at once whatever
    # makini.max_concurrency said: each recorded its request for a token as sent (asked_at)
    # and then queued for one of the client's connections, so a kill reported tokens for
    # requests that never left the process
    creds = [{"name": f"c{i}", "connection_id": f"conn-{i}"} for i in range(6)]
    runtime = make_runtime(
        creds, makini={"max_concurrency": 2}, top={"scheduler": {"concurrency": 6}}
    )
    await rotated(runtime, *(f"c{i}" for i in range(6)))
    sim.set(latency_ms=150)
    async with highest(lambda: asked(revoke_rows(runtime))) as peak:
        reports = await revoke(runtime, all_=True, strategy="issue")
    assert {r.outcome for r in reports} == {"revoked"}
    assert 1 <= peak[0] <= 2
    assert sim.stats()["peak_inflight"] <= 2


async def test_refresh_strategy(make_runtime: Factory, sim: SimServer) -> None:
    runtime = make_runtime(
        [
            {
                "name": "r",
                "connection_id": "conn-r",
                "method": "refresh",
                "revoke_strategy": "refresh",
            }
        ]
    )
    rt = runtime.environments["prod"]
    issued = await rt.makini.exchange_code(sim.link_code("conn-r", client_id="test-prod"), "cb")
    await import_pair(runtime.engine, "prod", "r", issued.tokens, actor="t", reason="bootstrap")
    [old, _] = current(runtime, "r")
    assert old is not None

    [report] = await revoke(runtime, "r")

    assert report.outcome == "revoked" and report.method == "refresh", report
    [new, _] = current(runtime, "r")
    assert new is not None and new.tokens.refresh is not None
    assert status_of(sim, old) == "revoked" and status_of(sim, new) == "active"
    assert not readable_anywhere(runtime, "r", old.version_id)


async def test_revoke_path_kills_only_that_token(make_runtime: Factory, sim: SimServer) -> None:
    sim.set(revoke_endpoint=True, issue_invalidates_previous=False)
    runtime = make_runtime(makini={"revoke_path": REVOKE_PATH, "issue_invalidates_previous": False})
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None

    [report] = await revoke(runtime, "a")  # auto: the endpoint is configured

    assert report.outcome == "revoked" and report.method == "revoke_path", report
    [new, _] = current(runtime)
    assert new is not None and status_of(sim, new) == "active"
    assert status_of(sim, old) == "revoked"
    assert sim.token(old.tokens.refresh.fingerprint)["status"] == "revoked"  # type: ignore[union-attr,index]
    assert not readable_anywhere(runtime, "a", old.version_id)


async def test_disconnect_is_loud_and_leaves_no_token(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime(
        [{"name": "a", "connection_id": "conn-a", "revoke_strategy": "disconnect"}]
    )
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None
    plans = await Revoker(runtime.engine).plan(RevokeRequest("prod", ("a",), reason="x", actor="t"))
    assert plans[0].may_disconnect and "DISCONNECT" in plans[0].warnings[0]

    [report] = await revoke(runtime, "a")

    assert report.outcome == "revoked" and report.disconnected and report.old_dead
    assert any("reconnect" in s for s in report.next_steps)
    assert status_of(sim, old) == "revoked"
    assert [c["status"] for c in sim.connections() if c["id"] == "conn-a"] == ["disconnected"]
    assert current(runtime) == [None, None]
    assert not readable_anywhere(runtime, "a", old.version_id)
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.attention and "DISCONNECTED" in state.attention
    assert state.current_version_id is None
    [started] = runtime.journal.audit_entries(action="revoke.started")
    assert started.as_dict()["detail"]["may_disconnect"] is True
    # nothing rotates a disconnected credential behind the operator's back
    [item] = plan(runtime.config, runtime.journal, utcnow())
    assert item.action == WAIT


async def test_auto_escalates_to_disconnect_when_the_old_token_survives(
    make_runtime: Factory, sim: SimServer
) -> None:
    sim.set(issue_invalidates_previous=False)
    runtime = make_runtime()
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None
    plans = await Revoker(runtime.engine).plan(RevokeRequest("prod", ("a",), reason="x", actor="t"))
    assert plans[0].method == "issue" and plans[0].escalate and plans[0].may_disconnect

    [report] = await revoke(runtime, "a")

    assert report.outcome == "revoked" and report.method == "disconnect" and report.disconnected
    assert status_of(sim, old) == "revoked"
    assert sim.tokens("conn-a", kind="access", status="active") == []


async def test_explicit_issue_that_leaves_the_old_token_alive_is_unconfirmed(
    make_runtime: Factory, sim: SimServer
) -> None:
    sim.set(issue_invalidates_previous=False)
    runtime = make_runtime()
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None

    [report] = await revoke(runtime, "a", strategy="issue")

    assert report.outcome == "unconfirmed" and not report.ok and report.old_dead is False
    assert any("--strategy disconnect" in s for s in report.next_steps)
    # the bleeding is stopped everywhere the rotator reaches: replaced and purged
    [new, _] = current(runtime)
    assert new is not None and new.version_id == report.replacement_version
    assert not readable_anywhere(runtime, "a", old.version_id)
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.attention and "still works" in state.attention


async def test_no_replace_with_revoke_path_leaves_no_current_token(
    make_runtime: Factory, sim: SimServer
) -> None:
    sim.set(revoke_endpoint=True)
    runtime = make_runtime(makini={"revoke_path": REVOKE_PATH})
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None

    [report] = await revoke(runtime, "a", replace=False)

    assert report.outcome == "revoked" and report.replacement_version is None
    assert current(runtime) == [None, None]
    assert status_of(sim, old) == "revoked"
    assert sim.tokens("conn-a", kind="access", status="active") == []
    state = runtime.journal.state("prod", "a")
    assert state is not None and state.current_version_id is None and state.attention
    [item] = plan(runtime.config, runtime.journal, utcnow())
    assert item.action == WAIT  # --no-replace is not undone by the scheduler


async def test_no_replace_still_stores_a_token_the_kill_produced(
    make_runtime: Factory, sim: SimServer
) -> None:
    runtime = make_runtime()
    await rotated(runtime)
    [old, _] = current(runtime)
    assert old is not None

    [report] = await revoke(runtime, "a", replace=False)

    assert report.outcome == "revoked"
    [new, _] = current(runtime)
    assert new is not None and status_of(sim, new) == "active"  # never lose an issued token
    assert {t["fingerprint"] for t in sim.tokens("conn-a", kind="access", status="active")} == {
        new.tokens.access.fingerprint
    }


async def test_previous_version_only(make_runtime: Factory, sim: SimServer) -> None:
    sim.set(revoke_endpoint=True, issue_invalidates_previous=False)
    runtime = make_runtime(
        makini={"revoke_path": REVOKE_PATH, "issue_invalidates_previous": False},
        schedule={"interval": "1h", "grace_period": "1h"},
    )
    await rotated(runtime)
    [first, _] = current(runtime)
    await rotated(runtime)  # in its grace period: the first version is `previous`
    [cur, _] = current(runtime)
    prev = runtime.environments["prod"].primary.read("a", Stage.PREVIOUS)
    assert first is not None and cur is not None and prev is not None
    assert prev.version_id == first.version_id and status_of(sim, first) == "active"

    [report] = await revoke(runtime, "a", version="previous")

    assert report.outcome == "revoked", report
    assert report.replacement_version is None
    assert status_of(sim, first) == "revoked"
    assert not readable_anywhere(runtime, "a", first.version_id)
    [still, _] = current(runtime)
    assert still is not None and still.version_id == cur.version_id  # current untouched
    assert status_of(sim, still) == "active"
    # the rotation waiting for its grace period was superseded: nothing retires later
    assert runtime.journal.open_rotation("prod", "a") is None


def _snapshot(runtime: Runtime, sim: SimServer) -> dict[str, Any]:
    rt = runtime.environments["prod"]
    return {
        "tokens": sorted(json.dumps(t, sort_keys=True) for t in sim.tokens()),
        "calls": sim.stats()["total"],
        "backends": {
            b.name: {c.name: b.versions(c.name) for c in rt.settings.credentials}
            for b in rt.backends
        },
        "rotations": [(r.id, r.step, r.updated_at) for r in runtime.journal.rotations(limit=1000)],
        "audit": len(runtime.journal.audit_entries(limit=10000)),
        "states": {k: (v.attention, v.last_outcome) for k, v in runtime.journal.states().items()},
        "locks": runtime.journal.lock_holder("prod/a"),
    }


async def test_dry_run_changes_nothing(make_runtime: Factory, sim: SimServer) -> None:
    runtime = make_runtime(TWO)
    await rotated(runtime, "a", "b")
    before = _snapshot(runtime, sim)
    revoker = Revoker(runtime.engine)
    for req in (
        RevokeRequest("prod", all=True, reason="x", actor="t"),
        RevokeRequest("prod", ("a",), reason="x", actor="t", strategy="disconnect"),
        RevokeRequest("prod", ("b",), version="previous", reason="x", actor="t"),
    ):
        plans = await revoker.plan(req)
        assert plans
    assert _snapshot(runtime, sim) == before
    [a, b] = await revoker.plan(RevokeRequest("prod", all=True, reason="x", actor="t"))
    assert a.action == b.action == "revoke" and a.target_stage == "current"
    assert a.target_version == current(runtime, "a")[0].version_id  # type: ignore[union-attr]


async def test_revoke_from_api(make_runtime: Factory, sim: SimServer) -> None:
    from rotator.revoke import revoke_from_api

    runtime = make_runtime(TWO)
    await rotated(runtime, "a", "b")
    [old_a, _] = current(runtime, "a")
    assert old_a is not None
    common: dict[str, Any] = {
        "names": ["a"],
        "all_": False,
        "version": None,
        "no_replace": False,
        "reason": "api test",
        "actor": "admin-key:ops",
    }
    dry = await revoke_from_api(runtime, "prod", dry_run=True, **common)
    assert dry["ok"] and dry["dry_run"] and "results" not in dry
    assert status_of(sim, old_a) == "active" and not revoke_rows(runtime)

    out = await revoke_from_api(runtime, "prod", dry_run=False, **common)

    assert out["ok"] and [r["outcome"] for r in out["results"]] == ["revoked"]
    assert status_of(sim, old_a) == "revoked"
    [done] = runtime.journal.audit_entries(action="revoke.completed")
    assert done.actor == "admin-key:ops"
    json.dumps(out)  # serializable as it is


async def test_a_request_must_name_one_scope_and_a_reason(make_runtime: Factory) -> None:
    from rotator.errors import ConfigError, NotFound

    runtime = make_runtime(TWO)
    revoker = Revoker(runtime.engine)
    bad = [
        RevokeRequest("prod", reason="x", actor="t"),
        RevokeRequest("prod", ("a",), all=True, reason="x", actor="t"),
        RevokeRequest("prod", ("a",), reason="  ", actor="t"),
        RevokeRequest("prod", ("a",), reason="x", actor="t", strategy="nuke"),  # type: ignore[arg-type]
    ]
    for req in bad:
        with pytest.raises(ConfigError):
            await revoker.plan(req)
    with pytest.raises(NotFound):
        await revoker.plan(RevokeRequest("prod", ("zzz",), reason="x", actor="t"))
    with pytest.raises(NotFound):
        await revoker.plan(RevokeRequest("staging", ("a",), reason="x", actor="t"))
