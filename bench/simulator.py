"""The Makini simulator in a process of its own, as the benchmarks use it: Makini is a remote
service, so its CPU must not count against the rotator's (``rotator makini-sim``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


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


@contextlib.contextmanager
def simulator(port: int, latency_ms: float, client: str) -> Iterator[str]:
    """The simulator's base URL while the block runs."""
    proc = start_simulator(port, latency_ms, client)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
