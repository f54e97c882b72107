"""``rotator serve`` at scale: N credentials in one environment (file backend, SQLite or
PostgreSQL journal, the simulator in its own process at 20 ms a call), in one run:

    .venv/bin/python -m bench.bench_serve [--credentials 10000] [--latency-ms 20] [--starts 2]
        [--settle 15] [--idle 30] [--tick 10s] [--postgres] [--before REV]

Setup (not timed against the targets): the configuration lists N credentials; one
``rotator run-due`` gives each its first token with the simulator at 0 ms; then the simulator
goes to ``--latency-ms``. Each start of ``rotator serve`` runs on a fresh copy of that journal
and backend, and prints:

- *ready*: from the process's start until ``/readyz`` answers 200, and until a token read of a
  credential picked at random also answers 200 (the target: both under 3 s), with the CPU
  seconds the process had used by then (less sensitive to other load than the wall time); the
  version read is checked against the journal's current one;
- *settle CPU*: the CPU seconds used in the ``--settle`` seconds after ready (what it reads after
  ready, the scheduler's first tick);
- *idle*: the share of one core over the next ``--idle`` seconds (utime + stime from
  ``/proc/PID/stat``; the target: under 1%), with ``scheduler.tick`` as given (``--tick 1h``
  leaves the scheduler out of the window);
- *RSS* at the end of the idle window, and its peak (``VmHWM``; the target: under 200 MB idle).

``--before REV``: the A/B in one run. The setup runs on REV's code (a worktree under ``.ab/``,
as ``bench.ab`` makes), so both codes can open the journal (this checkout migrates its copy at
start, which its first ready figure includes), and the starts alternate A (REV), B (this
checkout), B, A, ...

``--postgres`` uses a fresh database on the server at 127.0.0.1:5432 (``ROTATOR_BENCH_PG``: an
admin URL whose user may create databases), copied per start with ``CREATE DATABASE ...
TEMPLATE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.simulator import simulator
from rotator.crypto import generate_key

CLIENT, SECRET = "bench-prod", "bench-prod-secret"
PG_ADMIN = os.environ.get("ROTATOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Journals:
    """Where each copy's journal lives: files in its folder, or PostgreSQL databases."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        self.made: list[str] = []

    def url(self, folder: Path, template: str | None = None) -> str:
        if not self.postgres:
            return "sqlite:///journal.db"  # relative to the folder: a copied folder is a copy
        import psycopg

        name = f"rotator_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            copy = f' TEMPLATE "{template}"' if template else ""
            admin.execute(f'CREATE DATABASE "{name}"{copy}')
        self.made.append(name)
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return f"{base}/{name}"

    def drop_all(self) -> None:
        if not self.postgres:
            return
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            for name in self.made:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(folder: Path, journal: str, url: str, count: int, tick: str) -> Path:
    lines = [
        "[journal]",
        f'url = "{journal}"',
        "[scheduler]",
        f'tick = "{tick}"',
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


def python_env(env: dict[str, str], tree: Path) -> dict[str, str]:
    """``env`` running ``tree``'s code (its modules first on the path)."""
    return {**env, "PYTHONPATH": str(tree)}


def rotator(env: dict[str, str], cwd: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "rotator", *args], env=env, cwd=cwd, capture_output=True
    )
    if out.returncode != 0:
        raise SystemExit(f"rotator {' '.join(args)} failed: {out.stderr.decode()[-2000:]}")
    return out.stdout.decode()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def current_versions(url: str, folder: Path) -> dict[str, str | None]:
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{folder / url.removeprefix('sqlite:///')}"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT credential, current_version_id FROM credential_state")
            )
            return {cred: vid for cred, vid in rows}
    finally:
        engine.dispose()


