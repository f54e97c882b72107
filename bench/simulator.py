"""The Makini simulator in a process of its own, as the benchmarks use it: Makini is a remote
service, so its CPU must not count against the rotator's (``rotator makini-sim``). And the
benchmarks' lower bound: the Makini calls alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from rotator.makini import MakiniClient
from rotator.settings import MakiniSettings


def start_simulator(port: int, latency_ms: float, client: str) -> subprocess.Popen[bytes]:
    """Start it on ``port`` with ``client`` ("id:secret") and wait until it answers."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rotator",
            "makini-sim",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
            "--client",
            client,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/_sim/options", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the Makini simulator did not start")


_RUNNING: dict[str, int] = {}
"""The pid of the simulator serving each base URL (while its block runs)."""


@contextlib.contextmanager
def simulator(port: int, latency_ms: float, client: str) -> Iterator[str]:
    """The simulator's base URL while the block runs."""
    proc = start_simulator(port, latency_ms, client)
    url = f"http://127.0.0.1:{port}"
    _RUNNING[url] = proc.pid
    try:
        yield url
    finally:
        _RUNNING.pop(url, None)
        proc.terminate()
        proc.wait(timeout=10)


def cpu_seconds(url: str) -> float:
    """CPU seconds (user + system, all its threads) the simulator at ``url`` has used so far:
    Makini is not on the rotator's machine, so a benchmark reports the simulator's share of the
    cores apart from the rotator's. 0 where /proc is not there."""
    try:
        with open(f"/proc/{_RUNNING[url]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (KeyError, OSError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_inflight(url: str) -> int:
    """The most API requests the simulator has answered at once (since it started)."""
    return int(httpx.get(f"{url}/_sim/stats", timeout=10).json().get("peak_inflight", 0))


async def makini_calls_alone(
    url: str, client: str, count: int, concurrency: int, *, verifies: int, prefix: str
) -> float:
    """Seconds for the Makini calls of ``count`` credentials alone, made by the rotator's own
    client at the same concurrency: per credential one issue, then ``verifies`` verifies.
    ``prefix`` names the connections (a fresh one per run keeps them apart)."""
    client_id, secret = client.split(":", 1)
    settings = MakiniSettings(
        base_url=url,
        client_id=client_id,
        client_secret_env="BENCH_SECRET",  # a name only: the secret is passed below
        max_concurrency=concurrency,
    )
    gate = asyncio.Semaphore(concurrency)
    async with MakiniClient(settings, secret, environment="prod") as makini:
        started = time.perf_counter()

        async def one(i: int) -> None:
            async with gate:
                conn = f"{prefix}-{i:05d}"
                issued = await makini.issue_token(conn)
                for _ in range(verifies):
                    await makini.verify(issued.tokens.access, conn)

        await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - started
