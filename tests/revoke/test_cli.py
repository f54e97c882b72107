"""``rotator revoke`` as a subprocess against the simulator over a socket, with two file
backends: guardrails, dry run, report, resume after an outage and after SIGKILL, and
pre-emption of a ``rotator rotate`` running in another process. No token in any output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.model import fingerprint
from tests.cli import RotatorCli
from tests.wait import lease_free, wait_until

pytestmark = pytest.mark.e2e

CONFIG = """
[journal]
url = "sqlite:///journal.db"
lock_ttl = "{lock_ttl}"

[environments.prod]
sealing_key = {{ env = "RV_PROD_SEAL" }}
[environments.prod.makini]
base_url = "{url}"
client_id = "test-prod"
client_secret_env = "RV_PROD_SECRET"
retry = {{ max_attempts = 2, base_delay_s = 0.01, max_delay_s = 0.05, total_timeout_s = 2 }}
[environments.prod.schedule]
interval = "1h"
grace_period = "0s"
[[environments.prod.backends]]
type = "file"
name = "primary"
path = "files/one"
key = {{ file = "keys/one.key", generate = true }}
[[environments.prod.backends]]
type = "file"
name = "replica"
path = "files/two"
key = {{ file = "keys/two.key", generate = true }}
[[environments.prod.credentials]]
name = "a"
connection_id = "conn-rv-a"
[[environments.prod.credentials]]
name = "b"
connection_id = "conn-rv-b"
"""


class Rotator(RotatorCli):
    def __init__(self, tmp_path: Path, sim: SimServer, lock_ttl: str = "1s") -> None:
        super().__init__(
            tmp_path,
            CONFIG.format(url=sim.url, lock_ttl=lock_ttl),
            {"RV_PROD_SEAL": generate_key(), "RV_PROD_SECRET": "test-prod-secret"},
        )

    def token(self, name: str) -> str:
        """The current access token in every backend (they must agree), read in-process."""
        import backends
        from rotator.settings import load_config

        env = load_config(self.config).environment("prod")
        found = set()
        for settings in env.backend_settings:
            backend = backends.build(settings, "prod")
            version = backend.read(name)
            assert version is not None
            found.add(version.tokens.access.reveal())
            backend.close()
        [token] = found
        return token

    def audit_count(self) -> int:
        with sqlite3.connect(self.dir / "journal.db") as db:
            return int(db.execute("select count(*) from audit").fetchone()[0])

    def files(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((self.dir / "files").rglob("*"))
            if p.is_file() and ".locks" not in p.parts
        }

    def audit(self, action: str | None = None) -> list[dict[str, Any]]:
        args = ["audit", "--json", "--limit", "1000"] + (["--action", action] if action else [])
        rows: list[dict[str, Any]] = json.loads(self(*args).stdout)
        return rows

    def assert_no_token_leaked(self, *tokens: str) -> None:
        for text in self.outputs:
            for token in tokens:
                assert token not in text
        for path in [*(self.dir / "files").rglob("*"), self.dir / "journal.db"]:
            if path.is_file():
                data = path.read_bytes()
                for token in tokens:
                    assert token.encode() not in data


def status(sim: SimServer, token: str) -> str:
    view = sim.token(fingerprint(token))
    assert view is not None
    return str(view["status"])


def test_revoke_replaces_purges_confirms_and_reports(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    old = rotator.token("a")

    proc = rotator(
        "--log-level",
        "debug",
        "revoke",
        "prod",
        "a",
        "--reason",
        "leaked in CI log",
        "--yes",
        "--json",
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    [result] = out["results"]
    assert out["ok"] and result["outcome"] == "revoked" and result["old_token_dead"] is True
    assert set(result["backends"]) == {"primary", "replica"}
    assert all(b["ok"] and b["actions"] for b in result["backends"].values())
    assert {"kill_s", "replace_s", "purge_s", "confirm_s", "total_s"} <= set(result["timings_s"])
    new = rotator.token("a")
    assert new != old and status(sim, old) == "revoked" and status(sim, new) == "active"
    [done] = rotator.audit("revoke.completed")
    assert done["actor"].count("@") == 1 and done["detail"]["reason"] == "leaked in CI log"
    assert done["detail"]["report"]["backends"]["replica"]["ok"]
    rows = {r["credential"]: r for r in json.loads(rotator("status", "--json").stdout)}
    assert rows["a"]["backends_agree"] and rows["a"]["open_revoke"] is None
    assert rows["a"]["attention"] is None
    rotator.assert_no_token_leaked(old, new)


def test_guardrails(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    before = (rotator.token("a"), rotator.files(), rotator.audit_count())

    proc = rotator("revoke", "prod", "a", "--reason", "x")  # stdin is not a terminal
    assert proc.returncode == 2 and "refusing to revoke without confirmation" in proc.stderr
    assert "EMERGENCY REVOKE plan" in proc.stdout
    proc = rotator("revoke", "prod", "--all", "--reason", "x")
    assert proc.returncode == 2 and "--yes" in proc.stderr
    proc = rotator("revoke", "prod", "a", "--yes")
    assert proc.returncode == 2 and "needs a reason" in proc.stderr
    proc = rotator("revoke", "prod", "zzz", "--reason", "x", "--yes", "--strategy", "issue")
    assert proc.returncode == 2 and "has no credential 'zzz'" in proc.stderr
    for text in rotator.outputs:
        assert "Traceback" not in text

    assert (rotator.token("a"), rotator.files(), rotator.audit_count()) == before
    assert status(sim, before[0]) == "active"


def test_dry_run_changes_nothing(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    token = rotator.token("a")
    before = (sim.tokens(), sim.stats()["total"], rotator.files(), rotator.audit_count())

    proc = rotator("revoke", "prod", "--all", "--reason", "x", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert [p["action"] for p in plan] == ["revoke", "revoke"]
    assert plan[0]["method"] == "issue" and plan[0]["escalate"] is True
    proc = rotator("revoke", "prod", "a", "--reason", "x", "--dry-run", "--strategy", "disconnect")
    assert proc.returncode == 0 and "dry run: nothing was changed" in proc.stdout
    assert "DISCONNECT" in proc.stderr and "reconnect" in proc.stderr

    assert (sim.tokens(), sim.stats()["total"], rotator.files(), rotator.audit_count()) == before
    with sqlite3.connect(tmp_path / "journal.db") as db:
        assert db.execute("select count(*) from rotations where kind = 'revoke'").fetchone()[0] == 0
    rotator.assert_no_token_leaked(token)


def test_outage_then_resume(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    old = rotator.token("a")
    sim.set(outage_s=60)

    proc = rotator("revoke", "prod", "a", "--reason", "x", "--yes")

    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "incomplete" in proc.stdout + proc.stderr and "--resume" in proc.stderr
    st = rotator("status", "--json")
    assert st.returncode == 3
    row = next(r for r in json.loads(st.stdout) if r["credential"] == "a")
    assert row["open_revoke"] == "revoke-started" and "--resume" in row["attention"]
    human = rotator("status")
    assert "EMERGENCY REVOKE UNFINISHED" in human.stderr

    sim.set(outage_until=None)
    proc = rotator("revoke", "prod", "--resume", "--json")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    [result] = json.loads(proc.stdout)["results"]
    assert result["outcome"] == "revoked" and result["resumed"]
    new = rotator.token("a")
    assert status(sim, old) == "revoked" and status(sim, new) == "active"
    assert rotator("status").returncode == 0
    rotator.assert_no_token_leaked(old, new)


def test_sigkill_mid_revoke_then_resume(tmp_path: Path, sim: SimServer) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a").returncode == 0
    old = rotator.token("a")

    killed = rotator(
        "revoke",
        "prod",
        "a",
        "--reason",
        "x",
        "--yes",
        env={"ROTATOR_FAULT_KILL_AFTER": "revoke-issued:a"},
    )
    assert killed.returncode == -signal.SIGKILL
    journal = f"sqlite:///{tmp_path / 'journal.db'}"
    wait_until("the dead worker's lease to expire", lambda: lease_free(journal, "prod/a"))
    done = rotator("run-due", "--env", "prod", "--json")  # the scheduler finishes it

    assert done.returncode == 0, done.stdout + done.stderr
    assert "revoked" in {r["outcome"] for r in json.loads(done.stdout)}
    new = rotator.token("a")
    live = {t["fingerprint"] for t in sim.tokens("conn-rv-a", kind="access", status="active")}
    assert live == {fingerprint(new)} and status(sim, old) == "revoked"
    rotator.assert_no_token_leaked(old, new)


def _rotation_step(db_path: Path) -> str | None:
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            row = db.execute(
                "select step from rotations where kind = 'rotate' order by started_at desc"
            ).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def test_revoke_preempts_a_rotation_running_in_another_process(
    tmp_path: Path, sim: SimServer
) -> None:
    rotator = Rotator(tmp_path, sim, lock_ttl="5m")
    assert rotator("rotate", "prod", "a").returncode == 0
    old = rotator.token("a")
    sim.set(latency_ms=300)
    worker = rotator.start("rotate", "prod", "a", "--json")
    try:

        def staged() -> bool:
            assert worker.poll() is None
            return _rotation_step(tmp_path / "journal.db") == "staged"

        wait_until("the rotation to be staged", staged, every_s=0.01)
        # mid-rotation, holding the lease, waiting for Makini to verify its new token (not
        # inside a file-backend write: a process stopped there holds the file's flock)
        os.kill(worker.pid, signal.SIGSTOP)
        sim.set(latency_ms=0)

        proc = rotator("revoke", "prod", "a", "--reason", "x", "--yes", "--json")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        out, errs = worker.communicate(timeout=60)
    rotator.outputs.append(out + errs)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    [result] = json.loads(proc.stdout)["results"]
    assert result["outcome"] == "revoked" and len(result["superseded"]) == 1
    assert worker.returncode == 1  # it lost its lease and stopped
    [rotation] = json.loads(out)
    assert rotation["outcome"] in ("failed", "deferred")
    new = rotator.token("a")
    assert status(sim, old) == "revoked"
    live = {t["fingerprint"] for t in sim.tokens("conn-rv-a", kind="access", status="active")}
    assert live == {fingerprint(new)}
    rows = {r["credential"]: r for r in json.loads(rotator("status", "--json").stdout)}
    assert rows["a"]["open_step"] is None and rows["a"]["backends_agree"]
    rotator.assert_no_token_leaked(old, new)


def test_interactive_confirmation(
    tmp_path: Path, sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """y/N for named credentials; typing the environment's name for --all (a terminal is
    simulated: the command runs in-process)."""
    from typer.testing import CliRunner

    import rotator.cli.revoke as revoke_cli
    from rotator.cli.app import app

    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    a, b = rotator.token("a"), rotator.token("b")
    for key, value in rotator.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(revoke_cli, "interactive", lambda: True)
    # keep the process's logging as it is (the runner's streams close after each call)
    monkeypatch.setattr("rotator.logs.configure", lambda *_a, **_k: None)
    runner = CliRunner()

    def run(*args: str, answer: str) -> Any:
        return runner.invoke(app, ["revoke", "prod", *args, "--reason", "x"], input=answer)

    assert run("a", answer="n\n").exit_code == 2
    assert run("--all", answer="production\n").exit_code == 2  # not the name
    assert (rotator.token("a"), rotator.token("b")) == (a, b)
    assert status(sim, a) == "active"

    done = run("a", "--json", answer="y\n")
    assert done.exit_code == 0, done.output
    question = "Revoke 1 credential(s) in 'prod' now?"  # on stderr: stdout is the JSON report
    assert question in done.stderr and question not in done.stdout
    assert status(sim, a) == "revoked" and rotator.token("b") == b
    done = run("--all", answer="prod\n")
    assert done.exit_code == 0, done.output
    assert status(sim, b) == "revoked"
    assert a not in done.output and b not in done.output


def test_a_token_pasted_into_the_reason_is_recorded_as_its_fingerprint(
    tmp_path: Path, sim: SimServer
) -> None:
    rotator = Rotator(tmp_path, sim)
    assert rotator("rotate", "prod", "a").returncode == 0
    old = rotator.token("a")
    plan = rotator("revoke", "prod", "a", "--reason", f"leaked: {old}", "--dry-run")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "reason: leaked: [masked-token]" in plan.stdout  # the plan, for a person
    proc = rotator("revoke", "prod", "a", "--reason", f"leaked: {old}", "--yes", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [done] = rotator.audit("revoke.completed")
    assert done["detail"]["reason"] == f"leaked: [token sha256:{fingerprint(old)[:12]}]"
    rotator.assert_no_token_leaked(old, rotator.token("a"))
