"""``rotator audit``: filters that refuse what does not exist, a time window, the reason in the
table, and shipping to a SIEM as JSON lines resumable from a cursor (each entry once, no token
in any line). The ``rotator`` command runs as a subprocess against the simulator over a socket;
the settled end of the log is checked against a real PostgreSQL."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path
from typing import Any

import pytest

import rotator
from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.journal.audit import ACTIONS
from rotator.makini.sim import SimServer
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend
from tests.wait import wait_until

pytestmark = pytest.mark.e2e

PASTED = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsZWFrIn0.c2lnbmF0dXJl"
"""A token an operator pasted into a reason."""


class Audited(RotatorCli):
    """``prod`` with credentials ``a`` and ``b`` on a file backend; ``dev`` with ``a``."""

    def __init__(self, folder: Path, sim: SimServer) -> None:
        envs = {
            name: environment_table(
                sim.url,
                f"test-{name}",
                credentials(*names, connection=f"conn-{name}-{{name}}"),
                sealing_env=f"AUDIT_{name.upper()}_SEAL",
                secret_env=f"AUDIT_{name.upper()}_SECRET",
                backends=[file_backend(f"files/{name}", f"keys/{name}.key")],
                retry=SHORT_RETRY,
            )
            for name, names in (("prod", ("a", "b")), ("dev", ("a",)))
        }
        super().__init__(
            folder,
            config_toml({"url": "sqlite:///journal.db"}, envs),
            {
                "AUDIT_PROD_SEAL": generate_key(),
                "AUDIT_DEV_SEAL": generate_key(),
                "AUDIT_PROD_SECRET": "test-prod-secret",
                "AUDIT_DEV_SECRET": "test-dev-secret",
            },
        )

    def ok(self, *args: str, columns: str = "200") -> str:
        proc = self(*args, env={"COLUMNS": columns})
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def lines(self, *args: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ok("audit", "--jsonl", *args).splitlines()]


@pytest.fixture
def audited(tmp_path: Path, sim: SimServer) -> Audited:
    cli = Audited(tmp_path, sim)
    cli.ok("rotate", "prod", "a", "b", "--reason", f"ticket INC-7 token={PASTED}")
    return cli


def test_unknown_action_or_environment_is_an_error_naming_the_known_ones(
    audited: Audited,
) -> None:
    proc = audited("audit", "--action", "rotation.promotd")
    assert proc.returncode != 0 and proc.stdout == ""
    said = " ".join(proc.stderr.split())
    assert "unknown --action 'rotation.promotd'" in said
    assert "rotation.promoted" in said and "revoke.started" in said
    assert "Traceback" not in proc.stderr
    proc = audited("audit", "--env", "production")
    assert proc.returncode != 0
    assert "unknown --env 'production'" in proc.stderr and "dev, prod" in proc.stderr
    # a known action nobody has done yet is an empty answer, not an error
    assert audited.ok("audit", "--action", "revoke.killed").strip() == "no audit entries match"


def test_family_time_window_and_the_reason_in_the_table(audited: Audited) -> None:
    audited.ok("rotate", "dev", "a", "--reason", "dev drill")
    every = audited.lines()
    assert {e["action"] for e in every} >= {"rotation.promoted"}
    assert [e["seq"] for e in every] == sorted(e["seq"] for e in every)
    dev = audited.lines("--env", "dev", "--action", "rotation")
    assert dev and {(e["environment"], e["action"].split(".")[0]) for e in dev} == {
        ("dev", "rotation")
    }
    assert audited.lines("--since", "1h") == every
    first = every[0]["at"]
    assert [e["seq"] for e in audited.lines("--until", first)] == [every[0]["seq"]]
    bad = audited("audit", "--since", "last tuesday")
    assert bad.returncode != 0 and "neither a time nor a time ago" in bad.stderr
    # the reason shows in the table, at 80 columns, masked as the logs mask it
    table = audited.ok("audit", columns="80")
    words = table.split()
    assert "drill" in words and "INC-7" in words and "rotation.promoted" in words, table
    assert "…" not in table and PASTED not in table


def test_jsonl_ships_each_entry_once_from_a_cursor(audited: Audited) -> None:
    out, cursor = audited.dir / "siem" / "audit.jsonl", audited.dir / "siem" / "cursor"
    out.parent.mkdir()
    ship = ("audit", "--jsonl", "--output", str(out), "--cursor-file", str(cursor))
    assert audited.ok(*ship) == ""
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert first and int(cursor.read_text()) == first[-1]["seq"]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    audited.ok("rotate", "dev", "a")
    audited.ok(*ship)
    shipped = [json.loads(line) for line in out.read_text().splitlines()]
    seqs = [e["seq"] for e in shipped]
    assert len(seqs) > len(first) and seqs == sorted(set(seqs))  # each once, in order
    assert int(cursor.read_text()) == seqs[-1]
    # a shipper that stopped after writing a batch, before moving its cursor: no entry twice
    cursor.write_text(f"{first[-1]['seq']}\n")
    audited.ok(*ship)
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == seqs
    # --after, to stdout, and the audit log matches what was shipped
    after = audited.lines("--after", str(first[-1]["seq"]))
    assert [e["seq"] for e in after] == seqs[len(first) :]
    # no token in any line: the pasted one is masked, the live ones never appear
    text = out.read_text()
    assert PASTED not in text and "ticket INC-7" in text
    token = audited("get", "prod", "a").stdout.strip()
    assert token and token not in text
    assert all(token not in o for o in audited.outputs)


def test_jsonl_options_need_jsonl_and_a_readable_cursor(audited: Audited) -> None:
    proc = audited("audit", "--cursor-file", "c")
    assert proc.returncode != 0 and "go with --jsonl" in proc.stderr
    (audited.dir / "c").write_text("not a number\n")
    proc = audited("audit", "--jsonl", "--cursor-file", "c")
    assert proc.returncode != 0 and "not a sequence number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_follow_ships_new_entries_as_they_come(audited: Audited) -> None:
    out = audited.dir / "follow.jsonl"
    proc = audited.start("audit", "--jsonl", "--follow", "--output", str(out))
    try:
        before = wait_until("the first batch", lambda: out.exists() and out.read_text())
        count = before.count("\n")
        audited.ok("rotate", "dev", "a")
        wait_until(
            "the new entries",
            lambda: (
                out.read_text().count("\n") > count and "dev" in out.read_text().splitlines()[-1]
            ),
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    seqs = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert seqs == sorted(set(seqs))


# --- what the log can hold ---------------------------------------------------------------------


def _written_actions() -> set[str]:
    """Every audit action the product's code writes: literal ``action=``/``"action":`` values
    passed to the journal's audit calls, and the f-strings of one family (expanded below)."""
    root = Path(rotator.__file__).parent
    found: set[str] = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            value: ast.AST | None = None
            if isinstance(node, ast.keyword) and node.arg == "action":
                value = node.value
            elif isinstance(node, ast.Dict):
                for key, item in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "action":
                        value = item
            elif (
                isinstance(node, ast.Call)
                and "to_thread" in (getattr(node.func, "id", ""), getattr(node.func, "attr", ""))
                and len(node.args) > 2
                and getattr(node.args[0], "id", None) == "audit"
            ):
                value = node.args[2]  # the admin API's audit(key, action, ...)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                if "." in value.value:
                    found.add(value.value)
            elif isinstance(value, ast.JoinedStr):
                head = value.values[0]
                if isinstance(head, ast.Constant) and isinstance(head.value, str):
                    found.add(head.value + "*")
    return found


