"""The ``rotator`` command as a subprocess, for the end-to-end suites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class RotatorCli:
    """Runs ``python -m rotator`` in ``folder`` on the configuration ``config_text``, with
    ``env`` added to the environment. Every output but ``get``'s (which prints a token on
    purpose) is kept in ``outputs``, so a test can check that no token leaked into any."""

    def __init__(self, folder: Path, config_text: str, env: dict[str, str]) -> None:
        self.dir = folder
        self.config = folder / "rotator.toml"
        self.config.write_text(config_text)
        self.env = {**os.environ, **env, "ROTATOR_CONFIG": str(self.config), "COLUMNS": "200"}
        self.env.pop("ROTATOR_FAULT_KILL_AFTER", None)
        self.outputs: list[str] = []

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rotator", *args]

    def start(self, *args: str) -> subprocess.Popen[str]:
        """The command in the background (text pipes), for a test that acts while it runs."""
        return subprocess.Popen(
            self.argv(*args),
            env=self.env,
            cwd=self.dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
            cwd=self.dir,
        )
        if args[0] != "get":
            self.outputs.append(proc.stdout + proc.stderr)
        return proc
