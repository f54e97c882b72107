"""End to end: the ``rotator`` command as a subprocess against the simulator over a socket,
with the file backend. Crash tests SIGKILL the process right after each journaled step."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.model import fingerprint
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend
from tests.wait import wait_until

pytestmark = pytest.mark.e2e


class Rotator(RotatorCli):
    """Two environments: ``prod`` (credentials ``a`` and ``b``) and ``dev`` (``a``), each with a
    file backend; ``makini`` is added to prod's Makini table, ``top`` to the configuration."""

    def __init__(
        self, tmp_path: Path, sim: SimServer, makini: dict[str, Any] | None = None, **top: Any
    ) -> None:
        prod = environment_table(
            sim.url,
            "test-prod",
            credentials("a", "b", connection="conn-e2e-{name}"),
            sealing_env="E2E_PROD_SEAL",
            secret_env="E2E_PROD_SECRET",
            backends=[file_backend("files/prod", "keys/prod-file.key")],
            retry=SHORT_RETRY,
            makini={"timeout_s": 3, **(makini or {})},
        )
        dev = environment_table(
            sim.url,
            "test-dev",
            credentials("a", connection="conn-e2e-dev-{name}"),
            sealing_env="E2E_DEV_SEAL",
            secret_env="E2E_DEV_SECRET",
            backends=[file_backend("files/dev", "keys/dev-file.key")],
            retry=None,
            schedule=None,
        )
        super().__init__(
            tmp_path,
            config_toml(
                {"url": "sqlite:///journal.db", "lock_ttl": "1s"},
                {"prod": prod, "dev": dev},
                **top,
            ),
            {
                "E2E_PROD_SEAL": generate_key(),
                "E2E_DEV_SEAL": generate_key(),
                "E2E_PROD_SECRET": "test-prod-secret",
                "E2E_DEV_SECRET": "test-dev-secret",
            },
        )

    def token(self, env: str, name: str) -> str:
        proc = self("get", env, name)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def status(self) -> list[dict[str, Any]]:
        proc = self("status", "--json")
        rows: list[dict[str, Any]] = json.loads(proc.stdout)
        return rows


def active(sim: SimServer, connection: str) -> set[str]:
    return {t["fingerprint"] for t in sim.tokens(connection, kind="access", status="active")}


