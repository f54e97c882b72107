"""The journal's schema, owned by migrations: processes that start together on an empty
database, journals made by older releases, a journal newer than the code, and `rotator db`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from rotator.errors import JournalError
from rotator.journal import Base, Journal, migrate


def test_the_revisions_the_code_knows_are_the_scripts_in_order() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrate.SCRIPTS))
    scripts = ScriptDirectory.from_config(config)
    chain = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    assert tuple(chain) == migrate.REVISIONS
    assert scripts.get_current_head() == migrate.HEAD


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_the_migrations_make_exactly_the_schema_the_models_declare(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # a model changed without a migration (or the other way round) fails here
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = (
        f"sqlite:///{tmp_path / 'journal.db'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    Journal(url).close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == []
            assert migrate.revision(conn) == migrate.HEAD
    finally:
        engine.dispose()


def test_a_fresh_journal_has_every_table_before_anything_is_used(journal_url: str) -> None:
    # the migrations alone make the tables: a table that some code path created on first use
    # would be missing here
    journal = Journal(journal_url)
    try:
        tables = set(inspect(journal.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
    finally:
        journal.close()


def test_no_code_creates_tables_but_the_migrations() -> None:
    import ast

    root = Path(__file__).resolve().parents[2]
    calls = []
    for folder in ("rotator", "backends"):
        for path in (root / folder).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                named = isinstance(node, ast.Attribute) and node.attr in (
                    "create_all",
                    "create_tables",
                )
                checkfirst = isinstance(node, ast.Call) and any(
                    kw.arg == "checkfirst" for kw in node.keywords
                )
                if named or checkfirst:
                    calls.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}")
    assert calls == []


@pytest.mark.postgres
def test_journals_opened_together_on_an_empty_postgresql_database_all_start(
    pg_url: str,
) -> None:
    # before migrations, create_all raced: a unique violation on pg_type ended one or two of
    # three replicas started together
    for _ in range(3):
        _empty(pg_url)
        barrier = threading.Barrier(4)

        def open_one(_: int, barrier: threading.Barrier = barrier) -> Journal:
            barrier.wait()
            return Journal(pg_url)

        with ThreadPoolExecutor(4) as pool:
            journals = list(pool.map(open_one, range(4)))
        journals[0].set_state("prod", "a", attention="x")
        assert journals[3].state("prod", "a") is not None
        for journal in journals:
            journal.close()


def test_processes_opening_one_new_sqlite_journal_together_all_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    code = (
        "import sys; from rotator.journal import Journal; "
        "j = Journal(sys.argv[1]); j.set_state('prod', sys.argv[2], attention='x'); j.close()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url, f"c{i}"], stderr=subprocess.PIPE)
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
    journal = Journal(url)
    assert set(journal.states()) == {("prod", f"c{i}") for i in range(4)}
    journal.close()


def test_a_journal_of_an_earlier_revision_is_migrated_with_its_data(tmp_path: Path) -> None:
    # a later release changes a table on an existing journal: 0002 adds columns and a table
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    _upgrade_to(url, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO credential_state (environment, credential, current_version_id) "
                "VALUES ('prod', 'a', 'v1')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO locks (name, owner, acquired_at, expires_at) VALUES "
                "('prod/a', 'old-holder', '2026-01-01 00:00:00', '2026-01-01 00:05:00')"
            )
        )
    engine.dispose()
    journal = Journal(url)
    try:
        state = journal.state("prod", "a")
        assert state is not None and state.current_version_id == "v1"
        assert state.unaccounted == 0  # the new column, filled in for the existing row
        [lock] = journal.locks()
        assert lock.owner == "old-holder"
        assert migrate.state(journal.engine, journal.where).current
    finally:
        journal.close()


def test_a_journal_made_before_migrations_is_adopted_as_it_is(tmp_path: Path) -> None:
    # the first releases made the core tables with create_all and the serving tables on first
    # use; such a journal has no version table and maybe only some tables
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    engine = create_engine(url)
    core = ("rotations", "credential_state", "audit", "locks")
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE credential_state (environment VARCHAR(64) NOT NULL, credential "
                "VARCHAR(64) NOT NULL, current_version_id VARCHAR(36), current_fingerprint "
                "VARCHAR(64), expires_at DATETIME, rotated_at DATETIME, last_attempt_at "
                "DATETIME, last_outcome VARCHAR(32), last_error TEXT, attention TEXT, PRIMARY "
                "KEY (environment, credential))"
            )
        )
        conn.execute(
            text("INSERT INTO credential_state (environment, credential) VALUES ('prod', 'a')")
        )
    engine.dispose()
    journal = Journal(url)
    try:
        tables = set(inspect(journal.engine).get_table_names())
        assert set(core) | {"reader_keys", "webhook_events", "unaccounted_tokens"} <= tables
        assert journal.state("prod", "a") is not None  # the existing row kept
    finally:
        journal.close()


def test_a_journal_newer_than_this_release_is_refused_clearly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    Journal(url).close()
    _stamp(url, "9999")
    with pytest.raises(JournalError) as info:
        Journal(url)
    text_ = info.value.describe()
    assert "9999" in text_ and "newer than this release" in text_ and "downgrade" in text_


def test_manual_mode_refuses_a_journal_that_is_behind_and_names_the_command(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    _upgrade_to(url, "0001")
    with pytest.raises(JournalError) as info:
        Journal(url, migrate="manual")
    assert "rotator db upgrade" in info.value.describe()
    assert migrate.state(create_engine(url), url).revision == "0001"  # nothing was changed


def test_db_current_and_upgrade_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "rotator.toml").write_text(
        '[journal]\nurl = "sqlite:///journal.db"\nmigrate = "manual"\n'
        '[environments.prod]\nsealing_key = { env = "MIG_SEAL" }\n'
        '[environments.prod.makini]\nclient_id = "c"\nclient_secret_env = "MIG_SECRET"\n'
        '[[environments.prod.backends]]\ntype = "file"\npath = "files"\n'
        'key = { file = "files.key", generate = true }\n'
    )
    _upgrade_to(f"sqlite:///{tmp_path / 'journal.db'}", "0001")
    env = {**os.environ, "ROTATOR_CONFIG": str(tmp_path / "rotator.toml")}

    def rotator(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rotator", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    behind = rotator("db", "current")
    assert behind.returncode == 1 and "behind" in behind.stdout and "db upgrade" in behind.stdout
    refused = rotator("audit")
    assert refused.returncode != 0 and "rotator db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = rotator("db", "upgrade")
    assert done.returncode == 0 and f"from 0001 to {migrate.HEAD}" in done.stdout, done.stderr
    again = rotator("db", "upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    current = rotator("db", "current", "--json")
    assert current.returncode == 0 and '"current": true' in current.stdout
    assert rotator("audit").returncode == 0


# --- the SQLite file ------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_journal_and_its_folders_are_private_whatever_the_umask(
    tmp_path: Path, umask_022: None
) -> None:
    path = tmp_path / "state" / "deep" / "journal.db"
    journal = Journal(f"sqlite:///{path}")
    journal.set_state("prod", "a", attention="x")  # the writer makes -wal and -shm
    try:
        for made in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-writer")):
            assert made.exists() and made.stat().st_mode & 0o777 == 0o600, made
        for folder in (path.parent, path.parent.parent):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
    finally:
        journal.close()


def test_an_existing_journal_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal(f"sqlite:///{path}").close()
    os.chmod(path, 0o644)
    Journal(f"sqlite:///{path}").close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_journal_path_below_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(JournalError) as info:
        Journal(f"sqlite:///{tmp_path / 'afile' / 'sub' / 'journal.db'}")
    text_ = info.value.describe()
    assert "afile" in text_ and "is a file, not a folder" in text_ and "journal.url" in text_


def test_a_journal_path_that_is_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "journal.db").mkdir()
    with pytest.raises(JournalError) as info:
        Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    assert "is a folder" in info.value.describe()


def test_a_corrupt_journal_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(JournalError) as info:
        Journal(f"sqlite:///{path}")
    text_ = info.value.describe()
    assert "not a SQLite database" in text_ and "runbook" in text_


def test_a_missing_folder_is_made(tmp_path: Path) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'a' / 'b' / 'journal.db'}")
    journal.set_state("prod", "a", attention="x")
    assert journal.state("prod", "a") is not None
    journal.close()


# --- helpers --------------------------------------------------------------------------------


def _upgrade_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        migrate.run_scripts(conn, revision)
    engine.dispose()


def _stamp(url: str, revision: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


def _empty(url: str) -> None:
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.mark.postgres
def test_the_runbooks_copy_from_sqlite_to_postgresql_works(tmp_path: Path, pg_url: str) -> None:
    # docs/runbook.md, "From SQLite to PostgreSQL": the script an operator pastes, run as is
    # (on a journal in a temporary folder instead of the pod's volume)
    import re

    runbook = (Path(__file__).resolve().parents[2] / "docs" / "runbook.md").read_text()
    [script] = re.findall(r"python - <<'EOF'\n(.*?)\n\s*EOF", runbook, re.S)
    script = "\n".join(line.removeprefix("   ") for line in script.splitlines())
    source = tmp_path / "journal.db"
    script = script.replace("/var/lib/rotator/journal.db", str(source))
    old = Journal(f"sqlite:///{source}")
    for _ in range(3):
        old.audit(actor="t", action="rotation.promoted", outcome="success", environment="prod")
    old.set_state("prod", "a", current_version_id="v1")
    old.close()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PG_URL": pg_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "audit 3" in proc.stdout
    new = Journal(pg_url)
    try:
        new.audit(actor="t", action="after.copy", outcome="success")  # the sequence moved on
        assert len(new.audit_entries(limit=10)) == 4
        state = new.state("prod", "a")
        assert state is not None and state.current_version_id == "v1"
    finally:
        new.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///{tmp}/afile/journal.db", "is a file, not a folder"),
        ("sqlite:///{tmp}/corrupt.db", "not a SQLite database"),
        ("sqlite:///{tmp}/a/folder/that/is/new/journal.db", None),
    ],
    ids=["below-a-file", "corrupt", "new-folders"],
)
def test_journal_problems_are_clear_errors_on_the_command_line(
    tmp_path: Path, url: str, expected: str | None
) -> None:
    # each ended as "internal error ... this is a bug" (exit 70) or a bare DatabaseError before
    (tmp_path / "afile").write_text("x")
    (tmp_path / "corrupt.db").write_bytes(b"garbage" * 1000)
    config = tmp_path / "rotator.toml"
    config.write_text(
        f'[journal]\nurl = "{url.format(tmp=tmp_path)}"\n'
        '[environments.prod]\nsealing_key = { env = "MIG_SEAL" }\n'
        '[environments.prod.makini]\nclient_id = "c"\nclient_secret_env = "MIG_SECRET"\n'
        '[[environments.prod.backends]]\ntype = "file"\npath = "files"\n'
        'key = { file = "files.key", generate = true }\n'
        '[[environments.prod.credentials]]\nname = "a"\nconnection_id = "conn-a"\n'
    )
    env = {**os.environ, "ROTATOR_CONFIG": str(config)}
    for command in (["plan"], ["status"]):
        proc = subprocess.run(
            [sys.executable, "-m", "rotator", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        if expected is None:
            assert proc.returncode in (0, 3), proc.stderr  # works (status: 3, no token yet)
        else:
            assert proc.returncode not in (0, 70) and expected in proc.stderr, proc.stderr
            assert "journal" in proc.stderr and "next:" in proc.stderr
