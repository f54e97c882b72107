"""``rotator discover ENV [--dry-run] [--json]`` and discovery at the start of ``run-due``, as
subprocesses against the simulator."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from tests.cli import RotatorCli
from tests.e2e.test_drain import free_port, listening
from tests.factories import config_toml, environment_table, file_backend
from tests.wait import wait_until


def _cli(tmp_path: Path, sim: SimServer) -> RotatorCli:
    prod = environment_table(
        sim.url, "test-prod", [], sealing_env="DISC_SEAL", secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    prod["discover"] = {"enabled": True, "name_template": "{company}-{id}"}
    text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod})
    return RotatorCli(tmp_path, text, {"DISC_SEAL": generate_key(),
                                       "DISC_SECRET": "test-prod-secret"})


def test_discover_dry_run_then_apply(tmp_path: Path, sim: SimServer) -> None:
    sim.add_connection("cli-1", "test-prod", company="Acme")
    cli = _cli(tmp_path, sim)
    dry = cli("discover", "prod", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["dry_run"] and [c["credential"] for c in shown["new"]] == ["acme-cli-1"]
    assert not sim.tokens("cli-1")  # nothing issued by a dry run
    done = cli("discover", "prod")
    assert done.returncode == 0, done.stderr
    assert "acme-cli-1" in done.stdout and "enrol" in done.stdout
    assert sim.tokens("cli-1", kind="access", status="active")
    status = cli("status", "prod", "--json")
    assert "acme-cli-1" in status.stdout
    verify = cli("verify", "prod", "--json")
    assert verify.returncode == 0, verify.stderr
    assert [(r["credential"], r["ok"]) for r in json.loads(verify.stdout)] == [
        ("acme-cli-1", True)]
    token = cli("get", "prod", "acme-cli-1")
    assert token.returncode == 0 and token.stdout.strip()
    assert all(token.stdout.strip() not in out for out in cli.outputs)


def test_run_due_discovers_first(tmp_path: Path, sim: SimServer) -> None:
    sim.add_connection("cli-2", "test-prod", company="Beta")
    cli = _cli(tmp_path, sim)
    run = cli("run-due", "--json")
    assert run.returncode == 0, run.stderr
    assert [r["credential"] for r in json.loads(run.stdout)] == ["beta-cli-2"]


def test_discovery_not_enabled_says_what_to_do(tmp_path: Path, sim: SimServer) -> None:
    prod = environment_table(
        sim.url, "test-prod", [], sealing_env="DISC_SEAL", secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    cli = RotatorCli(tmp_path, config_toml({"url": "sqlite:///journal.db"}, {"prod": prod}),
                     {"DISC_SEAL": generate_key(), "DISC_SECRET": "test-prod-secret"})
    out = cli("discover", "prod")
    assert out.returncode != 0
    assert "environments.prod.discover.enabled" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_discovers_at_start_and_at_its_interval(tmp_path: Path, sim: SimServer) -> None:
    sim.add_connection("srv-1", "test-prod", company="Gamma")
    prod = environment_table(
        sim.url, "test-prod", [], sealing_env="DISC_SEAL", secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    prod["discover"] = {"enabled": True, "interval": "10s", "name_template": "{company}-{id}"}
    text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod},
                       scheduler={"tick": "1s"})
    cli = RotatorCli(tmp_path, text, {"DISC_SEAL": generate_key(),
                                      "DISC_SECRET": "test-prod-secret"})
    port = free_port()
    proc = cli.start("serve", "--port", str(port))
    try:
        wait_until("serve", lambda: listening(port))
        wait_until("the first token at start",
                   lambda: sim.tokens("srv-1", kind="access", status="active"), timeout_s=30)
        sim.add_connection("srv-2", "test-prod", company="Delta")  # the next interval
        wait_until("the first token at the interval",
                   lambda: sim.tokens("srv-2", kind="access", status="active"), timeout_s=40)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    audit = cli("audit", "--action", "discovery.enrolled", "--json")
    assert {e["credential"] for e in json.loads(audit.stdout)} == {"gamma-srv-1", "delta-srv-2"}
