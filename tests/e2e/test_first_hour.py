"""The operator's first hour, as the README tells it: `make run` in one shell, the README's
commands in a second shell with nothing exported (no secret typed, no variable set), a
restarted `make run` that still knows its tokens, and a command that cannot read a secret
failing before it starts anything."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from rotator.journal import Journal
from rotator.makini.sim import SimServer
from rotator.model import fingerprint
from tests.cli import RotatorCli
from tests.e2e.test_drain import REPO, listening, make_run
from tests.factories import config_toml, environment_table, file_backend
from tests.wait import wait_until


def second_shell(
    tmp_path: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A README command in a fresh shell: the machine's PATH and HOME, nothing else (no
    MAKINI_*, no ROTATOR_*), from the checkout's folder, on the README's configuration."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "rotator", "-c", "config/local.toml", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        input=stdin,
    )


def stop(proc: subprocess.Popen[str]) -> str:
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in make run's terminal
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output[-3000:]
    return output


def current_token(tmp_path: Path, env: str, name: str) -> str | None:
    proc = second_shell(tmp_path, "get", env, name)
    return proc.stdout.strip() if proc.returncode == 0 else None


def readme_blocks(after: str, count: int) -> list[list[str]]:
    """The first ``count`` ``sh`` blocks of the README after the heading ``after``: each a
    list of its command lines."""
    text = (REPO / "README.md").read_text()
    text = text[text.index(after):]
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)[:count]
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def in_second_shell(tmp_path: Path, line: str, sim_port: int) -> subprocess.CompletedProcess[str]:
    """README lines, run by bash as written, but for the test's own ports and venv."""
    line = line.replace("localhost:8765", f"localhost:{sim_port}")
    line = line.replace(".venv/bin/rotator", f"{sys.executable} -m rotator")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "COLUMNS": "200"}
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", line], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=90,
    )


def test_the_readme_second_shell_works_and_a_restart_keeps_the_tokens(tmp_path: Path) -> None:
    shell, importing = readme_blocks("### The second shell", 2)
    assert len(shell) >= 6 and any(" import prod " in line for line in importing)
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "start_new_session": True}
    proc, sim_port, api_port = make_run(tmp_path, **popen)
    sim_url = f"http://127.0.0.1:{sim_port}"
    try:
        wait_until("make run", lambda: listening(api_port), timeout_s=60)
        run = tmp_path / ".run"
        for name in ("makini-prod-client", "makini-dev-client"):
            secret = run / "secrets" / name
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
            assert len(secret.read_text().strip()) >= 32
        assert stat.S_IMODE((run / "secrets").stat().st_mode) == 0o700
        # the API's port and its docs, as the README names them
        assert httpx.get(f"http://127.0.0.1:{api_port}/docs", timeout=5).status_code == 200
        wait_until(
            "serve's first tokens",
            lambda: httpx.get(
                f"{sim_url}/_sim/tokens", params={"connection_id": "conn-acme-maximo"}, timeout=2
            ).json(),
            timeout_s=90,
        )
        for line in [*shell, "\n".join(importing)]:  # the import block shares a variable
            done = in_second_shell(tmp_path, line, sim_port)
            allowed = (0, 3) if " status" in line else (0,)  # 3: something needs a look
            assert done.returncode in allowed, (line, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr and "is not set" not in done.stderr, line
            if " get prod acme-sap" in line:
                assert done.stdout.strip().startswith("eyJ"), line  # a token, JWT-shaped
            if " import prod globex-fiix" in line:
                assert "imported prod/globex-fiix as version" in done.stdout, done.stdout

        audit = second_shell(tmp_path, "audit", "--json", "--limit", "1000")
        entries = json.loads(audit.stdout)
        started = [e for e in entries if e["action"] == "rotation.started"
                   and e["credential"] == "acme-sap" and e["detail"].get("reason") == "manual"]
        assert started and "@" in started[0]["actor"]  # who started the README's rotate
        actions = {(e["action"], e["credential"]) for e in entries}
        assert ("revoke.completed", "acme-maximo") in actions
        assert ("credential.imported", "globex-fiix") in actions
        held = current_token(tmp_path, "prod", "acme-sap")
        assert held is not None
        stop(proc)

        # the simulator kept its state under .run/: restarted, it still knows the token the
        # journal and the backends hold
        state = run / "makini-sim.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        proc, sim_port, api_port = make_run_again(tmp_path, sim_port, api_port, popen)
        wait_until("make run again", lambda: listening(api_port), timeout_s=60)
        known = httpx.get(f"{sim_url}/_sim/tokens/{fingerprint(held)}", timeout=5)
        assert known.status_code == 200, known.text
        assert known.json()["connection_id"] == "conn-acme-sap"
        stop(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def make_run_again(
    tmp_path: Path, sim_port: int, api_port: int, popen: dict[str, object]
) -> tuple[subprocess.Popen[str], int, int]:
    """`make run` again on the same folder and ports (make_run's config stays as written)."""
    env = {
        **os.environ,
        "ROTATOR_DEV_CONFIG": str(tmp_path / "config" / "local.toml"),
        "ROTATOR_DEV_SIM_PORT": str(sim_port),
        "ROTATOR_DEV_API_PORT": str(api_port),
    }
    proc: subprocess.Popen[str] = subprocess.Popen(
        [sys.executable, "-m", "rotator.devrun"], env=env, cwd=tmp_path, text=True,
        **popen,  # type: ignore[call-overload]
    )
    return proc, sim_port, api_port


def test_a_missing_secret_stops_each_command_before_it_starts_anything(
    tmp_path: Path, sim: SimServer
) -> None:
    prod = environment_table(
        sim.url,
        "test-prod",
        [{"name": "acme-sap", "connection_id": "conn-first-hour"}],
        sealing_env="FIRST_HOUR_SEAL",
        secret_env="FIRST_HOUR_SECRET",  # not set below
        backends=[file_backend("files/prod", "keys/prod-file.key")],
        retry=None,
    )
    text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod})
    from rotator.crypto import generate_key

    cli = RotatorCli(tmp_path, text, {"FIRST_HOUR_SEAL": generate_key()})
    cli.env.pop("FIRST_HOUR_SECRET", None)
    commands = [
        ("rotate", "prod", "acme-sap"),
        ("verify", "prod"),
        ("revoke", "prod", "acme-sap", "--reason", "drill", "--yes"),
        ("import", "prod", "acme-sap"),
    ]
    for args in commands:
        proc = cli(*args, stdin='{"access_token": "x"}')
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "nothing was started" in proc.stderr, proc.stderr
        assert "environments.prod.makini.client_secret_env" in proc.stderr
        assert "FIRST_HOUR_SECRET is not set" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "journal.db").exists()  # nothing was written at all
    # the scheduled path too: the credential fails, no rotation is opened that nothing
    # could finish (and that serve would later finish in someone else's name)
    due = cli("run-due", "--json")
    assert due.returncode == 1, due.stdout + due.stderr
    [result] = json.loads(due.stdout)
    assert result["outcome"] == "failed" and "FIRST_HOUR_SECRET is not set" in result["error"]
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}", migrate="off")
    try:
        assert journal.open_rotations() == []
        assert journal.audit_entries(action="rotation.started") == []
    finally:
        journal.close()
    assert sim.tokens(kind="access") == []  # Makini was never asked


