"""``rotator status`` at scale: one environment of N configured credentials (file backend, SQLite
journal), each holding a current token, timed as the command a person types.

    .venv/bin/python -m bench.bench_status [--sizes 1000,10000] [--runs 3]

The state is written beforehand, without Makini: each credential's token is staged and promoted
in the file backend by the backend's own code, and the journal rows a rotation leaves (its
credential state and its finished rotation) are written through the journal's schema in one
transaction. What ``status`` then reads is read by its real code, in a subprocess (``python -m
rotator status``: the table piped, ``--all`` where the code has it, then ``--json``), alternating
with ``python -c pass``. Printed per size and output: the median wall time, the median CPU time
(user + system, the command and its threads), the peak RSS, the wall time per 1,000
credentials (linear in N where it stays flat), the rows (``--json``) and the exit code. The
code measured is compiled to bytecode first (as ``bench_cli`` does).

Target (issue 18): under 2 s at 10,000 credentials, linear.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

import backends
import rotator
from bench.bench_cli import write_config
from bench.launch import run_once
from rotator.crypto import generate_key
from rotator.journal import CredentialState, Journal, Rotation, Step
from rotator.model import Secret, StoredVersion, TokenPair, fingerprint, new_version_id, utcnow
from rotator.settings import load_config


def seed(config: Path, count: int) -> None:
    """Give each of ``count`` credentials a current token in the backend and in the journal."""
    cfg = load_config(config)
    env = cfg.environment("prod")
    backend = backends.build(env.backend_settings[0], "prod")
    now = utcnow()
    states, rotations = [], []
    try:
        for i in range(count):
            name = f"c{i}"
            token = Secret(os.urandom(24).hex())
            pair = TokenPair(token, expires_at=now + timedelta(days=30))
            version = StoredVersion("prod", name, new_version_id(), pair)
            backend.stage_pending(version)
            backend.promote(name, version.version_id)
            states.append({
                "environment": "prod", "credential": name,
                "current_version_id": version.version_id,
                "current_fingerprint": fingerprint(token.reveal()),
                "expires_at": now + timedelta(days=30), "rotated_at": now,
                "last_attempt_at": now, "last_outcome": "rotated", "unaccounted": 0,
            })  # fmt: skip
            rotations.append({
                "id": str(uuid.uuid4()), "environment": "prod", "credential": name,
                "kind": "rotate", "step": Step.DONE, "version_id": version.version_id,
                "reason": "bench", "actor": "bench", "started_at": now, "updated_at": now,
                "finished_at": now, "attempts": 1, "notes": "[]",
            })  # fmt: skip
    finally:
        backend.close()
    journal = Journal.open(cfg.journal)
    try:
        journal.transaction(
            "seed the benchmark",
            lambda conn: (
                conn.execute(insert(CredentialState), states),
                conn.execute(insert(Rotation), rotations),
            ),
        )
    finally:
        journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="credential counts, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs of status per size (median)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    for package in (rotator, backends):  # the code under test: an A/B run's older tree too
        compileall.compile_dir(Path(str(package.__file__)).parent, quiet=1)
    command = [sys.executable, "-m", "rotator", "status"]
    print(
        f"rotator status, median of {args.runs} runs each, alternating with `python -c pass`; "
        "one environment, file backend, SQLite journal, every credential with a current token; "
        "the table piped (80 columns), --all where the code has it, and --json"
    )
    print(f"  {'credentials':>11} {'output':>6} {'wall':>8} {'CPU':>8} {'peak RSS':>10} "
          f"{'per 1,000':>10}   {'python -c pass':>9}   rows  exit")  # fmt: skip
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
            folder = Path(tmp)
            config = write_config(folder, "http://127.0.0.1:9", count)  # Makini is not called
            env = {
                **os.environ,
                "BENCH_SEAL": generate_key(),
                "BENCH_SECRET": "unused",
                "ROTATOR_CONFIG": str(config),
            }
            old = dict(os.environ)
            os.environ.update(env)
            os.chdir(folder)  # the configuration's relative paths
            try:
                seed(config, count)
            finally:
                os.environ.clear()
                os.environ.update(old)
            shown = subprocess.run(
                [*command, "--json"], env=env, cwd=folder, capture_output=True, text=True
            )
            rows = len(json.loads(shown.stdout)) if shown.stdout.strip() else 0
            helped = subprocess.run(
                [*command, "--help"], env=env, cwd=folder, capture_output=True, text=True
            )
            outputs: list[tuple[str, list[str]]] = [("table", [])]
            if "--all" in helped.stdout:
                outputs.append(("--all", ["--all"]))
            outputs.append(("json", ["--json"]))
            for label, extra in outputs:
                runs, bases = [], []
                for _ in range(args.runs):
                    bases.append(run_once([sys.executable, "-c", "pass"], env, folder))
                    runs.append(run_once([*command, *extra], env, folder))
                wall = statistics.median(r.wall for r in runs)
                cpu = statistics.median(r.cpu for r in runs)
                rss = max(r.rss for r in runs)
                base = statistics.median(b.wall for b in bases)
                codes = sorted({r.code for r in runs})
                print(
                    f"  {count:>11,} {label:>6} {wall:6.2f} s {cpu:6.2f} s {rss:7.1f} MB "
                    f"{wall / count * 1000:8.2f} s   {base:7.3f} s   {rows:>5}  "
                    f"{','.join(map(str, codes))}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
