"""The light commands stay light: ``rotator --help``, ``keygen``, ``get`` and ``status`` (file
backend, SQLite journal) run as a subprocess, and none of them may import the server's modules.
Start-up time itself is measured by ``bench/bench_cli.py``, not asserted here: a heavy import
that creeps back fails this test on any machine, however fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from rotator.crypto import generate_key
from tests.factories import (
    config_toml,
    credentials,
    environment_table,
    file_backend,
    store_token,
)

if TYPE_CHECKING:
    from rich.console import Console

pytestmark = pytest.mark.e2e

SERVER = (
    "sqlalchemy", "alembic", "psycopg", "httpx", "httpcore", "fastapi", "starlette", "uvicorn",
    "boto3", "botocore", "hvac", "azure", "apscheduler", "prometheus_client", "structlog",
    "stamina", "aiohttp", "requests",
)  # fmt: skip
"""Top-level packages no light command needs."""


# ``rotator ARGS`` as the console script runs it (``python -m rotator``), then every module in
# ``sys.modules`` at exit, one a line, to the file named first (``-X importtime`` misses the
# modules importlib.import_module loads, such as a backend's entry point)
RUN = """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
runpy.run_module("rotator", run_name="__main__", alter_sys=True)
"""


def imported(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[
    subprocess.CompletedProcess[str], set[str]
]:
    """Run ``rotator ARGS`` as the console script does: its result, and the top-level packages
    it imported (and, in :data:`MODULES`, every module by its full name)."""
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "modules"
        proc = subprocess.run(
            [sys.executable, "-c", RUN, str(listing), *args],
            env={**os.environ, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        modules = set(listing.read_text().split())
    assert "rotator.cli" in modules, proc.stderr[-2000:]  # the listing was written
    MODULES[args] = modules
    return proc, {module.split(".")[0] for module in modules}


MODULES: dict[tuple[str, ...], set[str]] = {}
"""Every module the last run of each command line imported, by its full name."""


def file_config(tmp_path: Path, *names: str) -> tuple[Path, dict[str, str]]:
    """A configuration of one environment, prod, holding ``names`` on a file backend and a
    SQLite journal, its Makini unreachable; the variables a ``rotator`` run on it needs."""
    config = tmp_path / "rotator.toml"
    config.write_text(
        config_toml(
            "sqlite:///journal.db",
            {
                "prod": environment_table(
                    "http://127.0.0.1:9",
                    "startup-prod",
                    credentials(*names),
                    sealing_env="STARTUP_SEAL",
                    secret_env="STARTUP_SECRET",
                    backends=[file_backend("files/prod", "keys/prod-file.key")],
                )
            },
        )
    )
    return config, {"ROTATOR_CONFIG": str(config), "STARTUP_SEAL": generate_key()}


def test_help_imports_nothing_but_typer_and_the_command_modules() -> None:
    proc, packages = imported("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage: rotator" in proc.stdout
    # not even the configuration's or the sealing's libraries, nor rich: help is plain text
    assert packages & {*SERVER, "pydantic", "pydantic_settings", "cryptography", "rich"} == set()


def test_keygen_prints_a_key_without_the_server_or_the_cipher() -> None:
    proc, packages = imported("keygen")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip()) == 44  # 32 bytes, base64
    # nor the configuration's library: typer's pydantic adapters are not built (rotator.cli.command)
    assert packages & {*SERVER, "cryptography", "pydantic"} == set()


def test_get_on_a_file_backend_reads_it_without_journal_makini_client_or_logging(
    tmp_path: Path,
) -> None:
    config, env = file_config(tmp_path, "acme-sap")  # no Makini is called to read a token
    token = "startup-" + os.urandom(16).hex()

    store_token(config, "prod", "acme-sap", token)

    proc, packages = imported("get", "prod", "acme-sap", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == token
    assert packages & {*SERVER, "pydantic_settings"} == set()  # four variables need no library
    assert not (tmp_path / "journal.db").exists()  # the journal was not even opened
    # nor the whole configuration's models (rotator.readconfig validates what a read uses),
    # nor the modules of backends it does not use, nor the commands it does not run
    assert MODULES["get", "prod", "acme-sap"] & {
        "rotator.settings", "rotator.notify.settings", "backends.aws", "backends.vault",
        "backends.azure", "rotator.rotation.discovery",
    } == set()  # fmt: skip

    # the light path keeps get's errors: an unknown credential is named, exit non-zero
    missing, packages = imported("get", "prod", "nope", env=env, cwd=tmp_path)
    assert missing.returncode != 0
    assert "nope" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_status_reads_the_journal_and_the_backends_without_sqlalchemy_makini_or_the_server(
    tmp_path: Path,
) -> None:
    config, env = file_config(tmp_path, "acme-sap", "globex-fiix")  # status calls no Makini
    version_id = store_token(config, "prod", "acme-sap", "t" * 40)

    # a journal that does not exist yet is the runtime's to create and migrate: the first
    # status opens it (whatever it imports), the next ones only read it
    first, _ = imported("status", "--json", env=env, cwd=tmp_path)
    assert (tmp_path / "journal.db").exists()
    proc, packages = imported("status", "--json", env=env, cwd=tmp_path)
    assert packages & {*SERVER, "pydantic_settings", "alembic"} == set()
    # the same rows and the same verdict as the runtime's: exit 3, neither credential has a
    # token the journal knows (acme-sap's backend holds one the journal never recorded)
    assert first.returncode == proc.returncode == 3, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    due_now = [{**r, "next_at": None} for r in rows]  # "now", a moment later
    assert due_now == [{**r, "next_at": None} for r in json.loads(first.stdout)]
    assert [(r["credential"], r["next_action"]) for r in rows] == [
        ("acme-sap", "rotate"),
        ("globex-fiix", "rotate"),
    ]
    assert rows[0]["backends"] == {"file": version_id}
    assert rows[0]["backends_agree"] is False  # the journal knows of no current version
    assert rows[1]["backends"] == {"file": None} and rows[1]["backends_agree"] is True
    assert "Traceback" not in proc.stderr

    # an unknown environment is still named, exit non-zero, no traceback
    unknown, _ = imported("status", "nope", env=env, cwd=tmp_path)
    assert unknown.returncode not in (0, 3) and "nope" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_the_consoles_made_at_first_use_drive_a_progress_bar_like_rich_ones() -> None:
    # render's consoles are made when first used (so that importing it costs nothing); what
    # rich needs the object itself for (a Progress's Live, a `with` block) gets the real one
    import io

    from rotator.cli import render

    out = io.StringIO()
    lazy = render.LazyConsole(file=out, force_terminal=True, width=60)
    original, render.err = render.err, cast("Console", lazy)
    try:
        with render.progress(False, label="rotating", total=3) as tick:
            assert tick is not None
            for i in range(3):
                tick(i)
        with render.err:
            render.err.print("after the bar")
    finally:
        render.err = original
    assert "3/3" in out.getvalue()
    assert "after the bar" in out.getvalue()
