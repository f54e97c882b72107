"""Rotating 1,000 credentials of one environment with ``rotator run-due``.

The simulator runs in its own process with 20 ms of latency per call; ``rotator run-due`` runs
as a subprocess on the file backend and a SQLite journal, exactly as a CronJob would. Printed:
wall time and peak memory of each run, and the same run's lower bound: the Makini calls alone
(admin auth, issue, verify per credential) made with the same concurrency by the same client.

    .venv/bin/python -m bench.bench_rotation [--credentials 1000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.memory import TreeMemory
from bench.simulator import makini_calls_alone, simulator
from rotator import logs
from rotator.crypto import generate_key

CLIENT, SECRET = "bench-prod", "bench-prod-secret"


def write_config(
    folder: Path, url: str, count: int, concurrency: int, processes: str = "auto"
) -> Path:
    lines = [
        "[journal]",
        'url = "sqlite:///journal.db"',
        "[scheduler]",
        f"concurrency = {concurrency}",
        f"processes = {processes if processes.isdigit() else repr(processes)}",
        "[environments.prod]",
        'sealing_key = { env = "BENCH_SEAL" }',
        "[environments.prod.makini]",
        f'base_url = "{url}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_SECRET"',
        "issue_invalidates_previous = true",
        f"max_concurrency = {concurrency}",
        "[environments.prod.schedule]",
        'interval = "1s"',
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


def create_journal(config: Path, env: dict[str, str]) -> float:
    """Make the journal (its schema) with `rotator plan`, outside the timed runs: a journal is
    made once, and every later run-due opens it as it is. Returns the seconds it took."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rotator", "--config", str(config), "plan", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        check=True,
        cwd=config.parent,
    )
    return time.perf_counter() - start


def run_due(config: Path, env: dict[str, str]) -> dict[str, float]:
    """One `rotator run-due`: wall and CPU seconds, peak memory, processes, exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rotator", "--config", str(config), "run-due", "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=config.parent,
    )
    memory = TreeMemory(proc.pid)
    memory.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    memory.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and proc.stderr is not None:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return {
        "secs": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,  # the run's processes together
        "pss": memory.peak_mb,
        "rss": usage.ru_maxrss / 1024,  # the largest single process
        "processes": memory.processes,
        "exit": proc.returncode,
    }


async def calls_alone(url: str, count: int, concurrency: int, prefix: str) -> float:
    """The Makini calls alone: issue + verify per credential."""
    client = f"{CLIENT}:{SECRET}"
    return await makini_calls_alone(url, client, count, concurrency, verifies=1, prefix=prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", default="auto", help="scheduler.processes")
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()
    logs.configure("warning")

    with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
        folder = Path(tmp)
        with simulator(args.port, args.latency_ms, f"{CLIENT}:{SECRET}") as url:
            config = write_config(
                folder, url, args.credentials, args.concurrency, args.processes
            )
            env = {
                **os.environ,
                "BENCH_SEAL": generate_key(),
                "BENCH_SECRET": SECRET,
                "ROTATOR_LOG_LEVEL": "warning",
            }
            os.environ["BENCH_SECRET"] = SECRET
            print(
                f"{args.credentials} credentials, simulator latency {args.latency_ms:.0f} ms "
                f"per call, concurrency {args.concurrency}, processes {args.processes}, "
                "file backend, SQLite journal"
            )
            made = create_journal(config, env)
            bound1 = asyncio.run(calls_alone(url, args.credentials, args.concurrency, "bound-1"))
            first = run_due(config, env)
            time.sleep(1.2)  # interval 1s: every credential is due again
            bound2 = asyncio.run(calls_alone(url, args.credentials, args.concurrency, "bound-2"))
            second = run_due(config, env)
            for label, run, bound in (
                ("first tokens (issue, seal, stage, verify, promote)", first, bound1),
                ("rotation (the above + retire the old version)", second, bound2),
            ):
                print(f"  {label}:")
                print(
                    f"    run-due {run['secs']:6.2f} s   CPU {run['cpu']:5.2f} s   "
                    f"exit {run['exit']:.0f}"
                )
                print(
                    f"    memory: {run['processes']:.0f} process(es), peak PSS together "
                    f"{run['pss']:6.1f} MB, largest peak RSS {run['rss']:6.1f} MB"
                )
                print(
                    f"    Makini calls alone {bound:6.2f} s   ratio {run['secs'] / bound:4.2f}x"
                )
            print(f"  (the journal was made beforehand, untimed: `rotator plan` took {made:.2f} s)")


if __name__ == "__main__":
    main()
