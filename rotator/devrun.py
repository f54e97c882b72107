"""``make run``: the Makini simulator and ``rotator serve`` on ``config/local.toml``.

Two child processes, the same commands an operator would type; Ctrl-C stops both cleanly: the
children run in sessions of their own (the terminal's Ctrl-C reaches only this process), and
``serve`` gets one SIGTERM and drains (its rotations in flight still need the simulator)
before the simulator is stopped. ``ROTATOR_DEV_CONFIG``, ``ROTATOR_DEV_SIM_PORT`` and
``ROTATOR_DEV_API_PORT`` change the configuration and the ports (the configuration's Makini
URL must name the simulator's port).
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
CONFIG = Path(os.environ.get("ROTATOR_DEV_CONFIG", REPO / "config" / "local.toml")).resolve()
SIM_PORT = int(os.environ.get("ROTATOR_DEV_SIM_PORT", "8765"))
API_PORT = int(os.environ.get("ROTATOR_DEV_API_PORT", "8080"))


def _die_with_this_process() -> None:
    """In a child, before it runs: SIGTERM when ``make run`` dies, however it dies (a kill -9
    would otherwise leave serve and the simulator holding the ports). Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
    sim = subprocess.Popen(
        [*rotator, "makini-sim", "--port", str(SIM_PORT)],
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_this_process,  # safe: this process has one thread
    )
    serve: subprocess.Popen[bytes] | None = None
    try:
        _wait_http(f"http://127.0.0.1:{SIM_PORT}/_sim/connections", sim, "Makini simulator")
        serve = subprocess.Popen(
            [*rotator, "serve", "--port", str(API_PORT)],
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_this_process,  # safe: this process has one thread
        )
        _wait_http(f"http://127.0.0.1:{API_PORT}/healthz", serve, "rotator")
        shown = CONFIG.relative_to(REPO) if CONFIG.is_relative_to(REPO) else CONFIG
        cli = f"{REPO / '.venv/bin/rotator'} -c {shown}"
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
        print("\nstopping: rotations in flight finish first", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the drain
        for proc in (serve, sim):  # serve first: it drains against the simulator
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
