"""``run-due``'s forked workers: real processes and pipes. Most tests replace the rotation by a
function that reports, so that each shows one thing about the sharing; the last runs the real
one against the simulator, on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import structlog

from rotator import logs, signals
from rotator.errors import RotatorError
from rotator.makini.sim import SimServer
from rotator.rotation.work import RotationResult, Work
from rotator.rotation.workers import Shares, process_count, share_of, usable_cpus
from rotator.service import Stopper
from rotator.settings import Config, parse_config
from tests.core.conftest import Factory
from tests.wait import wait_until

WORK: list[Work] = [Work("prod", f"c{i}", "scheduled", forced=True) for i in range(7)]


def config(
    tmp_path: Path, concurrency: int = 32, makini: int = 32, drain: str = "20s"
) -> Config:
    return parse_config(
        {
            "journal": {"url": f"sqlite:///{tmp_path}/journal.db"},
            "scheduler": {"concurrency": concurrency, "processes": 2, "drain": drain},
            "environments": {
                "prod": {
                    "sealing_key": {"env": "UNUSED_SEAL"},
                    "makini": {
                        "client_id": "x",
                        "client_secret_env": "UNUSED_SECRET",
                        "max_concurrency": makini,
                    },
                    "backends": [{"type": "memory"}],
                    "credentials": [
                        {"name": w.credential, "connection_id": w.credential} for w in WORK
                    ],
                }
            },
        },
        source=tmp_path / "rotator.toml",
    )


Report = Callable[[RotationResult], None]


def report_pid(cfg: Config, share: Sequence[Work], report: Report) -> None:
    for w in share:
        env, name = w.environment, w.credential
        limits = f"{cfg.scheduler.concurrency} {cfg.environments[env].makini.max_concurrency}"
        detail = f"{os.getpid()} {limits}"
        report(RotationResult(env, name, "rotated", error=detail))


def test_every_item_is_rotated_once_and_comes_back_in_order(tmp_path: Path) -> None:
    seen: list[RotationResult] = []
    with Shares(config(tmp_path, concurrency=32, makini=5), WORK, 3, report_pid) as shares:
        results = shares.gather(seen.append)
    expected = [(w.environment, w.credential) for w in WORK]
    assert [(r.environment, r.credential) for r in results] == expected
    assert len(seen) == len(WORK) and {r.outcome for r in results} == {"rotated"}
    limits = {r.error.split()[0]: r.error.split()[1:] for r in results if r.error}
    assert len(limits) == 3 and str(os.getpid()) not in limits
    # each worker keeps to its share of the limits: together exactly what is configured
    assert sorted(limits.values()) == [["10", "1"], ["11", "2"], ["11", "2"]]


def test_the_shares_add_up_to_the_limits(tmp_path: Path) -> None:
    cfg = config(tmp_path, concurrency=32, makini=5)
    shares = [share_of(cfg, 3, i) for i in range(3)]
    assert sum(c.scheduler.concurrency for c in shares) == 32
    assert sum(c.environments["prod"].makini.max_concurrency for c in shares) == 5
    assert min(c.environments["prod"].makini.max_concurrency for c in shares) >= 1
    assert cfg.scheduler.concurrency == 32  # the original is left alone


def die_after_one(_cfg: Config, share: Sequence[Work], report: Report) -> None:
    env, name = share[0].environment, share[0].credential
    report(RotationResult(env, name, "rotated"))
    if name == "c1":  # the second worker's first item
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "c0":
        sys.exit(3)
    for w in share[1:]:
        report(RotationResult(w.environment, w.credential, "rotated"))


def test_work_a_worker_did_not_report_is_failed_with_how_it_ended(tmp_path: Path) -> None:
    with Shares(config(tmp_path), WORK, 3, die_after_one) as shares:
        results = {r.credential: r for r in shares.gather(None)}
    assert {n for n, r in results.items() if r.outcome == "rotated"} == {"c0", "c1", "c2", "c5"}
    assert "exit code 3" in (results["c3"].error or "")  # c0, c3, c6: the first share
    assert "signal 9" in (results["c4"].error or "")  # c1, c4: the second
    for name in ("c3", "c6", "c4"):
        assert results[name].outcome == "failed"
        assert "run-due` resumes" in (results[name].error or "")


def record_pid_then_wait(cfg: Config, _share: Sequence[Work], _report: Report) -> None:
    """A worker that never gets to drain: told to stop, it stops as a real run would."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # kept pending, for sigwait
    (cfg.base_dir / f"worker-{os.getpid()}").touch()
    signal.sigwait({signal.SIGTERM})


def test_leaving_early_stops_the_workers(tmp_path: Path) -> None:
    started = time.monotonic()
    with Shares(config(tmp_path), WORK, 2, record_pid_then_wait):
        wait_until("both workers", lambda: len(list(tmp_path.glob("worker-*"))) == 2)
    for path in tmp_path.glob("worker-*"):
        with pytest.raises(ProcessLookupError):  # stopped and reaped
            os.kill(int(path.name.removeprefix("worker-")), 0)
    assert time.monotonic() - started < 10


