"""One Prometheus scrape of ``rotator serve``'s ``/metrics`` at N credentials (issue 18), in
process: the CPU of :meth:`rotator.metrics.Metrics.render` as serve builds it (the journal's
per-credential gauges and the probes of :class:`rotator.observe.Observer`), SQLite journal:

    .venv/bin/python -m bench.bench_metrics [--credentials 10000] [--scrapes 20]

Setup (not timed): a configuration listing N credentials (file backend, empty), a journal whose
``credential_state`` holds a current version for each, a few with an error or attention. The
first scrape (which also reads every backend for ``rotator_backends_agree``, then cached for
``metrics.backend_check_interval``) is printed apart. Printed: CPU seconds per scrape (median and
max of ``--scrapes``), the same for a scrape right after one credential was promoted by another
connection (its new rotation time must be in that scrape's output: fresh, checked), and the
share of one core that scraping every 15 s costs. Target: under 0.15 s a scrape (1% at 15 s).
A/B: ``python -m bench.ab --same-script --before REV -- bench_metrics.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from backends import build
from rotator.journal import Journal
from rotator.metrics import Metrics
from rotator.observe import Observer
from rotator.settings import load_config


def write_config(folder: Path, count: int) -> Path:
    lines = [
        "[journal]",
        f'url = "sqlite:///{folder / "journal.db"}"',
        "[environments.prod]",
        'sealing_key = { env = "BENCH_SEAL" }',
        "[environments.prod.makini]",
        'base_url = "http://127.0.0.1:9"',
        'client_id = "bench"',
        'client_secret_env = "BENCH_SECRET"',
        "[[environments.prod.backends]]",
        'type = "file"',
        f'path = "{folder / "files"}"',
        f'key = {{ file = "{folder / "file.key"}", generate = true }}',
    ]
    for i in range(count):
        lines += ["[[environments.prod.credentials]]", f'name = "c{i:05d}"']
        lines += [f'connection_id = "bench-{i:05d}"']
    path = folder / "rotator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fill(journal: Journal, count: int) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "environment": "prod",
            "credential": f"c{i:05d}",
            "current_version_id": str(uuid.uuid4()),
            "current_fingerprint": "f" * 16,
            "expires_at": now + timedelta(days=30, seconds=i),
            "rotated_at": now - timedelta(days=1, seconds=i),
            "last_outcome": "ok",
            "last_error": "boom" if i % 500 == 0 else None,
            "attention": "look" if i % 700 == 0 else None,
        }
        for i in range(count)
    ]
    table = sa.Table("credential_state", sa.MetaData(), autoload_with=journal.engine)
    with journal.engine.begin() as conn:
        conn.execute(table.insert(), rows)


def promote(url: str, name: str, at: datetime) -> None:
    """Another process's promotion: a connection of its own."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE credential_state SET current_version_id = :v, rotated_at = :at "
                    "WHERE environment = 'prod' AND credential = :c"
                ),
                {"v": str(uuid.uuid4()), "at": at.strftime("%Y-%m-%d %H:%M:%S.%f"), "c": name},
            )
    finally:
        engine.dispose()


def cpu(fn: object) -> tuple[float, bytes]:
    started = time.process_time()
    out = fn()  # type: ignore[operator]
    return time.process_time() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--credentials", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    import os

    os.environ.setdefault("BENCH_SEAL", "x" * 44)
    os.environ.setdefault("BENCH_SECRET", "bench-secret")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "files").mkdir()
        config = load_config(write_config(folder, args.credentials))
        journal = Journal.open(config.journal)
        fill(journal, args.credentials)
        env = config.environments["prod"]
        backends = {"prod": [build(b, "prod") for b in env.backend_settings]}
        observer = Observer(config, journal, backends)
        metrics = Metrics(config, journal, observer.probes())
        first, body = cpu(metrics.render)
        series = body.count(b'credential="')
        idle = [cpu(metrics.render)[0] for _ in range(args.scrapes)]
        changed = []
        for i in range(min(5, args.scrapes)):
            at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=i)
            promote(str(journal.engine.url), f"c{i * 7:05d}", at)
            took, body = cpu(metrics.render)
            want = f'rotator_last_rotation_success_timestamp_seconds{{credential="c{i * 7:05d}"'
            line = next(
                (
                    raw
                    for raw in body.decode().splitlines()
                    if raw.startswith("rotator_last_rotation_success_timestamp_seconds{")
                    and f'credential="c{i * 7:05d}"' in raw
                ),
                "",
            )
            if not line or abs(float(line.rsplit(" ", 1)[1]) - at.timestamp()) > 1e-3:
                raise SystemExit(f"stale after a promotion: {want!r} -> {line!r}")
            changed.append(took)
        journal.close()
    med = statistics.median(idle)
    print(f"credentials: {args.credentials}, per-credential series in a scrape: {series}")
    print(f"first scrape (reads every backend): {first:.3f} s CPU")
    print(f"scrape: median {med:.4f} s CPU, max {max(idle):.4f} s ({args.scrapes} scrapes)")
    print(f"scrape after a promotion: median {statistics.median(changed):.4f} s CPU (fresh: yes)")
    print(f"scraped every 15 s: {100 * med / 15:.2f}% of a core")


if __name__ == "__main__":
    main()
