"""``make run``: the Makini simulator and ``rotator serve`` on ``config/local.toml``.

Two child processes, the same commands an operator would type; Ctrl-C stops both cleanly: the
children run in sessions of their own (the terminal's Ctrl-C reaches only this process), and
``serve`` gets one SIGTERM and drains (its rotations in flight still need the simulator)
before the simulator is stopped. ``ROTATOR_DEV_CONFIG``, ``ROTATOR_DEV_SIM_PORT`` and
``ROTATOR_DEV_API_PORT`` change the configuration and the ports (the configuration's Makini
URL must name the simulator's port).

Nothing secret is typed or set by hand, so a second shell works as it is: each Makini client
secret the configuration reads from a file (``client_secret_file``, under ``.run/secrets/``
for ``config/local.toml``) is made here on first use (random, mode 0600) and handed to the
simulator as a file too (never on a command line); the sealing and file keys are made by the
rotator itself (``generate = true``). The simulator keeps its connections and tokens in
``.run/makini-sim.json``, so a restarted ``make run`` still knows the tokens the journal holds.
``.run/`` is the folder beside the configuration's folder (``ROTATOR_DEV_RUN_DIR`` changes it).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rotator.errors import RotatorError
from rotator.places import make_private_dirs
from rotator.settings import Config, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = Path(os.environ.get("ROTATOR_DEV_CONFIG", REPO / "config" / "local.toml")).resolve()
SIM_PORT = int(os.environ.get("ROTATOR_DEV_SIM_PORT", "8765"))
API_PORT = int(os.environ.get("ROTATOR_DEV_API_PORT", "8080"))
RUN_DIR = Path(os.environ.get("ROTATOR_DEV_RUN_DIR", CONFIG.parent.parent / ".run")).resolve()


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


def sim_clients(cfg: Config, env: dict[str, str]) -> list[tuple[str, Path]]:
    """Each environment's admin client for the simulator, as (client id, secret file): a
    ``client_secret_file`` the configuration names is made if missing (random, 0600); a
    ``client_secret_env`` not set gets a local value in ``env`` (for the children only)."""
    clients: dict[str, Path] = {}
    for name, settings in cfg.environments.items():
        makini = settings.makini
        if makini.client_secret_file is not None:
            path = makini.client_secret_file
            if not path.exists():
                _write_private(path, secrets.token_urlsafe(32))
        else:
            assert makini.client_secret_env is not None
            value = env.setdefault(makini.client_secret_env, f"local-{name}-secret")
            path = RUN_DIR / "secrets" / f"sim-client-{makini.client_id}"
            _write_private(path, value)
        clients[makini.client_id] = path
    return list(clients.items())


def _write_private(path: Path, text: str) -> None:
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)  # no newline: `curl --data-urlencode name@file` sends it all


def main() -> None:
    for port, what in ((SIM_PORT, "Makini simulator"), (API_PORT, "rotator API")):
        if not _port_free(port):
            sys.exit(
                f"error: port {port} (for the {what}) is in use on 127.0.0.1\n"
                f"  next: stop whatever listens there (ss -ltnp 'sport = :{port}')"
            )
    try:
        cfg = load_config(CONFIG)
    except RotatorError as exc:
        sys.exit(f"error: {exc.describe()}")
    env = dict(os.environ)
    env["ROTATOR_CONFIG"] = str(CONFIG)
    clients = sim_clients(cfg, env)
    rotator = [sys.executable, "-m", "rotator"]
    sim = subprocess.Popen(
        [
            *rotator, "makini-sim", "--port", str(SIM_PORT),
            "--state", str(RUN_DIR / "makini-sim.json"),
            *(arg for client_id, path in clients for arg in ("--client", f"{client_id}:@{path}")),
        ],
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
        cli = f".venv/bin/rotator -c {shown}"
        print(
            f"""
  Makini simulator   http://127.0.0.1:{SIM_PORT}   (tokens it issued: /_sim/tokens, no values)
  rotator API        http://127.0.0.1:{API_PORT}   (docs: /docs; /healthz, /readyz, /metrics)
  journal, keys, secrets and encrypted token files under {RUN_DIR}

  In another shell, from {REPO} (nothing to export: the secrets are files under .run/):
    {cli} status                 each credential, its age, next rotation
    {cli} get prod acme-sap      the current token (for scripts)
    {cli} rotate prod acme-sap   rotate now
    {cli} verify prod            check the current tokens with Makini
    {cli} audit                  who did what, when

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