def test_rotate_get_status_and_audit(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    proc = rotator("rotate", "prod", "a", "b", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {r["outcome"] for r in json.loads(proc.stdout)} == {"rotated"}
    token = rotator.token("prod", "a")
    view = sim.token(fingerprint(token))
    assert view is not None
    assert view["status"] == "active" and view["connection_id"] == "conn-e2e-a"
    rows = {(r["environment"], r["credential"]): r for r in rotator.status()}
    assert rows[("prod", "a")]["backends_agree"] and rows[("prod", "a")]["current_version"]
    assert rows[("dev", "a")]["current_version"] is None
    audit = json.loads(rotator("audit", "--json").stdout)
    assert {e["action"] for e in audit} == {"rotation.started", "rotation.promoted"}
    # each rotation's start names who started it, whoever finishes it
    started = [e for e in audit if e["action"] == "rotation.started"]
    assert len(started) == 2 and all("@" in e["actor"] for e in started)
    # the token never shows up anywhere but `get`, and the files hold it encrypted
    for text in rotator.outputs:
        assert token not in text
    for path in (tmp_path / "files").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes()
    assert token.encode() not in (tmp_path / "journal.db").read_bytes()


@pytest.mark.parametrize("invalidates", [True, False], ids=["issue-invalidates", "issue-keeps"])
@pytest.mark.parametrize("step", ["issued", "staged", "verified", "promoted"])
def test_sigkill_after_each_step_then_run_due_completes(
    tmp_path: Path, sim: SimServer, step: str, invalidates: bool
) -> None:
    sim.set(issue_invalidates_previous=invalidates)
    rotator = Rotator(tmp_path, sim, {"issue_invalidates_previous": invalidates})
    assert rotator("rotate", "prod", "a").returncode == 0
    first = rotator.token("prod", "a")

    killed = rotator("rotate", "prod", "a", env={"ROTATOR_FAULT_KILL_AFTER": f"{step}:a"})
    assert killed.returncode == -signal.SIGKILL

    plan = json.loads(rotator("plan", "--json").stdout)
    item = next(i for i in plan if i["environment"] == "prod" and i["credential"] == "a")
    assert item["action"] in ("resume", "retire")

    done = rotator("run-due", "--env", "prod", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    token = rotator.token("prod", "a")
    assert token != first
    view = sim.token(fingerprint(token))
    assert view is not None
    assert view["status"] == "active" and view["connection_id"] == "conn-e2e-a"
    # nothing lost or orphaned: Makini's live tokens are the stored one, plus (where Makini
    # keeps old tokens alive) the old one, which the audit log reports as still valid
    expected = {fingerprint(token)}
    if not invalidates:
        expected.add(fingerprint(first))
        retired = json.loads(rotator("audit", "--action", "rotation.retired", "--json").stdout)
        assert retired[0]["fingerprint"] == fingerprint(first)
    assert active(sim, "conn-e2e-a") == expected
    row = next(r for r in rotator.status() if r["environment"] == "prod" and r["credential"] == "a")
    assert row["open_step"] is None and row["backends_agree"]
    for text in rotator.outputs:
        assert token not in text and first not in text


def test_run_due_in_worker_processes_and_one_killed(tmp_path: Path, sim: SimServer) -> None:
    # scheduler.processes = 2: run-due forks two workers. The one driving prod/b is SIGKILLed
    # after Makini issued its token: the run reports b failed and exits non-zero, the others
    # are rotated; the next run completes b with nothing lost or orphaned.
    rotator = Rotator(tmp_path, sim, scheduler={"processes": 2})
    logged = ("--log-format", "json", "--log-level", "info")
    first = rotator(*logged, "run-due", "--json", env={"ROTATOR_FAULT_KILL_AFTER": "issued:b"})
    assert first.returncode == 1, first.stderr
    outcomes = {(r["environment"], r["credential"]): r for r in json.loads(first.stdout)}
    assert {k: r["outcome"] for k, r in outcomes.items()} == {
        ("prod", "a"): "rotated",
        ("prod", "b"): "failed",
        ("dev", "a"): "rotated",
    }
    assert "signal 9" in outcomes[("prod", "b")]["error"]
    events = [json.loads(line) for line in first.stderr.splitlines()]  # whole lines, each
    assert [e["processes"] for e in events if e["event"] == "run_due.processes"] == [2]
    assert sorted(e["due"] for e in events if e["event"] == "run_due.start") == [1, 2]

    second = rotator(*logged, "run-due", "--json")  # it waits for the killed worker's lease
    assert second.returncode == 0, second.stderr
    assert [(r["credential"], r["outcome"]) for r in json.loads(second.stdout)] == [
        ("b", "rotated")
    ]
    # the token issued before the kill waited, sealed in the journal, and is the one stored
    assert len(sim.tokens("conn-e2e-b", kind="access")) == 1
    for env, name, conn in [("prod", "a", "a"), ("prod", "b", "b"), ("dev", "a", "dev-a")]:
        token = rotator.token(env, name)
        assert active(sim, f"conn-e2e-{conn}") == {fingerprint(token)}
        for text in rotator.outputs:
            assert token not in text


def test_sigterm_to_run_due_drains_its_workers(tmp_path: Path, sim: SimServer) -> None:
    # Kubernetes stops a CronJob's pod with SIGTERM to the parent: it passes it on, each worker
    # stops taking work, gives what is in flight the drain (1 s here, shorter than the calls)
    # and parks the rest at its last journaled step, gives its leases back at once; the run
    # reports, exits 0, and the next run completes the work without waiting for a lease.
    sim.set(latency_ms=1000)  # each Makini call takes a second: the run is mid-way when stopped
    rotator = Rotator(tmp_path, sim, scheduler={"processes": 2, "drain": "1s"})
    config = rotator.config.read_text()
    rotator.config.write_text(config.replace('lock_ttl = "1s"', 'lock_ttl = "1h"'))
    proc = rotator.start("--log-level", "info", "run-due", "--json")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    def forked() -> list[int]:
        found = [int(p) for p in children.read_text().split()] if children.exists() else []
        return found if len(found) == 2 else []

    workers: list[int] = wait_until("run-due's two workers", forked, timeout_s=10)
    # a worker may still be opening its runtime: the signal is kept for its drain (parked)
    wait_until("the workers' first Makini calls", sim.inflight)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "stopping" in stderr
    outcomes = {(r["environment"], r["credential"]): r["outcome"] for r in json.loads(stdout)}
    assert set(outcomes.values()) <= {"rotated", "parked"} and "parked" in outcomes.values()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()  # stopped, and reaped by the parent

    sim.set(latency_ms=0)
    done = rotator("run-due", "--json")  # at once: the leases were given back (lock_ttl is 1h)
    assert done.returncode == 0, done.stderr
    assert {r["outcome"] for r in json.loads(done.stdout)} == {"rotated"}
    for env, name, conn in [("prod", "a", "a"), ("prod", "b", "b"), ("dev", "a", "dev-a")]:
        assert active(sim, f"conn-e2e-{conn}") == {fingerprint(rotator.token(env, name))}


def test_user_errors_are_one_clear_message(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    cases = [
        (("rotate", "staging", "a"), "no environment named 'staging'"),
        (("rotate", "prod", "zzz"), "has no credential 'zzz'"),
        (("get", "prod", "a"), "has no current token"),
        (("--config", str(tmp_path / "missing.toml"), "status"), "does not exist"),
    ]
    for args, expected in cases:
        proc = rotator(*args)
        assert proc.returncode != 0
        assert expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(rotator.config.read_text().replace('connection_id = "conn-e2e-b"', ""))
    proc = rotator("config", "check", str(bad))
    assert proc.returncode == 2 and "environments.prod.credentials[1].connection_id" in proc.stderr
    proc = rotator("rotate", "prod", "a", env={"E2E_PROD_SECRET": ""})
    assert proc.returncode != 0 and "E2E_PROD_SECRET is not set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_key_on_the_file_backend_is_clear_and_loses_nothing(
    tmp_path: Path, sim: SimServer
) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a").returncode == 0
    token = rotator.token("prod", "a")
    key = tmp_path / "keys" / "prod-file.key"
    original = key.read_text()
    key.write_text(generate_key() + "\n")
    proc = rotator("get", "prod", "a")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "key" in proc.stderr
    proc = rotator("rotate", "prod", "a")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    key.write_text(original)
    # the failed rotation left the stored token intact and the rotation resumable
    assert rotator("run-due", "--env", "prod").returncode == 0
    assert sim.token(fingerprint(rotator.token("prod", "a")))["status"] == "active"  # type: ignore[index]
    assert token  # the old one was the only thing at stake; it was never half-written


def test_makini_down_is_clear(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    sim.set(outage_s=30)
    proc = rotator("rotate", "prod", "a")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "503" in proc.stdout + proc.stderr or "unavailable" in (proc.stdout + proc.stderr).lower()
    )
    sim.set(outage_until=None, garbage=True)
    proc = rotator("rotate", "prod", "a")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_serve_on_a_port_in_use_says_so(tmp_path: Path, sim: SimServer) -> None:
    import socket

    rotator = Rotator(tmp_path, sim)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = rotator("serve", "--port", str(port))
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing was rotated: serve stops before its scheduler starts
    assert sim.tokens("conn-e2e-a") == []


def test_every_command_the_readme_names_exists() -> None:
    # an import that registers commands was once dropped by an automatic fix: sync and doctor
    # vanished from the CLI while the README still listed them
    import re

    from typer.main import get_command

    from rotator.cli.app import app

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    named = set(re.findall(r"^\| `rotator ([a-z-]+(?: [a-z]+)?)", readme, flags=re.M))
    assert {"serve", "run-due", "sync", "doctor"} <= {n.split()[0] for n in named}
    root = get_command(app)
    for name in sorted(named):
        group, _, sub = name.partition(" ")
        command = root.commands.get(group)  # type: ignore[attr-defined]
        assert command is not None, f"README names `rotator {group}`, the CLI has none"
        if sub and hasattr(command, "commands"):
            assert sub in command.commands, f"README names `rotator {name}`, the CLI has none"


def test_status_names_a_credential_whose_lease_holder_stopped_and_the_next_run_resumes(
    tmp_path: Path, sim: SimServer
) -> None:
    # a rotate killed mid-drive holds its lease until it expires: meanwhile status says so and
    # exits 3 (before, it exited 0 with no attention and run-due reported "busy")
    rotator = Rotator(tmp_path, sim)
    config = rotator.config.read_text()
    # long enough that the leases are still live when run-due starts on a loaded machine
    # (at 3 s, a start that took longer found them expired and never waited)
    rotator.config.write_text(config.replace('lock_ttl = "1s"', 'lock_ttl = "8s"'))
    killed = rotator("rotate", "prod", "a", env={"ROTATOR_FAULT_KILL_AFTER": "issued:a"})
    assert killed.returncode == -signal.SIGKILL
    # once the dead holder has missed its heartbeats (well before its 3 s lease expires)
    stalled = wait_until(
        "status to name the stalled lease",
        lambda: next((p for p in [rotator("status", "prod")] if "STALLED" in p.stderr), None),
    )
    assert stalled.returncode == 3, stalled.stderr
    assert "prod/a" in stalled.stderr
    resumed = rotator("run-due", "--json")  # it waits for the dead holder's lease itself
    assert resumed.returncode == 0, resumed.stderr
    outcomes = {
        (r["environment"], r["credential"]): r["outcome"] for r in json.loads(resumed.stdout)
    }
    assert outcomes[("prod", "a")] == "rotated"
    healthy = rotator("status")
    assert healthy.returncode == 0, healthy.stderr
    assert "STALLED" not in healthy.stderr


def test_a_run_right_after_a_crash_resumes_its_rotations_instead_of_calling_them_busy(
    tmp_path: Path, sim: SimServer
) -> None:
    # a CronJob's retry pod starts at once after the killed one: before, it found the leases
    # still live, reported the credentials "busy", exited 0, and left them (serving a token
    # Makini had killed) until the next scheduled run
    rotator = Rotator(tmp_path, sim)
    config = rotator.config.read_text()
    # long enough that the leases are still live when run-due starts on a loaded machine
    # (at 3 s, a start that took longer found them expired and never waited)
    rotator.config.write_text(config.replace('lock_ttl = "1s"', 'lock_ttl = "8s"'))
    killed = rotator("rotate", "prod", "a", "b", env={"ROTATOR_FAULT_KILL_AFTER": "issued"})
    assert killed.returncode == -signal.SIGKILL
    resumed = rotator("--log-level", "info", "run-due", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "run_due.waiting_for_leases" in resumed.stderr  # it waited for the killed run's
    outcomes = {
        (r["environment"], r["credential"]): r["outcome"] for r in json.loads(resumed.stdout)
    }
    assert outcomes[("prod", "a")] == "rotated", outcomes
    for name, conn in (("a", "a"), ("b", "b")):
        assert active(sim, f"conn-e2e-{conn}") == {fingerprint(rotator.token("prod", name))}
