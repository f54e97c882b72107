"""Discovery at scale: N connections at the simulator (in a process of its own, 20 ms a call,
100 a page), listed and enrolled in one environment (file backend, SQLite journal), in one run:

    .venv/bin/python -m bench.bench_discovery [--connections 10000] [--latency-ms 20]
        [--first-tokens] [--max-concurrency 32] [--concurrency 64] [--processes auto]

Prints the listing alone (the Makini calls: the lower bound), a first discovery (list, compute,
record 2 rows a connection, make them effective), a second one (nothing changes), ``status``
over the enrolled credentials (in this process, then ``rotator status --json`` as a command: its
imports, the configuration and the rows printed included) and, with ``--first-tokens``, the
first tokens of all of them as a CronJob gives them: ``rotator run-due`` as a subprocess (it
discovers first, finds nothing new, and forks ``scheduler.processes`` workers sharing
``scheduler.concurrency`` rotations in flight and ``makini.max_concurrency`` calls at Makini at
once), beside the same run's lower bound: the Makini calls alone (issue
+ verify per credential, the same client at the same concurrency). Targets (issue 18):
discovery of 10,000 under 10 s; first tokens for 10,000 under 60 s; ``status`` under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import backends
import rotator
from bench.bench_rotation import run_due
from bench.simulator import cpu_seconds, makini_calls_alone, peak_inflight, simulator
from rotator import logs
from rotator.crypto import generate_key
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from rotator.rotation.status import collect
from rotator.settings import load_config

CLIENT, SECRET = "bench", "bench-secret"


def _write_config(
    folder: Path, sim_url: str, max_concurrency: int, processes: str, concurrency: int = 64
) -> Path:
    lines = [
        "[journal]",
        'url = "sqlite:///journal.db"',
        "[scheduler]",
        f"concurrency = {concurrency}",
        f"processes = {processes if processes.isdigit() else repr(processes)}",
        "[environments.prod]",
        'sealing_key = { env = "BENCH_DISC_SEAL" }',
        "[environments.prod.makini]",
        f'base_url = "{sim_url}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_DISC_SECRET"',
        f"max_concurrency = {max_concurrency}",
        "[[environments.prod.backends]]",
        'type = "file"',
        'path = "files"',
        'key = { file = "file.key", generate = true }',
        "[environments.prod.discover]",
        "enabled = true",
    ]
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _discovery(config: Path) -> None:
    runtime = Runtime.open(load_config(config))
    try:
        client = runtime.environments["prod"].makini
        await client.check_admin()
        started = time.perf_counter()
        listing = await client.connections()
        print(f"listing alone (Makini calls):  {time.perf_counter() - started:6.2f} s  "
              f"({len(listing.items)} connections)")
        started = time.perf_counter()
        change = await discovery.discover(runtime, "prod", first_tokens=False)
        print(f"first discovery (enrol):       {time.perf_counter() - started:6.2f} s  "
              f"({len(change.new)} enrolled)")
        started = time.perf_counter()
        again = await discovery.discover(runtime, "prod", first_tokens=False)
        print(f"second discovery (no change):  {time.perf_counter() - started:6.2f} s  "
              f"({len(again.kept)} kept)")
        started = time.perf_counter()
        rows = await collect(runtime, "prod")
        print(f"status of the enrolled:        {time.perf_counter() - started:6.2f} s  "
              f"({len(rows)} rows, in this process)")
    finally:
        await runtime.aclose()


def _status_command(config: Path, label: str = "") -> None:
    """``rotator status --json`` as a person runs it (a subprocess, byte-compiled code) on the
    journal discovery filled: the median of 3 runs. ``label``: what the line adds (after the
    first tokens, each credential's token is read from the file backend)."""
    for package in (rotator, backends):
        compileall.compile_dir(Path(str(package.__file__)).parent, quiet=1)
    walls, cpus, rows, code = [], [], 0, 0
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "rotator", "-c", str(config), "status", "--json"],
            capture_output=True, text=True, cwd=config.parent,
        )
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        rows = len(json.loads(proc.stdout)) if proc.stdout.strip() else 0
        code = proc.returncode
    said = f"{label}:"
    print(f"`rotator status --json`{said:<9}{statistics.median(walls):6.2f} s  "
          f"(CPU {statistics.median(cpus):.2f} s; {rows} rows, exit {code}, median of 3, "
          "imports included)")


def _first_tokens(config: Path, url: str, args: argparse.Namespace) -> None:
    env = {**os.environ, "ROTATOR_LOG_LEVEL": "warning"}
    sim_before = cpu_seconds(url)
    run = run_due(config, env)
    sim_run = cpu_seconds(url) - sim_before
    peak = peak_inflight(url)  # the listing before it goes one page at a time
    sim_before = cpu_seconds(url)
    bound = asyncio.run(makini_calls_alone(
        url, f"{CLIENT}:{SECRET}", args.connections, args.max_concurrency, verifies=1,
        prefix="bound",
    ))
    sim_bound = cpu_seconds(url) - sim_before
    print(f"first tokens (run-due):        {run['secs']:6.2f} s  exit {run['exit']:.0f}, "
          f"CPU {run['cpu']:.1f} s, {run['processes']:.0f} process(es), peak PSS together "
          f"{run['pss']:.0f} MB")
    print(f"  simulator meanwhile:         CPU {sim_run:.1f} s (its own process), at most "
          f"{peak} calls at once (makini.max_concurrency {args.max_concurrency}; "
          f"scheduler.concurrency {args.concurrency})")
    print(f"  Makini calls alone:          {bound:6.2f} s  (issue + verify each, concurrency "
          f"{args.max_concurrency})  ratio {run['secs'] / bound:4.2f}x; simulator CPU "
          f"{sim_bound:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--max-concurrency", type=int, default=32, help="makini.max_concurrency")
    parser.add_argument("--concurrency", type=int, default=64, help="scheduler.concurrency")
    parser.add_argument("--processes", default="auto", help="scheduler.processes (run-due)")
    parser.add_argument("--first-tokens", action="store_true")
    parser.add_argument("--port", type=int, default=18767)
    args = parser.parse_args()
    logs.configure("warning", "console")
    os.environ["BENCH_DISC_SEAL"] = generate_key()
    os.environ["BENCH_DISC_SECRET"] = SECRET
    os.environ["BENCH_SECRET"] = SECRET
    with (
        simulator(args.port, args.latency_ms, f"{CLIENT}:{SECRET}") as url,
        tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp,
    ):
        started = time.perf_counter()
        httpx.post(f"{url}/_sim/connections", json={
            "count": args.connections, "prefix": "conn-", "client_id": CLIENT,
        }, timeout=120).raise_for_status()
        print(f"simulator (own process): {args.connections} connections made in "
              f"{time.perf_counter() - started:.2f} s; {args.latency_ms:.0f} ms a call")
        folder = Path(tmp)
        config = _write_config(
            folder, url, args.max_concurrency, args.processes, args.concurrency
        )
        cwd = Path.cwd()
        os.chdir(folder)  # the configuration's relative paths
        try:
            asyncio.run(_discovery(config))
        finally:
            os.chdir(cwd)
        _status_command(config)
        if args.first_tokens:
            _first_tokens(config, url, args)
            _status_command(config, " tokens")


if __name__ == "__main__":
    main()