def test_every_action_the_code_writes_is_known() -> None:
    written = _written_actions()
    families = {a for a in written if a.endswith("*")}
    assert families == {"rotation.*", "token.unaccounted_*"}, families
    plain = written - families
    assert "api.rotate" in plain and "revoke.killed" in plain and "key.created" in plain
    assert plain <= ACTIONS, sorted(plain - ACTIONS)
    # the f-string ones: a rotation that stopped, an unaccounted token closed
    assert {"rotation.rolled_back", "rotation.failed"} <= ACTIONS
    assert {"token.unaccounted_resolved", "token.unaccounted_acknowledged"} <= ACTIONS


@pytest.mark.postgres
def test_the_settled_end_waits_for_an_entry_still_being_written(pg_url: str) -> None:
    # PostgreSQL draws an entry's number when it is inserted and shows it when its transaction
    # commits: number 1 may still be uncommitted when number 2 is visible. A shipper that
    # moved its cursor to 2 would never ship 1.
    journal = Journal(pg_url)
    try:
        slow = journal.engine.connect()
        slow_tx = slow.begin()
        journal.audit_in(slow, actor="t", action="key.created", outcome="success", environment="a")
        journal.audit(actor="t", action="key.revoked", outcome="success", environment="b")
        settled: list[int] = []
        reader = threading.Thread(target=lambda: settled.append(journal.audit_settled()))
        reader.start()
        with journal.engine.connect() as probe:
            from sqlalchemy import text

            wait_until(
                "the shipper waiting for the open insert",
                lambda: probe.execute(
                    text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                ).scalar_one(),
            )
        assert reader.is_alive() and not settled  # it waits, rather than answer 2 now
        slow_tx.commit()
        slow.close()
        reader.join(timeout=30)
        assert settled == [2]
        shipped = journal.audit_entries(after=0, through=settled[0], oldest_first=True)
        assert [e.environment for e in shipped] == ["a", "b"]
    finally:
        journal.close()