def test_how_many_processes() -> None:
    assert process_count(1, 5000, 32) == 1
    assert process_count(4, 1000, 32) == 4
    assert process_count(4, 3, 32) == 3  # never a worker without work
    assert process_count(4, 1000, 2) == 2  # nor one without a share of every limit
    assert process_count("auto", 150, 32) == 1  # too little to be worth a fork
    assert process_count("auto", 100_000, 32) == min(usable_cpus(), 4)


def test_auto_forks_at_most_four_whatever_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    # a pod without a CPU limit sees its node's 64 CPUs: 64 workers would not fit its memory
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert usable_cpus(Path("/nonexistent/cpu.max")) == 64
    monkeypatch.setattr("rotator.rotation.workers.usable_cpus", lambda: 64)
    assert process_count("auto", 100_000, 32) == 4
    assert process_count(8, 100_000, 32) == 8  # a number is taken as it is


def test_a_container_cpu_limit_caps_the_count(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two processes
    assert usable_cpus(cpu_max) == min(affinity, 2)
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    cpu_max.write_text("garbage")
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_a_log_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # workers share stderr: a line written in two pieces can be split by another's line
    stream = Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("info", "json")
    try:
        structlog.get_logger("test").info("one.line", n=1)
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert len(stream.calls) == 1
    assert json.loads(stream.calls[0])["event"] == "one.line"


def test_a_refused_fork_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_self: object, _process: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    # the system refuses a process: nothing the test can make a real kernel do on demand
    monkeypatch.setattr("multiprocessing.popen_fork.Popen._launch", refuse)
    with pytest.raises(RotatorError) as info, Shares(config(tmp_path), WORK, 2, report_pid):
        pass
    text = info.value.describe()
    assert "worker processes" in text and "scheduler.processes = 1" in text


async def test_workers_rotate_on_either_journal(
    make_runtime: Factory, journal_url: str, sim: SimServer
) -> None:
    # what `rotator run-due` forks, on SQLite (turns on the lock file) and on PostgreSQL: each
    # worker opens its own journal engine, backends and Makini client after the fork
    from rotator.cli.rotating import rotate_share
    from rotator.service import due_work

    names = [f"w{i}" for i in range(6)]
    runtime = make_runtime(
        [{"name": n, "connection_id": f"conn-{n}"} for n in names],
        journal_url=journal_url,
        backends=[{"type": "file", "path": "files", "key": {"file": "file.key", "generate": True}}],
    )
    work = await due_work(runtime)
    with Shares(runtime.config, work, 3, rotate_share(None)) as shares:
        results = shares.gather(None)
    assert {r.outcome for r in results} == {"rotated"}, results
    states = runtime.journal.states("prod")
    for result in results:
        stored = runtime.environments["prod"].backends[0].read(result.credential)
        assert stored is not None and stored.version_id == result.version_id
        assert states[("prod", result.credential)].current_version_id == result.version_id
        live = sim.tokens(f"conn-{result.credential}", kind="access", status="active")
        assert [t["fingerprint"] for t in live] == [stored.tokens.access.fingerprint]


def record_pid_then_hang(cfg: Config, _share: Sequence[Work], _report: Report) -> None:
    (cfg.base_dir / f"worker-{os.getpid()}").touch()
    while True:  # stuck (a journal that never answers): it cannot drain
        signal.pause()


def test_a_worker_that_cannot_drain_is_killed_after_the_drain(tmp_path: Path) -> None:
    with Shares(config(tmp_path, drain="0s"), WORK, 2, record_pid_then_hang):
        wait_until("both workers", lambda: len(list(tmp_path.glob("worker-*"))) == 2)
        left = time.monotonic()
    # SIGTERM first, then, the drain (0 s here) and 5 s later, SIGKILL: not the 600 s it would
    # otherwise take
    assert time.monotonic() - left < 60
    for path in tmp_path.glob("worker-*"):
        with pytest.raises(ProcessLookupError):  # killed and reaped
            os.kill(int(path.name.removeprefix("worker-")), 0)


async def test_a_stop_signal_before_the_drain_is_ready_is_kept_for_it(
    make_runtime: Factory,
) -> None:
    # a run-due worker is told to stop while it still opens its runtime: the signal is kept
    # (it used to kill the worker, whose share the run then reported as lost, exiting 1)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signals.hold(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        runtime = make_runtime()
        async with Stopper(runtime, 1) as stopper:
            assert stopper.signalled == signal.SIGTERM
            result = await runtime.engine.rotate("prod", "a", actor="test", reason="test")
        assert result.outcome == "parked"
        assert signals.take() is None  # taken once
    finally:
        signal.signal(signal.SIGTERM, previous)
