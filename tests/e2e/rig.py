"""The ``rotator`` command (a subprocess) against the simulator (a socket), with two file
backends, in one of the two ways Makini may treat a connection's older tokens:

* **A**: issuing a token kills the connection's other tokens (sim and config
  ``issue_invalidates_previous = true``), and there is no revocation path;
* **B**: older tokens stay valid (``issue_invalidates_previous = false``) and the account has a
  revocation path (sim ``revoke_endpoint``, config ``makini.revoke_path``).

Shared by the crash-point suite and the unaccounted-token suite. Tokens are compared by
fingerprint; values are read in this process only, to check that no output holds one.
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import backends
from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from rotator.model import StoredVersion, fingerprint
from rotator.settings import load_config
from tests.cli import RotatorCli
from tests.factories import SHORT_RETRY, config_toml, credentials, environment_table, file_backend

REVOKE_PATH = "/api/system/tokens/revoke"
KILLED = -signal.SIGKILL


@dataclass(frozen=True)
class Mode:
    name: str
    invalidates: bool
    """Issuing a token kills the connection's other tokens."""
    revoke_path: bool
    """The account has a token revocation path."""

    def sim_options(self) -> dict[str, Any]:
        return {
            "issue_invalidates_previous": self.invalidates,
            "revoke_endpoint": self.revoke_path,
        }

    def makini(self) -> dict[str, Any]:
        """The configuration's Makini settings for this mode."""
        table: dict[str, Any] = {"issue_invalidates_previous": self.invalidates}
        if self.revoke_path:
            table["revoke_path"] = REVOKE_PATH
        return table


A = Mode("A-issue-kills-old", invalidates=True, revoke_path=False)
B = Mode("B-old-stays-revoke-path", invalidates=False, revoke_path=True)
MODES = (A, B)


def kill_at(point: str, name: str) -> dict[str, str]:
    """The environment that makes the command SIGKILL itself at ``point`` for ``name``."""
    return {"ROTATOR_FAULT_KILL_AFTER": f"{point}:{name}"}


class Rig(RotatorCli):
    """One environment, ``prod``, with a credential per name (connection ``conn-<name>``)."""

    def __init__(
        self,
        tmp_path: Path,
        sim: SimServer,
        mode: Mode,
        names: list[str],
        *,
        lock_ttl: str = "1s",
        grace: str = "0s",
    ) -> None:
        sim.set(**mode.sim_options())
        self.sim = sim
        self.mode = mode
        prod = environment_table(
            sim.url,
            "test-prod",
            credentials(*names),
            sealing_env="RIG_PROD_SEAL",
            secret_env="RIG_PROD_SECRET",
            backends=[
                file_backend("files/one", "keys/one.key", "primary"),
                file_backend("files/two", "keys/two.key", "replica"),
            ],
            retry=SHORT_RETRY,
            makini=mode.makini(),
            schedule={"interval": "1h", "grace_period": grace},
        )
        text = config_toml({"url": "sqlite:///journal.db", "lock_ttl": lock_ttl}, {"prod": prod})
        super().__init__(
            tmp_path,
            text,
            {"RIG_PROD_SEAL": generate_key(), "RIG_PROD_SECRET": "test-prod-secret"},
        )

    @staticmethod
    def connection(name: str) -> str:
        return f"conn-{name}"

    def ok(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = self(*args, env=env)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc

    def killed(self, point: str, name: str, *args: str) -> None:
        """Run the command, which must die at ``point`` (the point is passed)."""
        proc = self(*args, env=kill_at(point, name))
        assert proc.returncode == KILLED, (point, name, proc.returncode, proc.stdout, proc.stderr)

    # --- what the backends hold (read in this process) -----------------------------------

    def _backends(self) -> list[backends.Backend]:
        env = load_config(self.config).environment("prod")
        return [backends.build(s, "prod") for s in env.backend_settings]

    def currents(self, name: str) -> list[StoredVersion | None]:
        """The current version in each backend, in order."""
        found = []
        for backend in self._backends():
            try:
                found.append(backend.read(name))
            finally:
                backend.close()
        return found

    def current(self, name: str) -> StoredVersion:
        """The current version, the same in every backend."""
        versions = self.currents(name)
        ids = {v.version_id if v else None for v in versions}
        assert len(ids) == 1 and None not in ids, (name, ids)
        assert versions[0] is not None
        return versions[0]

    def readable(self, name: str, version_id: str) -> list[str]:
        """The backends where ``version_id`` can still be read."""
        out = []
        for backend in self._backends():
            try:
                if backend.read_version(name, version_id) is not None:
                    out.append(backend.name)
            finally:
                backend.close()
        return out

    # --- what Makini (the simulator) says ------------------------------------------------

    def live(self, name: str) -> set[str]:
        """Fingerprints of the connection's tokens Makini accepts (access and refresh)."""
        return {t["fingerprint"] for t in self.sim.tokens(self.connection(name), status="active")}

    def status_at_makini(self, token: str | None) -> str | None:
        if token is None:
            return None
        view = self.sim.token(fingerprint(token))
        assert view is not None
        return str(view["status"])

    # --- what the rotator says -----------------------------------------------------------

    def status(self) -> tuple[int, dict[str, dict[str, Any]]]:
        proc = self("status", "--json")
        assert "Traceback" not in proc.stderr
        rows = {r["credential"]: r for r in json.loads(proc.stdout)}
        return proc.returncode, rows

    def audit(self, action: str | None = None) -> list[dict[str, Any]]:
        args = ["audit", "--json", "--limit", "10000"] + (["--action", action] if action else [])
        rows: list[dict[str, Any]] = json.loads(self.ok(*args).stdout)
        return rows

    def unaccounted(self, *, closed: bool = False) -> list[dict[str, Any]]:
        args = ["unaccounted", "list", "prod", "--json"] + (["--all"] if closed else [])
        rows: list[dict[str, Any]] = json.loads(self.ok(*args).stdout)
        return rows

    def assert_no_token_leaked(self, tokens: set[str]) -> None:
        """No output of any command, no file and not the journal holds a token in plain."""
        assert tokens
        for text in self.outputs:
            for token in tokens:
                assert token not in text
        for path in [*(self.dir / "files").rglob("*"), self.dir / "journal.db"]:
            if path.is_file():
                data = path.read_bytes()
                for token in tokens:
                    assert token.encode() not in data


def values(version: StoredVersion) -> set[str]:
    """The token values of a version (access, and refresh where there is one)."""
    out = {version.tokens.access.reveal()}
    if version.tokens.refresh is not None:
        out.add(version.tokens.refresh.reveal())
    return out


def fingerprints(version: StoredVersion) -> set[str]:
    return {fingerprint(v) for v in values(version)}
