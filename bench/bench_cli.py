"""Start-up of the ``rotator`` command: what a person (or a script calling ``rotator get`` in a
loop) waits for before anything happens.

Each command runs as a subprocess N times, alternating with ``python -c pass`` (the
interpreter's own start-up) in the same run; printed: the median wall time and the peak RSS of
each, beside ``python -c pass``. The configuration is a temporary one: one environment of 5
credentials (by default) on a file backend and a SQLite journal, tokens issued by the bundled
simulator (in a process of its own) before the timed runs. The project's modules are compiled
to bytecode first, as ``pip install`` does for an installed package (a checkout run with
``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module at every start and measure
that). Figures, no pass/fail.

    .venv/bin/python -m bench.bench_cli [--runs 15] [--credentials 5]
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import backends
import rotator
from bench.launch import Run, run_once
from bench.simulator import simulator
from rotator.crypto import generate_key

CLIENT, SECRET = "bench-cli", "bench-cli-secret"


def write_config(folder: Path, url: str, count: int) -> Path:
    lines = [
        "[journal]",
        'url = "sqlite:///journal.db"',
        "[environments.prod]",
        'sealing_key = { env = "BENCH_SEAL" }',
        "[environments.prod.makini]",
        f'base_url = "{url}"',
        f'client_id = "{CLIENT}"',
        'client_secret_env = "BENCH_SECRET"',
        "[[environments.prod.backends]]",
        'type = "file"',
        'path = "files"',
        'key = { file = "file.key", generate = true }',
    ]
    for i in range(count):
        lines += [
            "[[environments.prod.credentials]]",
            f'name = "c{i}"',
            f'connection_id = "cli-{i}"',
        ]
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (median)")
    parser.add_argument("--credentials", type=int, default=5)
    parser.add_argument("--port", type=int, default=18767)
    args = parser.parse_args()

    for package in (rotator, backends):  # the code under test: an A/B run's older tree too
        compileall.compile_dir(Path(str(package.__file__)).parent, quiet=1)
    command = [sys.executable, "-m", "rotator"]
    baseline = [sys.executable, "-c", "pass"]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folder = Path(tmp)
        with simulator(args.port, 0, f"{CLIENT}:{SECRET}") as url:
            config = write_config(folder, url, args.credentials)
            env = {
                **os.environ,
                "BENCH_SEAL": generate_key(),
                "BENCH_SECRET": SECRET,
                "ROTATOR_CONFIG": str(config),
            }
            names = [f"c{i}" for i in range(args.credentials)]
            subprocess.run(
                [*command, "rotate", "prod", *names, "--json"],
                env=env,
                cwd=folder,
                stdout=subprocess.DEVNULL,
                check=True,
            )
            commands = {
                "rotator --help": ["--help"],
                "rotator get prod c0": ["get", "prod", "c0"],
                "rotator keygen": ["keygen"],
                f"rotator status ({args.credentials} credentials)": ["status"],
            }
            print(
                f"start-up, median of {args.runs} runs each, alternating with `python -c pass`; "
                f"file backend, SQLite journal, {args.credentials} credentials"
            )
            print(f"  {'command':34} {'wall':>8} {'peak RSS':>10}   {'python -c pass':>22}")
            for label, extra in commands.items():
                runs: list[Run] = []
                bases: list[Run] = []
                for _ in range(args.runs):
                    bases.append(run_once(baseline, env, folder))
                    runs.append(run_once([*command, *extra], env, folder))
                codes = sorted({r.code for r in runs})
                wall = statistics.median(r.wall for r in runs)
                rss = max(r.rss for r in runs)
                base_wall = statistics.median(b.wall for b in bases)
                base_rss = max(b.rss for b in bases)
                note = "" if codes == [0] else f"   exit {codes}"
                print(
                    f"  {label:34} {wall:6.3f} s {rss:7.1f} MB   "
                    f"{base_wall:6.3f} s {base_rss:7.1f} MB   "
                    f"x{wall / base_wall:4.1f}{note}"
                )


if __name__ == "__main__":
    main()
