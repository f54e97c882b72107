"""Discovery at scale: N connections at the simulator (20 ms a call, 100 a page), listed and
enrolled in one environment (file backend, SQLite journal), in one run:

    .venv/bin/python -m bench.bench_discovery [--connections 10000] [--latency-ms 20]
        [--first-tokens]

Prints the listing alone (the Makini calls: the lower bound), a first discovery (list, compute,
record 2 rows a connection, make them effective), a second one (nothing changes), ``status``
over the enrolled credentials and, with ``--first-tokens``, the first tokens of all of them
(``makini.max_concurrency`` honoured). Target (issue 18): discovery of 10,000 under 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from rotator import logs
from rotator.crypto import generate_key
from rotator.makini.sim import SimOptions, SimServer
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from rotator.rotation.status import collect
from rotator.settings import parse_config


def _config(sim_url: str, folder: Path, max_concurrency: int) -> Runtime:
    os.environ["BENCH_DISC_SEAL"] = generate_key()
    os.environ["BENCH_DISC_SECRET"] = "bench-secret"
    data = {
        "journal": {"url": f"sqlite:///{folder / 'journal.db'}"},
        "environments": {"prod": {
            "sealing_key": {"env": "BENCH_DISC_SEAL"},
            "makini": {"base_url": sim_url, "client_id": "bench",
                       "client_secret_env": "BENCH_DISC_SECRET",
                       "max_concurrency": max_concurrency},
            "backends": [{"type": "file", "path": str(folder / "files"),
                          "key": {"file": str(folder / "file.key"), "generate": True}}],
            "discover": {"enabled": True},
        }},
    }
    return Runtime.open(parse_config(data, source=folder / "rotator.toml"))


async def _run(sim: SimServer, folder: Path, args: argparse.Namespace) -> None:
    runtime = _config(sim.url, folder, args.max_concurrency)
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
              f"({len(rows)} rows)")
        if args.first_tokens:
            from rotator.service import due_work, rotate_work

            started = time.perf_counter()
            results = await rotate_work(runtime, await due_work(runtime))
            ok = sum(r.ok for r in results)
            print(f"first tokens:                  {time.perf_counter() - started:6.2f} s  "
                  f"({ok}/{len(results)} ok, max_concurrency {args.max_concurrency})")
    finally:
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--first-tokens", action="store_true")
    args = parser.parse_args()
    logs.configure("warning", "console")
    with SimServer(SimOptions(clients={"bench": "bench-secret"})) as sim:
        started = time.perf_counter()
        sim.add_connections(args.connections, client_id="bench")
        print(f"simulator: {args.connections} connections made in "
              f"{time.perf_counter() - started:.2f} s; {args.latency_ms:.0f} ms a call")
        sim.set(latency_ms=args.latency_ms)
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(_run(sim, Path(folder), args))


if __name__ == "__main__":
    main()
