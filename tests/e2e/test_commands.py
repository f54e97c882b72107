"""Every command module of ``rotator/cli`` registers its commands on the one ``rotator`` app.

A module registers by being imported (``app.command`` / ``app.add_typer`` at import time), so a
dropped import loses its commands silently; checked in a fresh process, where no test has
imported the module already."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_every_command_module_is_registered() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rotator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    _, _, commands = proc.stdout.partition("Commands")
    listed = {m.group(1) for m in re.finditer(r"^[│ ]+([a-z][a-z-]*)  ", commands, re.M)}
    # app.py, keys.py, revoke.py, journal.py (db, unaccounted), ops.py (sync, doctor)
    expected = {"rotate", "run-due", "status", "keys", "revoke", "db", "unaccounted", "sync"}
    assert expected | {"doctor"} <= listed, proc.stdout
