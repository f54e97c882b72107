"""Tokens Makini may have issued that nobody holds (issue 14, items 3 and 4), with the real CLI
against the simulator:

* a request for a token in flight when the process is SIGKILLed: Makini issues it, nobody
  receives it; the resume reports it (where Makini keeps old tokens) or the next issue kills
  it (where issuing kills the connection's older tokens);
* an answer lost after Makini processed the request (a 502 or 504 from a gateway);
* a revoke that disconnects the connection resolves what was reported for it;
* retired pairs are revoked whole: after rotations, a connection holds its current access and
  refresh token live at Makini, and nothing else.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from rotator.makini.sim import SimServer
from rotator.model import StoredVersion, utcnow
from tests.e2e.rig import KILLED, MODES, A, B, Mode, Rig, fingerprints, values
from tests.wait import ISSUE_ROUTE, wait_until

pytestmark = pytest.mark.e2e


def _received(sim: SimServer, route: str) -> int:
    """Requests of ``route`` the simulator received (answered or not yet)."""
    return int(sim.stats()["received"].get(route, 0))


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _not_held(rig: Rig, name: str, *held: StoredVersion) -> list[dict[str, Any]]:
    """The connection's access tokens that no version in ``held`` holds (sim views)."""
    known = set().union(*(fingerprints(v) for v in held))
    tokens = rig.sim.tokens(rig.connection(name), kind="access")
    return [t for t in tokens if t["fingerprint"] not in known]


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_a_token_request_in_flight_at_a_sigkill(tmp_path: Path, sim: SimServer, mode: Mode) -> None:
    rig = Rig(tmp_path, sim, mode, ["a"])
    rig.ok("rotate", "prod", "a")
    first = rig.current("a")
    asked = _received(sim, ISSUE_ROUTE)
    sim.set(latency_ms=800)  # every Makini request takes 0.8 s
    started = utcnow()
    worker = rig.start("rotate", "prod", "a")
    # killed while Makini works on its request for a token, which Makini then completes
    wait_until("the request for a token", lambda: _received(sim, ISSUE_ROUTE) > asked)
    worker.kill()
    out, err = worker.communicate(timeout=30)
    rig.outputs.append(out + err)
    assert worker.returncode == KILLED
    wait_until("Makini to issue the token", lambda: _not_held(rig, "a", first) != [])
    sim.set(latency_ms=0)
    [lost] = _not_held(rig, "a", first)
    assert lost["status"] == "active"  # a live token of the connection that nobody holds
    rig.ok("run-due", "--env", "prod")  # it waits for the killed worker's lease itself

    current = rig.current("a")
    [entry] = rig.unaccounted(closed=True)
    assert entry["connection_id"] == "conn-a" and entry["credential"] == "a"
    assert started <= _at(entry["asked_at"]) <= _at(lost["issued_at"])
    assert "a token was issued that no backend holds" in entry["cause"]
    assert rig.status_at_makini(first.tokens.access.reveal()) != "active"
    if mode.invalidates:
        # the resume's issue killed the lost token: nothing left to report
        assert rig.sim.token(lost["fingerprint"])["status"] == "revoked"  # type: ignore[index]
        assert rig.live("a") == fingerprints(current)
        assert entry["status"] == "resolved" and "killed" in entry["resolution"]
        audit = rig.audit()
        actions = [e["action"] for e in audit if e["action"].startswith("token.")]
        assert actions == ["token.unaccounted_resolved", "token.unaccounted"]  # newest first
        code, rows = rig.status()
        assert code == 0 and rows["a"]["unaccounted"] == 0
    else:
        # Makini keeps it: reported, until it expires or a person deals with it
        assert entry["status"] == "open" and entry["fingerprint"] is None
        assert _at(entry["live_until"]) >= _at(lost["expires_at"])
        # alive at Makini besides the current pair: the lost pair (its access and refresh
        # token), nothing else (the retire revoked the first pair)
        extra = rig.live("a") - fingerprints(current)
        assert lost["fingerprint"] in extra and len(extra) == 2
        assert not extra & fingerprints(first)
        human = rig("status")
        assert human.returncode == 3
        assert "UNACCOUNTED TOKENS prod/a: 1 token(s) Makini may have issued" in human.stderr

        rig.ok(
            "unaccounted",
            "ack",
            "prod",
            str(entry["id"]),
            "--reason",
            "disconnected, INC-7",
            env={"USER": "ops-alice", "LOGNAME": "ops-alice"},
        )

        audit = rig.audit()
        [reported] = [e for e in audit if e["action"] == "token.unaccounted"]
        assert reported["detail"]["unaccounted_id"] == entry["id"]
        assert reported["detail"]["connection_id"] == "conn-a"
        [acked] = [e for e in audit if e["action"] == "token.unaccounted_acknowledged"]
        assert acked["actor"].startswith("ops-alice@")
        assert acked["detail"]["resolution"] == "disconnected, INC-7"
        [closed] = rig.unaccounted(closed=True)
        assert closed["status"] == "acknowledged" and closed["closed_by"] == acked["actor"]
        assert rig.status()[0] == 0
    rig.assert_no_token_leaked(values(first) | values(current))


