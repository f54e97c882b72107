"""SIGTERM and Ctrl-C: ``serve`` and ``make run`` drain, give their leases back, exit 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.makini.sim import SimServer
from tests.cli import RotatorCli
from tests.factories import config_toml, environment_table, file_backend
from tests.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_cli(tmp_path: Path, sim: SimServer, *, drain: str, count: int) -> RotatorCli:
    prod = environment_table(
        sim.url,
        "test-prod",
        [{"name": f"c{i}", "connection_id": f"conn-drain-{i}"} for i in range(count)],
        sealing_env="DRAIN_SEAL",
        secret_env="DRAIN_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
        retry=None,
    )
    text = config_toml(
        {"url": "sqlite:///journal.db", "lock_ttl": "1h"},
        {"prod": prod},
        scheduler={"tick": "1s", "drain": drain},
    )
    env = {"DRAIN_SEAL": generate_key(), "DRAIN_SECRET": "test-prod-secret"}
    return RotatorCli(tmp_path, text, env)


def make_run(tmp_path: Path, **popen: Any) -> tuple[subprocess.Popen[str], int, int]:
    """`make run` (rotator.devrun) on a copy of config/local.toml with ports of its own:
    (the process, the simulator's port, the API's port)."""
    sim_port, api_port = free_port(), free_port()
    config = tmp_path / "config" / "local.toml"
    config.parent.mkdir()
    config.write_text((REPO / "config" / "local.toml").read_text().replace("8765", str(sim_port)))
    env = {
        **os.environ,
        "ROTATOR_DEV_CONFIG": str(config),
        "ROTATOR_DEV_SIM_PORT": str(sim_port),
        "ROTATOR_DEV_API_PORT": str(api_port),
    }
    proc: subprocess.Popen[str] = subprocess.Popen(
        [sys.executable, "-m", "rotator.devrun"], env=env, cwd=tmp_path, text=True, **popen
    )
    return proc, sim_port, api_port


def listening(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_drains_on_a_signal_and_gives_its_leases_back(
    tmp_path: Path, sim: SimServer, sig: signal.Signals
) -> None:
    # before, SIGTERM killed serve with -15 before its drain (uvicorn re-raised the signal),
    # and Ctrl-C printed an APScheduler job's CancelledError traceback
    sim.set(latency_ms=300)
    cli = serve_cli(tmp_path, sim, drain="10s", count=6)
    port = free_port()
    proc = cli.start("--log-format", "json", "serve", "--port", str(port))
    wait_until("serve", lambda: listening(port))
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}", migrate="off")
    try:
        wait_until("a rotation in flight", lambda: len(sim.tokens(kind="access")) >= 1)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "CancelledError" not in stderr
        events = re.findall(r'"event": "([a-z_.]+)"', stderr)
        assert {"stopping", "serve.stopping", "serve.stopped"} <= set(events), events
        assert events.index("stopping") < events.index("serve.stopped")
        assert journal.locks() == []  # every lease given back at once
        # what was in flight finished: no rotation is left half-way
        assert [r.step for r in journal.open_rotations()] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        journal.close()
    sim.set(latency_ms=0)
    done = cli("run-due", "--json")  # at once: no lease to wait for (lock_ttl is 1h)
    assert done.returncode == 0, done.stderr
    status = cli("status")
    assert status.returncode == 0, status.stderr


def test_a_second_signal_cuts_the_drain_short(tmp_path: Path, sim: SimServer) -> None:
    sim.set(latency_ms=3000)  # each call takes 3 s: the drain would wait
    cli = serve_cli(tmp_path, sim, drain="30s", count=2)
    port = free_port()
    proc = cli.start("--log-format", "json", "serve", "--port", str(port))
    wait_until("serve", lambda: listening(port))
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}", migrate="off")
    try:
        wait_until("a drive in flight", lambda: journal.locks() != [], timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        for line in proc.stderr:  # the first signal has started the drain
            if '"event": "stopping"' in line:
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10  # not the 30 s drain, nor a Makini call's 3 s x N
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "stopping.now" in stderr
        assert journal.locks() == []
    finally:
        if proc.poll() is None:
            proc.kill()
        journal.close()
    sim.set(latency_ms=0)
    done = cli("run-due", "--json")
    assert done.returncode == 0, done.stderr


def test_ctrl_c_on_make_run_stops_both_without_a_traceback(
    tmp_path: Path, sim_server: SimServer
) -> None:
    # `make run`'s Ctrl-C reaches the whole terminal group. Before: about 60 lines of an
    # APScheduler job's CancelledError, and a rotation left open.
    proc, sim_port, _ = make_run(
        tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    try:
        journal_path = tmp_path / ".run" / "journal.db"

        def rotated() -> bool:
            try:
                http = httpx.get(f"http://127.0.0.1:{sim_port}/_sim/tokens", timeout=1)
            except httpx.HTTPError:
                return False
            return len(http.json()) >= 4

        wait_until("the first rotations", rotated, timeout_s=60)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "CancelledError" not in output, output[-3000:]
    assert output.rstrip().endswith("stopped")
    journal = Journal(f"sqlite:///{journal_path}", migrate="off")
    try:
        assert journal.locks() == []
        assert [r.step for r in journal.open_rotations()] == []
    finally:
        journal.close()


def test_serve_drains_and_exits_even_when_its_stderr_is_gone(
    tmp_path: Path, sim: SimServer
) -> None:
    # whatever read serve's output died (make run killed hard): writing the "stopping" log
    # line raised BrokenPipeError inside the signal handler, the drain never started, and
    # serve kept running, holding its port, for ever
    cli = serve_cli(tmp_path, sim, drain="5s", count=2)
    port = free_port()
    proc = subprocess.Popen(
        cli.argv("serve", "--port", str(port)),
        env=cli.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until("serve", lambda: listening(port))
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_make_run_killed_hard_takes_its_children_with_it(
    tmp_path: Path, sim_server: SimServer
) -> None:
    # a kill -9 of make run used to leave serve and the simulator running, holding the ports
    proc, sim_port, api_port = make_run(
        tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until("make run", lambda: listening(api_port), timeout_s=60)
        proc.kill()
        proc.wait()
        wait_until("serve to stop", lambda: not listening(api_port), timeout_s=30)
        wait_until(
            "the simulator to stop",
            lambda: not _answers(f"http://127.0.0.1:{sim_port}/_sim/stats"),
            timeout_s=30,
        )
    finally:
        if proc.poll() is None:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_sigusr1_shows_where_serve_waits_and_serve_carries_on(
    tmp_path: Path, sim: SimServer
) -> None:
    # a serve that does not stop must say what it waits for (the fleet harness asks before it
    # kills one): the threads, and the asyncio tasks, where the hang at shutdown was
    cli = serve_cli(tmp_path, sim, drain="5s", count=1)
    port = free_port()
    log = tmp_path / "serve.err"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cli.argv("serve", "--port", str(port)),
            env=cli.env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_until("serve", lambda: listening(port))
        proc.send_signal(signal.SIGUSR1)
        wait_until("the stacks", lambda: "asyncio:" in log.read_text(), timeout_s=10)
        text = log.read_text()
        assert "Current thread" in text and "Thread 0x" in text  # faulthandler: every thread
        assert re.search(r"Stack for <Task .*\n.*File .*", text)  # every task, with its frames
        assert "serve" in text and "Traceback" not in text
        assert listening(port)  # it carries on
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
