"""``make run``: the Makini simulator and ``rotator serve`` on ``config/local.toml``.

Two child processes, the same commands an operator would type; Ctrl-C stops both cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "local.toml"
SIM_PORT = 8765
API_PORT = 8080


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the {what} exited with code {proc.returncode}; see its output above")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    sys.exit(f"error: the {what} did not answer at {url} within 20 s")


def main() -> None:
    for port, what in ((SIM_PORT, "Makini simulator"), (API_PORT, "rotator API")):
        if not _port_free(port):
            sys.exit(
                f"error: port {port} (for the {what}) is in use on 127.0.0.1\n"
                f"  next: stop whatever listens there (ss -ltnp 'sport = :{port}')"
            )
    env = dict(os.environ)
    env.setdefault("MAKINI_PROD_CLIENT_SECRET", "local-prod-secret")
    env.setdefault("MAKINI_DEV_CLIENT_SECRET", "local-dev-secret")
    env["ROTATOR_CONFIG"] = str(CONFIG)
    rotator = [sys.executable, "-m", "rotator"]
    sim = subprocess.Popen([*rotator, "makini-sim", "--port", str(SIM_PORT)], env=env)
    serve: subprocess.Popen[bytes] | None = None
    try:
        _wait_http(f"http://127.0.0.1:{SIM_PORT}/_sim/connections", sim, "Makini simulator")
        serve = subprocess.Popen([*rotator, "serve", "--port", str(API_PORT)], env=env)
        _wait_http(f"http://127.0.0.1:{API_PORT}/healthz", serve, "rotator")
        cli = f"{REPO / '.venv/bin/rotator'} -c {CONFIG.relative_to(REPO)}"
        print(
            f"""
  Makini simulator   http://127.0.0.1:{SIM_PORT}   (tokens it issued: /_sim/tokens, no values)
  rotator API        http://127.0.0.1:{API_PORT}   (/healthz, /readyz)
  journal, keys and encrypted token files under .run/

  In another shell, from {REPO}:
    {cli} status            each credential, its age, next rotation, backends
    {cli} get prod acme-sap the current token (for scripts)
    {cli} audit             who did what
    {cli} plan              what is due next

  Rotations run every 30-60 s. Ctrl-C stops both.
""",
            flush=True,
        )
        serve.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (serve, sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (serve, sim):
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
