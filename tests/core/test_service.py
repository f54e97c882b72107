"""The scheduler's decision of what is due reads the clock it is given: time is moved, not
waited for."""

from __future__ import annotations

from pathlib import Path

from rotator.makini.sim import SimServer
from rotator.rotation.runtime import Runtime
from rotator.service import due_work, run_due_once
from tests.clock import FakeClock
from tests.factories import Runtimes, credentials, environment, make_config


def hourly(tmp_path: Path, sim: SimServer, runtimes: Runtimes) -> Runtime:
    envs = {
        "prod": environment(
            sim.url,
            "test-prod",
            credentials("a", "b"),
            sealing_env="SEAL_prod",
            schedule={"interval": "1h", "grace_period": "0s"},
        )
    }
    return runtimes.open(make_config(tmp_path, f"sqlite:///{tmp_path / 'journal.db'}", envs))


async def test_what_is_due_follows_the_clock_it_is_given(
    tmp_path: Path, sim: SimServer, runtimes: Runtimes
) -> None:
    runtime = hourly(tmp_path, sim, runtimes)
    clock = FakeClock()
    first = await run_due_once(runtime, clock=clock)
    assert sorted((r.credential, r.outcome) for r in first) == [("a", "rotated"), ("b", "rotated")]
    assert await due_work(runtime, clock=clock) == []

    clock.advance(30 * 60)
    assert await due_work(runtime, clock=clock) == []
    clock.advance(31 * 60)
    due = await due_work(runtime, clock=clock)
    assert sorted(w.credential for w in due) == ["a", "b"]


async def test_an_environment_left_out_is_not_planned(
    tmp_path: Path, sim: SimServer, runtimes: Runtimes
) -> None:
    runtime = hourly(tmp_path, sim, runtimes)
    assert await due_work(runtime, ["dev"], clock=FakeClock()) == []
    assert len(await due_work(runtime, ["prod"], clock=FakeClock())) == 2
