"""Benchmark of the ``file`` backend against the in-memory lower bound.

Prints, per backend: a rotation's backend work (stage + promote + make the old one unreadable),
a read of the current version, and ``versions()``; once in a small environment and once with
many other credentials and a long history, to show that a write costs one credential's files,
not the environment's. Run: ``python -m bench.bench_file_backend [--quick]``. Absolute figures
depend on the disk (every write is fsynced); compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backends.base import Backend
from backends.file import FileBackend, FileSettings
from rotator.crypto import KeySource, generate_key
from rotator.model import Secret, Stage, StoredVersion, TokenPair, new_version_id
from tests.fakes.memory import MemoryBackend, MemorySettings

ENV = "bench"
KEY_ENV = "ROTATOR_BENCH_FILE_KEY"


def _version(cred: str) -> StoredVersion:
    token = os.urandom(48).hex()
    return StoredVersion(ENV, cred, new_version_id(), TokenPair(Secret(token), Secret(token[::-1])))


def _rotate(backend: Backend, cred: str) -> None:
    old = backend.read(cred, Stage.PREVIOUS)
    v = _version(cred)
    backend.stage_pending(v)
    backend.promote(cred, v.version_id)
    if old is not None:
        backend.make_unreadable(cred, old.version_id)


def _timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Median and 95th percentile in milliseconds over ``n`` calls."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.95))]


def _build(kind: str, folder: Path) -> Backend:
    if kind == "memory":
        return MemoryBackend(MemorySettings(namespace=folder.name), ENV)
    return FileBackend(FileSettings(path=folder, key=KeySource(env=KEY_ENV)), ENV)


def _populate(backend: Backend, credentials: int, history: int) -> None:
    for i in range(credentials):
        _rotate(backend, f"other-{i}")
    for _ in range(history):
        _rotate(backend, "hot")


def run(quick: bool) -> list[tuple[str, str, str, float, float]]:
    n = 30 if quick else 200
    sizes = [("small", 1, 2), ("large", 100 if quick else 1000, 50 if quick else 300)]
    rows: list[tuple[str, str, str, float, float]] = []
    os.environ.setdefault(KEY_ENV, generate_key())
    with tempfile.TemporaryDirectory(prefix="bench-file-") as tmp:
        for size, credentials, history in sizes:
            for kind in ("memory", "file"):
                backend = _build(kind, Path(tmp) / size)
                _populate(backend, credentials, history)
                label = f"{size} ({credentials} creds, {history} versions)"
                for op, fn in (
                    ("rotate", lambda b=backend: _rotate(b, "hot")),
                    ("read current", lambda b=backend: b.read("hot")),
                    ("versions()", lambda b=backend: b.versions("hot")),
                ):
                    median, p95 = _timed(fn, n)
                    rows.append((kind, label, op, median, p95))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations, smaller sizes")
    args = parser.parse_args(argv)
    print(f"{'backend':8} {'environment':34} {'operation':14} {'median ms':>10} {'p95 ms':>8}")
    for kind, label, op, median, p95 in run(args.quick):
        print(f"{kind:8} {label:34} {op:14} {median:10.3f} {p95:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
