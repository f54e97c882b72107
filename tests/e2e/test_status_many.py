"""``rotator status`` over more credentials than a person reads: the table lists those that need a
look and counts the healthy rest, ``--all`` lists every one, both fit 80 columns piped, and the
exit code says trouble as before. A table of hundreds of rows is plain text (not rich), fitted
the same way.

The ``rotator`` command runs as a subprocess against the simulator over a socket, with a file
backend and a SQLite journal; the plain table is also printed from rows made in the test."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest

from rotator.cli import render
from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.model import utcnow
from rotator.rotation.status import CredentialStatus
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend

pytestmark = pytest.mark.e2e

NAMES = [f"svc-{i:02d}" for i in range(render.STATUS_LISTS_UP_TO + 6)]
NO_TOKEN = NAMES[-2:]
"""never rotated: no current version, not healthy"""
LONG = "acme-sap-production-eu-west-1"
"""A credential name as long as real ones get (as in test_screens)."""


def whole(text: str, out: str) -> bool:
    """``text`` whole on one line of ``out`` (not folded, not part of a longer word)."""
    return any(
        re.search(rf"(^|[\s│/(]){re.escape(text)}($|[\s│)])", line) for line in out.splitlines()
    )


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, sim_server: SimServer) -> RotatorCli:
    prod = environment_table(
        sim_server.url,
        "test-prod",
        credentials(*NAMES, connection="conn-many-{name}"),
        sealing_env="MANY_SEAL",
        secret_env="MANY_SECRET",
        backends=[file_backend("files/prod", "keys/prod.key")],
        retry=SHORT_RETRY,
    )
    made = RotatorCli(
        tmp_path_factory.mktemp("status-many"),
        config_toml("sqlite:///journal.db", {"prod": prod}),
        {"MANY_SEAL": generate_key(), "MANY_SECRET": "test-prod-secret"},
    )
    proc = made("rotate", "prod", *[n for n in NAMES if n not in NO_TOKEN], "--json")
    assert proc.returncode == 0, proc.stderr
    return made


def test_many_credentials_list_what_needs_a_look_and_count_the_rest(cli: RotatorCli) -> None:
    proc = cli("status", env={"COLUMNS": "80"})
    assert proc.returncode == 3, proc.stderr  # two have no token: trouble, as before
    out = proc.stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for name in NO_TOKEN:
        assert whole(name, out), out
    healthy = [n for n in NAMES if n not in NO_TOKEN]
    assert not any(whole(name, out) for name in healthy), out
    assert f"not listed (--all lists them): {len(healthy)} healthy, nothing due" in out
    assert f"prod: {len(healthy)} ({len(healthy)} rotated); next rotation in" in out


def test_all_lists_every_credential(cli: RotatorCli) -> None:
    rows = json.loads(cli("status", "--json").stdout)
    short = render.short_versions(r["current_version"] for r in rows)
    proc = cli("status", "--all", env={"COLUMNS": "80"})
    assert proc.returncode == 3
    out = proc.stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "not listed" not in out
    for row in rows:
        assert whole(row["credential"], out), out
        if row["current_version"]:
            assert whole(short(row["current_version"]), out), out


def test_few_credentials_are_all_listed(tmp_path: Path, sim: SimServer) -> None:
    prod = environment_table(
        sim.url,
        "test-prod",
        credentials("a", "b", connection="conn-few-{name}"),
        sealing_env="FEW_SEAL",
        secret_env="FEW_SECRET",
        backends=[file_backend("files/prod", "keys/prod.key")],
        retry=SHORT_RETRY,
    )
    few = RotatorCli(
        tmp_path,
        config_toml("sqlite:///journal.db", {"prod": prod}),
        {"FEW_SEAL": generate_key(), "FEW_SECRET": "test-prod-secret"},
    )
    assert few("rotate", "prod", "a").returncode == 0
    proc = few("status", env={"COLUMNS": "80"})
    assert proc.returncode == 3  # b has no token
    assert whole("a", proc.stdout) and whole("b", proc.stdout)
    assert "not listed" not in proc.stdout


def _row(i: int, name: str, now_version: str | None) -> CredentialStatus:
    now = utcnow()
    return CredentialStatus(
        environment="prod",
        credential=name,
        connection_id=f"conn-{i}",
        current_version=now_version,
        fingerprint=None,
        rotated_at=now - timedelta(days=1) if now_version else None,
        expires_at=now + timedelta(days=29) if now_version else None,
        next_action="wait" if now_version else "rotate",
        next_at=now + timedelta(days=20) if now_version else now,
        next_reason="scheduled",
        last_outcome="rolled_back" if i % 7 == 0 else "rotated",
        last_error=None,
        attention=None,
        open_step="verifying-new-token-at-makini" if i % 11 == 0 else None,
        backends={"primary": now_version, "replica-eu-west-1": now_version},
    )


def test_a_long_table_is_plain_fits_80_columns_and_cuts_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    count = render.PLAIN_FROM + 50
    names = [f"{LONG}-{i}" for i in range(count)]
    rows = [_row(i, n, f"0192f1c2-7b3a-7c44-8e2d-{i:012x}" if i % 5 else None) for i, n in
            enumerate(names)]  # fmt: skip
    width = render.console.width
    try:
        render.console.width = 80
        render.status(rows, as_json=False, show_all=True)
    finally:
        render.console.width = width
    out = capsys.readouterr().out
    assert "│" not in out and "[" not in out  # plain text: no rich box, no markup left
    assert max(len(line) for line in out.splitlines()) <= 80, out
    short = render.short_versions(r.current_version for r in rows)
    for r in rows:
        assert whole(r.credential, out), r.credential
        if r.current_version:
            assert whole(short(r.current_version), out)
    assert "left out to fit 80 columns" in out  # the long names push the least useful out
    lines = out.splitlines()
    assert sum(1 for line in lines if line.startswith("prod ")) == count  # a row each, in order
    assert [n for n in names if whole(n, out)] == names


def test_status_of_discovered_credentials_imports_neither_sqlalchemy_nor_the_makini_client(
    tmp_path: Path,
) -> None:
    """The enrolled credentials are made effective by ``rotator.rotation.enrolled`` alone:
    discovery's module (SQLAlchemy, the journal's schema, the Makini client) is not imported."""
    import sqlite3

    from tests.e2e.test_cli_startup import SERVER, imported

    prod = environment_table(
        "http://127.0.0.1:9",  # status calls no Makini
        "startup-prod",
        credentials("configured"),
        sealing_env="DISC_SEAL",
        secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod.key")],
    )
    prod["discover"] = {"enabled": True}
    config = tmp_path / "rotator.toml"
    config.write_text(config_toml("sqlite:///journal.db", {"prod": prod}))
    env = {"ROTATOR_CONFIG": str(config), "DISC_SEAL": generate_key()}
    first, _ = imported("status", "--json", env=env, cwd=tmp_path)  # makes the journal
    assert first.returncode == 3, first.stderr[-2000:]
    now = "2026-01-01 00:00:00.000000"
    with sqlite3.connect(tmp_path / "journal.db") as db:
        db.execute(
            "INSERT INTO discovered_connections (environment, connection_id, credential, "
            "platform, company, name, status, enrolled_at, seen_at) "
            "VALUES ('prod', 'conn-found', 'found', 'sap', 'acme', 'Found', 'enrolled', ?, ?)",
            (now, now),
        )
    db.close()
    proc, packages = imported("status", "--json", env=env, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert [(r["credential"], r["connection_id"]) for r in json.loads(proc.stdout)] == [
        ("configured", "conn-configured"),
        ("found", "conn-found"),
    ]
    assert packages & {*SERVER, "alembic"} == set()
