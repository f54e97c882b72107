"""Emergency revoke: one credential, and ``--all`` over a whole environment.

The Makini simulator runs in a process of its own (Makini is a remote service: its CPU must not
count against the rotator's) with 20 ms of latency per API call; the environment has two file
backends in a temporary folder and a SQLite journal. Each revoke kills the token at Makini
(issue), verifies and promotes the replacement in both backends, purges the old version and
confirms the old token gets 401, exactly as the command.

Printed: for one credential, p50/p99/max of ``--runs`` revokes (plan + run, as the command and
the admin API do) and the median of each part; for ``--all``, the wall time over
``--credentials`` credentials at the configured concurrency.

    .venv/bin/python -m bench.bench_revoke [--runs 50] [--credentials 1000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.simulator import makini_calls_alone, simulator
from rotator import logs
from rotator.crypto import generate_key
from rotator.revoke import CredentialReport, Revoker, RevokeRequest, resume_held
from rotator.rotation.runtime import Runtime
from rotator.rotation.work import Work
from rotator.settings import parse_config

CLIENT, SECRET = "bench-prod", "bench-prod-secret"


def config(folder: Path, url: str, count: int, concurrency: int) -> Any:
    os.environ["BENCH_REVOKE_SEAL"] = generate_key()
    os.environ["BENCH_REVOKE_SECRET"] = SECRET
    backends = [
        {
            "type": "file",
            "name": name,
            "path": f"files/{name}",
            "key": {"file": f"{name}.key", "generate": True},
        }
        for name in ("primary", "replica")
    ]
    data = {
        "journal": {"url": f"sqlite:///{folder / 'journal.db'}"},
        "scheduler": {"concurrency": concurrency},
        "environments": {
            "prod": {
                "sealing_key": {"env": "BENCH_REVOKE_SEAL"},
                "makini": {
                    "base_url": url,
                    "client_id": CLIENT,
                    "client_secret_env": "BENCH_REVOKE_SECRET",
                    "issue_invalidates_previous": True,
                    "max_concurrency": concurrency,
                },
                "schedule": {"interval": "1h", "grace_period": "0s"},
                "backends": backends,
                "credentials": [
                    {"name": f"c{i:05d}", "connection_id": f"bench-{i:05d}"} for i in range(count)
                ],
            }
        },
    }
    return parse_config(data, source=folder / "rotator.toml")


async def revoke(revoker: Revoker, req: RevokeRequest) -> tuple[float, list[CredentialReport]]:
    started = time.perf_counter()
    plans = await revoker.plan(req)
    reports = await revoker.run(req, plans)
    elapsed = time.perf_counter() - started
    bad = [r for r in reports if r.outcome != "revoked"]
    if bad:
        raise SystemExit(f"{len(bad)} revokes did not complete: {bad[0].as_dict()}")
    return elapsed, reports


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def single(folder: Path, url: str, runs: int) -> None:
    runtime = Runtime.open(config(folder / "single", url, 1, 32), resume_revoke=resume_held)
    try:
        await runtime.engine.rotate("prod", "c00000", reason="bench", actor="bench")
        revoker = Revoker(runtime.engine)
        req = RevokeRequest("prod", ("c00000",), reason="bench", actor="bench")
        times: list[float] = []
        parts: dict[str, list[float]] = {}
        for _ in range(runs):
            elapsed, [report] = await revoke(revoker, req)
            times.append(elapsed)
            for part, seconds in report.timings.items():
                parts.setdefault(part, []).append(seconds)
        ms = [t * 1000 for t in times]
        print(f"  one credential, {runs} revokes (kill, replace in 2 backends, purge, confirm):")
        print(
            f"    p50 {pct(ms, 0.5):6.1f} ms   p99 {pct(ms, 0.99):6.1f} ms   "
            f"max {max(ms):6.1f} ms   target < 1000 ms"
        )
        print(
            "    median per part: "
            + ", ".join(
                f"{k.removesuffix('_s')} {statistics.median(v) * 1000:.0f} ms"
                for k, v in parts.items()
            )
        )
    finally:
        await runtime.aclose()


async def bulk(folder: Path, url: str, count: int, concurrency: int) -> None:
    runtime = Runtime.open(
        config(folder / "bulk", url, count, concurrency), resume_revoke=resume_held
    )
    try:
        started = time.perf_counter()
        results = await runtime.engine.rotate_many(
            [Work("prod", f"c{i:05d}", "bench", forced=True) for i in range(count)], actor="bench"
        )
        assert all(r.outcome == "rotated" for r in results)
        setup = time.perf_counter() - started
        revoker = Revoker(runtime.engine)
        elapsed, reports = await revoke(
            revoker, RevokeRequest("prod", all=True, reason="bench", actor="bench")
        )
        totals = [r.timings["total_s"] * 1000 for r in reports]
        # the Makini calls of the revokes alone: issue, then verify three times (the kill's
        # probe, the replacement, the confirmation)
        bound = await makini_calls_alone(
            url, f"{CLIENT}:{SECRET}", count, concurrency, verifies=3, prefix="bound"
        )
        print(f"  --all over {count} credentials, concurrency {concurrency}:")
        print(
            f"    wall {elapsed:6.2f} s   target < 30 s   ({count / elapsed:.0f} credentials/s; "
            f"first tokens for the setup took {setup:.2f} s)"
        )
        print(f"    the same Makini calls alone {bound:6.2f} s   ratio {elapsed / bound:4.2f}x")
        print(f"    per credential p50 {pct(totals, 0.5):.0f} ms, p99 {pct(totals, 0.99):.0f} ms")
    finally:
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=18766)
    args = parser.parse_args()
    logs.configure("error")
    client = f"{CLIENT}:{SECRET}"
    with (
        simulator(args.port, args.latency_ms, client) as url,
        tempfile.TemporaryDirectory(prefix="bench-revoke-") as tmp,
    ):
        print(
            f"simulator latency {args.latency_ms:.0f} ms per call (its own process), two file "
            "backends, SQLite journal"
        )
        asyncio.run(single(Path(tmp), url, args.runs))
        asyncio.run(bulk(Path(tmp), url, args.credentials, args.concurrency))


if __name__ == "__main__":
    main()