def start_serve(
    folder: Path, env: dict[str, str], url: str, args: argparse.Namespace
) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    versions = current_versions(url, folder)
    name = f"c{random.randrange(args.credentials):05d}"
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
        with httpx.Client(timeout=60) as http:
            while "read" not in figures:
                if proc.poll() is not None:
                    raise SystemExit(f"rotator serve exited {proc.returncode}: see serve.log")
                with contextlib.suppress(httpx.TransportError):
                    if "readyz" not in figures and http.get(f"{base}/readyz").status_code == 200:
                        figures["readyz"] = time.perf_counter() - started
                    if "readyz" in figures:
                        got = http.get(
                            f"{base}/v1/tokens/prod/{name}",
                            headers={"Authorization": f"Bearer {env['BENCH_KEY']}"},
                        )
                        if got.status_code == 200:
                            figures["read"] = time.perf_counter() - started
                            figures["ready_cpu"] = cpu_s(proc.pid)
                            if got.json()["version"] != versions[name]:
                                raise SystemExit(f"served a version of {name} not current")
                time.sleep(0.02)
        time.sleep(args.settle)
        settled = cpu_s(proc.pid)
        figures["settle_cpu"] = settled - figures["ready_cpu"]
        window_start = time.perf_counter()
        time.sleep(args.idle)
        used = cpu_s(proc.pid) - settled
        figures["idle_pct"] = 100 * used / (time.perf_counter() - window_start)
        figures["rss"], figures["hwm"] = memory_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--starts", type=int, default=2, help="starts of each code")
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--tick", default="10s", help="scheduler.tick (the default: 10s)")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--before", help="the older commit: an A/B in one run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    trees = {"B": ROOT}
    if args.before:
        from bench.ab import worktree

        trees = {"A": worktree(args.before), "B": ROOT}
    setup_tree = trees.get("A", ROOT)
    journals = Journals(args.postgres)
    port = free_port()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp,
            simulator(port, 0, f"{CLIENT}:{SECRET}") as sim_url,
        ):
            template = Path(tmp) / "template"
            template.mkdir()
            url = journals.url(template)
            write_config(template, url, sim_url, args.credentials, args.tick)
            env = {
                **os.environ,
                "ROTATOR_CONFIG": "rotator.toml",
                "BENCH_SEAL": generate_key(),
                "BENCH_SECRET": SECRET,
            }
            began = time.perf_counter()
            rotator(python_env(env, setup_tree), template, "run-due", "--json")
            held = sum(v is not None for v in current_versions(url, template).values())
            env["BENCH_KEY"] = json.loads(
                rotator(
                    python_env(env, setup_tree),
                    template,
                    *("keys", "create", "prod", "--name", "bench", "--json"),
                )
            )["key"]
            httpx.patch(f"{sim_url}/_sim/options", json={"latency_ms": args.latency_ms})
            print(
                f"{args.credentials} credentials ({held} with a token; first tokens "
                f"{time.perf_counter() - began:.1f} s), "
                f"{'PostgreSQL' if args.postgres else 'SQLite'} journal, file backend, "
                f"simulator {args.latency_ms:.0f} ms a call, scheduler.tick {args.tick}",
                flush=True,
            )
            order = list(trees)
            results: list[dict[str, object]] = []
            for n in range(args.starts):
                for label in order if n % 2 == 0 else reversed(order):
                    folder = Path(tmp) / f"{label}-{n}"
                    shutil.copytree(template, folder)
                    copy = journals.url(folder, url.rsplit("/", 1)[1]) if args.postgres else url
                    write_config(folder, copy, sim_url, args.credentials, args.tick)
                    f = start_serve(folder, python_env(env, trees[label]), copy, args)
                    results.append({"code": label, **f})
                    print(
                        f"  {label} start {n + 1}: ready {f['readyz']:5.2f} s /readyz, "
                        f"{f['read']:5.2f} s token read ({f['ready_cpu']:4.2f} s CPU)   "
                        f"settle CPU {f['settle_cpu']:5.2f} s in {args.settle:g} s   "
                        f"idle {f['idle_pct']:5.2f}% of a core over {args.idle:g} s   "
                        f"RSS {f['rss']:4.0f} MB (peak {f['hwm']:.0f} MB)",
                        flush=True,
                    )
                    shutil.rmtree(folder, ignore_errors=True)
            if args.json:
                print(json.dumps(results))
    finally:
        journals.drop_all()


if __name__ == "__main__":
    main()