@pytest.mark.parametrize(
    ("mode", "status"), [(B, 502), (A, 504)], ids=["B-502-then-disconnect", "A-504-then-issue"]
)
def test_an_answer_lost_after_makini_issued(
    tmp_path: Path, sim: SimServer, mode: Mode, status: int
) -> None:
    rig = Rig(tmp_path, sim, mode, ["a"])
    rig.ok("rotate", "prod", "a")
    first = rig.current("a")
    sim.set(fail_only=ISSUE_ROUTE, fail_next=[status])  # processed, then the answer is lost

    proc = rig("rotate", "prod", "a")

    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [lost] = _not_held(rig, "a", first)
    assert lost["status"] == "active"
    [entry] = rig.unaccounted()
    assert entry["connection_id"] == "conn-a" and entry["request_id"]
    assert str(status) in entry["cause"] and "may have issued a token" in entry["cause"]

    if mode.invalidates:
        # the next issue for the connection kills it
        rig.ok("rotate", "prod", "a")
        assert rig.sim.token(lost["fingerprint"])["status"] == "revoked"  # type: ignore[index]
        closed = "resolved"
    else:
        # a revoke that disconnects the connection kills every token of it, the lost one too
        rig.ok("revoke", "prod", "a", "--strategy", "disconnect", "--reason", "lost", "--yes")
        assert rig.live("a") == set()
        closed = "resolved"
    [entry] = rig.unaccounted(closed=True)
    assert entry["status"] == closed, entry
    code, rows = rig.status()
    assert rows["a"]["unaccounted"] == 0
    resolved = rig.audit("token.unaccounted_resolved")
    assert [e["detail"]["unaccounted_id"] for e in resolved] == [entry["id"]]
    if mode.invalidates:
        assert code == 0
    else:
        assert "disconnected" in entry["resolution"]
        assert "DISCONNECTED" in (rows["a"]["attention"] or "")  # that, and only that, remains


def test_retired_pairs_are_revoked_whole(tmp_path: Path, sim: SimServer) -> None:
    """Where Makini keeps old tokens and has a revocation path, each retire revokes the old
    access *and* refresh token: no connection ever holds more than its current pair live."""
    names = ["a", "b"]
    rig = Rig(tmp_path, sim, B, names)
    seen: dict[str, list[StoredVersion]] = {n: [] for n in names}
    for _ in range(4):
        rig.ok("rotate", "prod", *names)
        for name in names:
            current = rig.current(name)
            seen[name].append(current)
            assert current.tokens.refresh is not None
            assert rig.live(name) == fingerprints(current)
    for name in names:
        for old in seen[name][:-1]:
            assert {rig.status_at_makini(t) for t in values(old)} == {"revoked"}
    assert rig.unaccounted(closed=True) == []
    rig.assert_no_token_leaked(set().union(*(values(v) for n in names for v in seen[n])))
