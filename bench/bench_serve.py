"""``rotator serve`` at scale: N credentials in one environment (file backend, SQLite or
PostgreSQL journal, the simulator in its own process at 20 ms a call), in one run:

    .venv/bin/python -m bench.bench_serve [--credentials 10000] [--latency-ms 20] [--starts 2]
        [--settle 15] [--idle 30] [--postgres]

Setup (not timed against the targets): the configuration lists N credentials; one
``rotator run-due`` gives each its first token with the simulator at 0 ms; then the simulator
goes to ``--latency-ms``. Each start of ``rotator serve`` (``--starts``, on the same journal:
the later ones are restarts) prints:

- *ready*: from the process's start until ``/readyz`` answers 200, and until a token read of a
  credential picked at random also answers 200 (the target: both under 3 s); the version read
  is checked against the journal's current one;
- *settle CPU*: the CPU seconds the process used in the ``--settle`` seconds after ready
  (loading what it loads after ready, the scheduler's first tick);
- *idle CPU*: the share of one core over the next ``--idle`` seconds (utime + stime from
  ``/proc/PID/stat``; the target: under 1%);
- *RSS* at the end of the idle window, and its peak (``VmHWM``; the target: under 200 MB idle).

``--postgres`` uses a fresh database on the server at 127.0.0.1:5432 (``ROTATOR_BENCH_PG``: an
admin URL whose user may create databases). Runs on older commits too (``bench.ab
--same-script``): it only drives the command line and HTTP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.simulator import simulator
from rotator.crypto import generate_key

CLIENT, SECRET = "bench-prod", "bench-prod-secret"
PG_ADMIN = os.environ.get("ROTATOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
TICK_S = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def journal_url(folder: Path, postgres: bool) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{folder / 'journal.db'}"
        return
    import psycopg

    name = f"rotator_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(folder: Path, journal: str, url: str, count: int) -> Path:
    lines = [
        "[journal]",
        f'url = "{journal}"',
        "[logging]",
        'level = "warning"',
        "[environments.prod]",
        'sealing_key = { env = "BENCH_SEAL" }',
        "[environments.prod.makini]",
        f'base_url = "{url}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_SECRET"',
        "max_concurrency = 32",
        "[environments.prod.schedule]",
        'interval = "30d"',
        'grace_period = "0s"',
        "[[environments.prod.backends]]",
        'type = "file"',
        'path = "files"',
        'key = { file = "file.key", generate = true }',
    ]
    for i in range(count):
        lines += [
            "[[environments.prod.credentials]]",
            f'name = "c{i:05d}"',
            f'connection_id = "bench-{i:05d}"',
        ]
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rotator(env: dict[str, str], cwd: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "rotator", *args], env=env, cwd=cwd, capture_output=True
    )
    if out.returncode != 0:
        raise SystemExit(f"rotator {' '.join(args)} failed: {out.stderr.decode()[-2000:]}")
    return out.stdout.decode()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S  # utime, stime


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def current_versions(url: str) -> dict[str, str | None]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT credential, current_version_id FROM credential_state")
            )
            return {cred: vid for cred, vid in rows}
    finally:
        engine.dispose()


def start_serve(folder: Path, env: dict[str, str], url: str, count: int) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    versions = current_versions(url)
    name = f"c{random.randrange(count):05d}"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rotator", "serve", "--port", str(port)],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=(folder / "serve.log").open("ab"),
    )
    figures: dict[str, float] = {}
    try:
        with httpx.Client(timeout=30) as http:
            while "read" not in figures:
                if proc.poll() is not None:
                    raise SystemExit(f"rotator serve exited {proc.returncode}: see serve.log")
                try:
                    if "readyz" not in figures and http.get(f"{base}/readyz").status_code == 200:
                        figures["readyz"] = time.perf_counter() - started
                    if "readyz" in figures:
                        got = http.get(
                            f"{base}/v1/tokens/prod/{name}",
                            headers={"Authorization": f"Bearer {env['BENCH_KEY']}"},
                        )
                        if got.status_code == 200:
                            figures["read"] = time.perf_counter() - started
                            if got.json()["version"] != versions[name]:
                                raise SystemExit(f"served a version of {name} not current")
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
        ready_cpu = cpu_s(proc.pid)
        time.sleep(args_settle)
        settled = cpu_s(proc.pid)
        figures["settle_cpu"] = settled - ready_cpu
        window_start = time.perf_counter()
        time.sleep(args_idle)
        figures["idle_pct"] = (
            100 * (cpu_s(proc.pid) - settled) / (time.perf_counter() - window_start)
        )
        figures["rss"], figures["hwm"] = memory_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return figures


args_settle = 15.0
args_idle = 30.0


def main() -> None:
    global args_settle, args_idle
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args_settle, args_idle = args.settle, args.idle
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
        simulator(port, 0, f"{CLIENT}:{SECRET}") as sim_url,
        journal_url(Path(tmp), args.postgres) as url,
    ):
        folder = Path(tmp)
        config = write_config(folder, url, sim_url, args.credentials)
        env = {
            **os.environ,
            "ROTATOR_CONFIG": str(config),
            "BENCH_SEAL": generate_key(),
            "BENCH_SECRET": SECRET,
        }
        began = time.perf_counter()
        rotator(env, folder, "run-due", "--json")
        held = sum(v is not None for v in current_versions(url).values())
        env["BENCH_KEY"] = json.loads(
            rotator(env, folder, "keys", "create", "prod", "--name", "bench", "--json")
        )["key"]
        httpx.patch(f"{sim_url}/_sim/options", json={"latency_ms": args.latency_ms})
        journal = "PostgreSQL" if args.postgres else "SQLite"
        print(
            f"{args.credentials} credentials ({held} with a token; first tokens "
            f"{time.perf_counter() - began:.1f} s), {journal} journal, file backend, "
            f"simulator {args.latency_ms:.0f} ms a call"
        )
        results = []
        for n in range(args.starts):
            f = start_serve(folder, env, url, args.credentials)
            results.append(f)
            print(
                f"  start {n + 1}: ready {f['readyz']:5.2f} s (/readyz), {f['read']:5.2f} s "
                f"(token read)   settle CPU {f['settle_cpu']:5.2f} s in {args.settle:g} s   "
                f"idle {f['idle_pct']:5.2f}% of a core over {args.idle:g} s   "
                f"RSS {f['rss']:5.0f} MB (peak {f['hwm']:.0f} MB)",
                flush=True,
            )
        if args.json:
            print(json.dumps(results))


if __name__ == "__main__":
    main()
