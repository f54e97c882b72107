"""Retention at scale: a journal with a backlog of old history (1,000,000 audit entries and
100,000 finished rotations by default, older than the default retention, plus recent ones that
stay), pruned by one pass, in one run:

    .venv/bin/python -m bench.bench_retention [--audit 1000000] [--rotations 100000]
        [--credentials 1000] [--batch 1000] [--url postgresql+psycopg://...]

Prints the pass (rows, seconds, rows per second), its batches' durations (p50, p99, max: how
long a batch holds the journal's writer), and what another writer and a reader of the same
journal see meanwhile: the latency of an audit append (a write through the writer) and of a
credential state read, idle first, then while the pass runs, in the same run. The backlog is
written beforehand with bulk inserts (not timed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from rotator import logs
from rotator.journal import Journal
from rotator.journal.retention import prune
from rotator.journal.schema import AuditEntry, CredentialState, Rotation
from rotator.model import utcnow
from rotator.settings import RetentionSettings

CHUNK = 20_000


def _fill(journal: Journal, args: argparse.Namespace) -> None:
    now = utcnow()
    old = now - timedelta(days=500)
    recent = now - timedelta(days=10)
    audit = [
        {
            "at": old + timedelta(seconds=i) if i < args.audit else recent,
            "actor": "scheduler",
            "action": "rotation.promoted",
            "outcome": "ok",
            "environment": "prod",
            "credential": f"c{i % args.credentials}",
            "request_ids": "[]",
            "detail": '{"note": "bench"}',
        }
        for i in range(args.audit + 1000)
    ]
    for start in range(0, len(audit), CHUNK):
        journal.execute("fill", insert(AuditEntry), audit[start : start + CHUNK])
    rotations, latest = [], {}
    total = args.rotations + args.credentials  # each credential's latest is recent
    for i in range(total):
        cred = f"c{i % args.credentials}"
        at = old + timedelta(minutes=i) if i < args.rotations else recent
        version = str(uuid.uuid4())
        latest[cred] = version
        rotations.append(
            {
                "id": str(uuid.uuid4()), "environment": "prod", "credential": cred,
                "kind": "rotate", "step": "done", "version_id": version,
                "reason": "due", "actor": "scheduler", "started_at": at, "updated_at": at,
                "finished_at": at, "attempts": 0, "notes": "[]",
            }
        )
    for start in range(0, len(rotations), CHUNK):
        journal.execute("fill", insert(Rotation), rotations[start : start + CHUNK])
    journal.execute(
        "fill",
        insert(CredentialState),
        [
            {"environment": "prod", "credential": c, "current_version_id": v}
            for c, v in latest.items()
        ],
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> str:
    return (
        f"p50 {_pct(values, 0.5) * 1000:6.2f} ms  p99 {_pct(values, 0.99) * 1000:6.2f} ms  "
        f"max {max(values, default=0) * 1000:7.2f} ms  (n={len(values)})"
    )


def _probe(journal: Journal, stop: threading.Event) -> tuple[list[float], list[float]]:
    """Append an audit entry and read a credential's state every 20 ms until ``stop``."""
    writes: list[float] = []
    reads: list[float] = []
    while not stop.is_set():
        t = time.perf_counter()
        journal.audit(actor="probe", action="rotation.started", outcome="ok")
        writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        journal.state("prod", "c1")
        reads.append(time.perf_counter() - t)
        stop.wait(0.02)
    return writes, reads


def _print_pass(result: Any, args: argparse.Namespace) -> None:
    counts = result.counts
    print(f"prune pass:                   {result.seconds:6.2f} s  ({result.total} rows: "
          f"{counts['audit']} audit, {counts['rotations']} rotations; "
          f"{result.total / max(result.seconds, 1e-9):,.0f} rows/s, "
          f"{result.batches} batches of {args.batch})")
    durations = getattr(result, "durations", None)  # an older commit's pass has none
    if durations:
        print(f"  each batch's transaction:   {_ms(durations)}")
        print(f"  mean batch:                 {statistics.fmean(durations) * 1000:6.2f} ms")
    print(f"  longest batch:              {result.longest_batch_s * 1000:6.2f} ms")


