"""The simulator's state file (``rotator makini-sim --state``, what ``make run`` uses): a
restarted simulator knows the connections and tokens it issued, the file is private and
rewritten whole, and one that does not parse is refused with what to do."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rotator.makini.sim import SimOptions, SimServer
from rotator.makini.sim.state import SimState
from rotator.model import fingerprint
from tests.makini.test_sim import CLIENTS, Api


def options() -> SimOptions:
    return SimOptions(clients=CLIENTS)


def test_a_restarted_simulator_knows_its_tokens(tmp_path: Path) -> None:
    path = tmp_path / "run" / "makini-sim.json"
    with SimServer(options(), state_path=path) as sim:
        api = Api(sim)
        old = api.pair("conn-kept")
        new = api.pair("conn-kept")  # kills the old one (issue_invalidates_previous)
        gone = api.pair("conn-gone")
        assert api.http.delete(
            "/api/system/connections/conn-gone", headers={"Authorization": f"Bearer {api.admin}"}
        ).status_code == 200
        api.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["makini-sim.json"]  # no temporary left

    with SimServer(options(), state_path=path) as sim:
        api = Api(sim)
        assert api.current(new["access_token"]).json()["data"]["id"] == "conn-kept"
        assert api.current(old["access_token"]).status_code == 401  # still dead
        assert api.current(gone["access_token"]).status_code == 401
        view = sim.token(fingerprint(new["access_token"]))
        assert view is not None and view["status"] == "active"
        views = {c["id"]: c["status"] for c in sim.connections()}
        assert views == {"conn-kept": "active", "conn-gone": "disconnected"}
        # the refresh token too: a refresh after the restart works
        refreshed = api.grant(grant_type="refresh_token", refresh_token=new["refresh_token"])
        assert refreshed.status_code == 200, refreshed.text
        api.close()


def test_without_a_state_file_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with SimServer(options()) as sim:
        api = Api(sim)
        api.pair("conn-mem")
        api.close()
    assert list(tmp_path.iterdir()) == []


def test_long_dead_tokens_are_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    state = SimState(options(), path=path)
    conn = state.add_connection("conn-a", "test-prod")
    pair = state.issue("test-prod", conn.id)
    state.options = state.options.model_copy(update={"clock_offset_s": 40 * 86400})  # expired
    state.save()
    again = SimState(options(), path=path)
    assert pair["access_token"] not in again.tokens and "conn-a" in again.connections


def test_a_state_file_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    path.write_text('{"version": 1, "connections": [{"id": 3}]')
    with pytest.raises(ValueError, match="move it away") as refused:
        SimState(options(), path=path)
    assert str(path) in str(refused.value)