def test_doctor_checks_makini_the_admin_token_and_each_connection(
    tmp_path: Path, sim: SimServer
) -> None:
    from rotator.crypto import generate_key

    def config(secret: str) -> RotatorCli:
        prod = environment_table(
            sim.url,
            "test-prod",
            [
                {"name": "acme-sap", "connection_id": "conn-doctor-here"},
                {"name": "globex", "connection_id": "conn-doctor-gone"},
            ],
            sealing_env="DOCTOR_SEAL",
            secret_env="DOCTOR_SECRET",
            backends=[file_backend("files/prod", "keys/prod-file.key")],
            retry=None,
        )
        text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod})
        return RotatorCli(
            tmp_path, text, {"DOCTOR_SEAL": generate_key(), "DOCTOR_SECRET": secret}
        )

    sim.add_connection("conn-doctor-here", "test-prod")
    proc = config("test-prod-secret")("doctor")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok prod/") for line in lines), proc.stdout  # the file backend
    assert f"FAILED prod/makini at {sim.url}" in lines
    assert "    admin token (client test-prod): ok" in lines
    assert "    connection conn-doctor-here (acme-sap): exists" in lines
    [gone] = [line for line in lines if "conn-doctor-gone" in line]
    assert "FAILED: Makini has no connection conn-doctor-gone for client test-prod" in gone
    assert "environments.prod.credentials[1].connection_id" in gone
    assert sim.tokens(kind="access") == []  # nothing was issued

    wrong = config("not-the-secret")("doctor", "--json")
    assert wrong.returncode == 1
    [makini] = [r for r in json.loads(wrong.stdout) if r["backend"] == "makini"]
    [(step, outcome)] = makini["steps"].items()
    assert step == "admin token (client test-prod)" and outcome.startswith("FAILED: ")
    assert "not-the-secret" not in wrong.stdout + wrong.stderr
