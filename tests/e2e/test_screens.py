"""The CLI's screens at 80 columns and on a wide terminal, piped (as a script or ``| less``
sees them): no id or name is ever cut, what is left out to fit is named, version ids are told
apart and accepted back, the progress bar knows its total, and the words a person meets
(deferred, no previous token, sync's dry run, the revoke warning) say what they mean.

The ``rotator`` command runs as a subprocess against the simulator over a socket, with two file
backends and a SQLite journal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.cli import render
from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.makini.sim import SimServer
from rotator.model import utcnow
from rotator.rotation import unaccounted
from rotator.rotation.work import Outcome, RotationResult
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend

pytestmark = pytest.mark.e2e

LONG = "acme-sap-production-eu-west-1"
"""A credential name as long as real ones get."""
KEY_NAME = "billing-service-reader-eu-west"
WIDTHS = ("80", "200")


class Screens(RotatorCli):
    """``prod``: credentials LONG, ``b`` and ``c`` on two file backends; ``dev``: ``a``."""

    def __init__(self, folder: Path, sim: SimServer) -> None:
        prod = environment_table(
            sim.url,
            "test-prod",
            credentials(LONG, "b", "c", connection="conn-{name}"),
            sealing_env="SCREENS_PROD_SEAL",
            secret_env="SCREENS_PROD_SECRET",
            backends=[
                file_backend("files/prod", "keys/prod.key"),
                file_backend("files/prod-replica", "keys/prod-replica.key", "replica-eu-west"),
            ],
            retry=SHORT_RETRY,
            makini={"timeout_s": 3},
        )
        dev = environment_table(
            sim.url,
            "test-dev",
            credentials("a", connection="conn-dev-{name}"),
            sealing_env="SCREENS_DEV_SEAL",
            secret_env="SCREENS_DEV_SECRET",
            backends=[file_backend("files/dev", "keys/dev.key")],
            retry=SHORT_RETRY,
        )
        super().__init__(
            folder,
            config_toml(
                {"url": "sqlite:///journal.db", "lock_ttl": "1s"}, {"prod": prod, "dev": dev}
            ),
            {
                "SCREENS_PROD_SEAL": generate_key(),
                "SCREENS_DEV_SEAL": generate_key(),
                "SCREENS_PROD_SECRET": "test-prod-secret",
                "SCREENS_DEV_SECRET": "test-dev-secret",
            },
        )

    def ok(self, *args: str, columns: str = "200", codes: tuple[int, ...] = (0,)) -> str:
        proc = self(*args, env={"COLUMNS": columns})
        assert proc.returncode in codes, f"{args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc.stdout + proc.stderr


@dataclass
class Rig:
    cli: Screens
    versions: dict[str, str]
    """credential -> its current version id (full)"""
    key_id: str
    unaccounted_id: int


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, sim_server: SimServer) -> Iterator[Rig]:
    # the commands below read the journal and the backends only: the simulator may be reset
    # by other tests meanwhile
    cli = Screens(tmp_path_factory.mktemp("screens"), sim_server)
    cli.ok("rotate", "prod", LONG, "b", "c")
    cli.ok("rotate", "dev", "a")
    proc = cli("keys", "create", "prod", "--name", KEY_NAME, "--credentials", f"{LONG},b", "--json")
    created = json.loads(proc.stdout)
    status = json.loads(cli("status", "--json").stdout)
    versions = {r["credential"]: r["current_version"] for r in status if r["environment"] == "prod"}
    journal = Journal(f"sqlite:///{cli.dir / 'journal.db'}")
    try:
        lost = unaccounted.Lost(
            "prod",
            LONG,
            f"conn-{LONG}",
            None,
            utcnow(),
            "the answer was lost (screen test)",
            live_until=utcnow() + timedelta(days=30),
        )
        entry = journal.transaction(
            "record", lambda conn: unaccounted.record(journal, conn, lost, actor="test")
        )
    finally:
        journal.close()
    yield Rig(cli, versions, created["key_id"], entry)


def table_commands(rig: Rig) -> dict[str, tuple[list[str], list[str]]]:
    """Each table command: its arguments, and what must be in its output whole."""
    short = render.short_versions(rig.versions.values())
    shown = [short(v) for v in rig.versions.values()]
    names = ["prod", "dev", LONG, "b", "c"]
    return {
        "status": (["status"], [*names, *shown]),
        "audit": (["audit"], [f"prod/{LONG}", "rotation.promoted", "token.unaccounted"]),
        "keys list": (["keys", "list"], [rig.key_id, KEY_NAME]),
        "plan": (["plan"], names),
        "unaccounted list": (["unaccounted", "list", "--all"], [str(rig.unaccounted_id), LONG]),
        "revoke plan": (
            ["revoke", "prod", "--all", "--reason", "screen test", "--dry-run"],
            [LONG, "b", "c", *shown],
        ),
        "sync dry run": (["sync", "prod", "--dry-run"], [LONG, "replica-eu-west", *shown]),
        "sync": (["sync", "prod"], [LONG, "replica-eu-west", *shown]),
    }


COMMANDS = [
    "status",
    "audit",
    "keys list",
    "plan",
    "unaccounted list",
    "revoke plan",
    "sync dry run",
    "sync",
]


@pytest.mark.parametrize("columns", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_table_never_cuts_an_id_or_a_name(rig: Rig, command: str, columns: str) -> None:
    args, whole = table_commands(rig)[command]
    out = rig.cli.ok(*args, columns=columns, codes=(0, 3))  # status: 3 (an unaccounted token)
    assert "…" not in out, out
    if columns == "80":
        assert max(len(line) for line in out.splitlines()) <= 80, out
    lines = out.splitlines()
    for text in whole:
        # whole, on one line, between the table's rules (not folded over two)
        assert any(re.search(rf"(^|[\s│/(]){re.escape(text)}($|[\s│)])", ln) for ln in lines), (
            f"{text!r} not whole in {command} at {columns} columns:\n{out}"
        )


def test_a_shown_version_is_accepted_by_revoke(rig: Rig) -> None:
    out = rig.cli.ok("status", columns="80", codes=(3,))
    full = rig.versions["b"]
    shown = render.short_versions(rig.versions.values())(full)
    assert shown in out and full not in out
    proc = rig.cli(
        "revoke", "prod", "b", "--version", shown, "--reason", "screen test", "--dry-run", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    [plan] = json.loads(proc.stdout)["plan"]
    assert plan["target_version"] == full


def test_get_previous_says_why_there_is_none(rig: Rig) -> None:
    proc = rig.cli("get", "prod", "b", "--previous")
    assert proc.returncode != 0
    assert "rotate it first" not in proc.stderr
    # prod's grace period is 0 (and the simulator kills old tokens on issue)
    assert "no previous token" in proc.stderr
    assert "grace period" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_revoke_warning_reads_as_a_sentence(rig: Rig) -> None:
    out = rig.cli.ok("revoke", "prod", "b", "--reason", "screen test", "--dry-run")
    assert "after have" not in " ".join(out.split())
    if "DISCONNECTED" in out:
        assert "once the rotator has tried to" in " ".join(out.split()), out


# --- in process: what a table does with what it is given ------------------------------------


def test_versions_made_in_the_same_millisecond_are_told_apart() -> None:
    # two credentials' versions, as UUIDv7 makes them in one millisecond: the same 13
    # leading characters (the time); one pair also shares its last 8
    a = "01a24bbe-6d05-7aaa-8bbb-111122223333"
    b = "01a24bbe-6d05-7ccc-9ddd-444455556666"
    c = "01a24bbe-6d05-7eee-afff-777722223333"
    show = render.short_versions([a, b, c])
    shown = {show(v) for v in (a, b, c)}
    assert len(shown) == 3
    for v in (a, b, c):
        assert v.endswith(show(v)) and not show(v).startswith("01a24bbe")
        assert render.expand_version(show(v), [a, b, c]) == v
    assert show(b) == "55556666"  # the random tail, 8 characters where they suffice
    assert show(a) == "122223333" and show(c) == "722223333"  # the shortest unique tails
    with pytest.raises(ValueError, match=a):
        render.expand_version("22223333", [a, b, c])


def _printed(work: Any, width: int = 80) -> str:
    with render.console.capture() as captured:
        saved = render.console.width
        render.console.width = width
        try:
            work()
        finally:
            render.console.width = saved
    return captured.get()


def test_deferred_is_explained_where_it_is_shown() -> None:
    result = RotationResult(
        "prod",
        LONG,
        Outcome.DEFERRED,
        version_id="01a24bbe-6d05-7aaa-8bbb-111122223333",
        error="Makini answered 503 at verify",
        step="staged",
    )
    out = _printed(lambda: render.results([result], as_json=False))
    assert "deferred: " in out and "resumes it" in " ".join(out.split())
    assert LONG in out and "…" not in out


def test_a_table_too_wide_drops_its_least_useful_columns_and_says_so() -> None:
    columns = [
        render.Column("id", whole=True),
        render.Column("name", whole=True),
        render.Column("extra", whole=True, drop=1),
        render.Column("note"),
    ]
    rows = [["k" * 30, "n" * 30, "x" * 30, "some words to wrap"]]
    out = _printed(lambda: render.console.print(render.table("t", columns, rows)))
    assert "k" * 30 in out and "n" * 30 in out and "x" * 30 not in out
    assert "left out to fit 80 columns: extra" in out
    assert max(len(line) for line in out.splitlines()) <= 80


# --- the progress bar, on a terminal ---------------------------------------------------------


def _read_all(fd: int, proc: subprocess.Popen[str]) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the other end closed (Linux: EIO)
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_knows_its_total_and_logs_print_above_it(
    tmp_path: Path, sim: SimServer
) -> None:
    cli = Screens(tmp_path, sim)
    primary, replica = pty.openpty()
    proc = subprocess.Popen(
        cli.argv("--log-level", "info", "rotate", "prod", LONG, "b", "c"),
        env={**cli.env, "COLUMNS": "80", "TERM": "xterm"},
        cwd=cli.dir,
        stdout=subprocess.PIPE,
        stderr=replica,
        text=True,
    )
    os.close(replica)
    try:
        seen = _read_all(primary, proc)
        stdout = proc.communicate(timeout=60)[0]
    finally:
        os.close(primary)
    assert proc.returncode == 0, seen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen)
    assert re.search(r"rotating\s.*\b[0-3]/3\b", plain), plain
    assert "/?" not in plain
    # every log line starts a line of its own: none is printed after the bar on its line
    events = [ln for ln in plain.replace("\r", "\n").splitlines() if "rotation." in ln]
    assert events, plain
    for ln in events:
        assert not re.search(r"\d/3", ln), f"a log line inside the bar: {ln!r}"
    # the results table (stdout, piped) fits 80 columns whole
    assert LONG in stdout and "…" not in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 80


def test_json_lists_one_item_a_line_and_anything_else_indented(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a script reads the same JSON either way; a person greps a credential's line
    rows = [{"credential": LONG, "at": utcnow(), "backends": {"file": "v1"}}, {"credential": "b"}]
    render.print_json(rows)
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(rows, default=str))
    assert out.splitlines()[1].strip().rstrip(",") == json.dumps(rows[0], default=str)
    assert len(out.splitlines()) == 4  # [, two rows, ]
    render.print_json([])
    render.print_json({"credential": LONG})
    assert capsys.readouterr().out == '[]\n{\n  "credential": "' + LONG + '"\n}\n'