def _serve_reads(
    url_folder: Path, args: argparse.Namespace, run_prune: Any
) -> tuple[dict[str, float], dict[str, float], Any]:
    """``rotator serve`` on the journal (file backend, the simulator in this process): wrk on
    a cached authenticated token read for ``--wrk-s`` idle, then for as long while
    ``run_prune()`` runs in a thread. Returns (idle, during, the prune's result)."""
    import json
    import os
    import subprocess
    import sys

    import httpx

    from bench.bench_api import (
        CLIENT,
        CRED,
        SECRET,
        free_port,
        rotator,
        wait_until,
        write_config,
        wrk,
    )
    from rotator.crypto import generate_key
    from rotator.makini.sim import SimOptions, SimServer

    with SimServer(SimOptions(clients={CLIENT: SECRET})) as sim:
        config = write_config(url_folder, sim.url)
        env = {**os.environ, "ROTATOR_CONFIG": str(config), "BENCH_SEAL": generate_key(),
               "BENCH_SECRET": SECRET}
        reader = json.loads(rotator(env, "keys", "create", "prod", "--name", "bench", "--json"))
        port = free_port()
        serve = subprocess.Popen(
            [sys.executable, "-m", "rotator", "serve", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=url_folder,
        )
        try:
            read = f"http://127.0.0.1:{port}/v1/tokens/prod/{CRED}"
            auth = {"Authorization": f"Bearer {reader['key']}"}
            wait_until(lambda: httpx.get(read, headers=auth).json().get("token"), "first token")
            header = f"Authorization: Bearer {reader['key']}"
            wrk(read, header, args, 2)  # warm up
            idle = wrk(read, header, args, args.wrk_s)
            done: list[Any] = []
            t = threading.Thread(target=lambda: done.append(run_prune()))
            t.start()
            during = wrk(read, header, args, args.wrk_s)
            t.join()
            return idle, during, done[0]
        finally:
            serve.terminate()
            serve.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", type=int, default=1_000_000)
    parser.add_argument("--rotations", type=int, default=100_000)
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument(
        "--url", default=None, help="a PostgreSQL database it empties first (default: SQLite)"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="also rotator serve on the (SQLite) journal: wrk on a token read, idle and during "
        "the pass (the journal probes are left out)",
    )
    parser.add_argument("--wrk-s", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'journal.db'}"  # serve's config names it
        if args.url:  # a database of its own, emptied first
            from sqlalchemy import create_engine

            engine = create_engine(args.url)
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP SCHEMA public CASCADE")
                conn.exec_driver_sql("CREATE SCHEMA public")
            engine.dispose()
        journal = Journal(url)
        started = time.perf_counter()
        _fill(journal, args)
        if not journal.is_sqlite:  # table statistics, as autovacuum keeps them on a live one
            with journal.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        print(f"backlog written (not timed):  {time.perf_counter() - started:6.1f} s  "
              f"({args.audit} old audit entries, {args.rotations} old rotations, "
              f"{args.credentials} credentials)")

        def run_prune() -> Any:
            return prune(
                journal,
                RetentionSettings(batch=args.batch),
                active_window=timedelta(hours=24),
                owner="bench",
            )

        if args.serve:
            idle_reads, during_reads, result = _serve_reads(Path(tmp), args, run_prune)
            _print_pass(result, args)
            for name, got in (("idle", idle_reads), ("during prune", during_reads)):
                print(f"serve token read, {name + ':':14s}{got['rps']:8,.0f} req/s  "
                      f"p50 {got['p50_ms']:6.2f} ms  p99 {got['p99_ms']:6.2f} ms  "
                      f"(wrk -c{args.connections}, {args.wrk_s:g} s, non-2xx {got['non_2xx']:g})")
            journal.close()
            return
        # the probes: idle, then during the pass (another Journal object: another writer)
        other = Journal(url)
        stop = threading.Event()
        idle: list[tuple[list[float], list[float]]] = []
        t = threading.Thread(target=lambda: idle.append(_probe(other, stop)))
        t.start()
        time.sleep(args.idle_s)
        stop.set()
        t.join()
        stop = threading.Event()
        during: list[tuple[list[float], list[float]]] = []
        t = threading.Thread(target=lambda: during.append(_probe(other, stop)))
        t.start()
        result = run_prune()
        stop.set()
        t.join()
        _print_pass(result, args)
        print(f"audit append, idle:           {_ms(idle[0][0])}")
        print(f"audit append, during prune:   {_ms(during[0][0])}")
        print(f"state read, idle:             {_ms(idle[0][1])}")
        print(f"state read, during prune:     {_ms(during[0][1])}")
        other.close()
        journal.close()


if __name__ == "__main__":
    main()
