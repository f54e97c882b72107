"""Retention as the service runs it: ``rotator db prune`` (a subprocess), ``run-due`` at its end,
``serve``'s scheduled pass (in-process, on a real scheduler), and a SIGKILL between batches."""

from __future__ import annotations

import json
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import insert

from rotator.crypto import generate_key
from rotator.faults import ENV_VAR
from rotator.journal import Journal
from rotator.journal.retention import LEASE, prune
from rotator.journal.schema import AuditEntry
from rotator.makini.sim import SimServer
from rotator.metrics import Metrics
from rotator.model import utcnow
from rotator.service import _schedule_pruning
from rotator.settings import RetentionSettings
from tests.cli import RotatorCli
from tests.clock import FakeClock
from tests.factories import RuntimeFactory, config_toml, environment_table, file_backend
from tests.wait import until

KILLED = -9
WINDOW = timedelta(hours=24)


def _old_audit(url: str, ages_days: list[float]) -> None:
    journal = Journal(url)
    now = utcnow()
    try:
        for age in ages_days:
            journal.execute(
                "add",
                insert(AuditEntry).values(
                    at=now - timedelta(days=age),
                    actor="t",
                    action="rotation.promoted",
                    outcome="ok",
                    request_ids="[]",
                    detail="{}",
                ),
            )
    finally:
        journal.close()


def _audit_actions(url: str) -> list[str]:
    journal = Journal(url)
    try:
        return [e.action for e in journal.audit_entries(limit=None, oldest_first=True)]
    finally:
        journal.close()


def _cli(tmp_path: Path, sim: SimServer, retention: dict[str, Any] | None = None) -> RotatorCli:
    prod = environment_table(
        sim.url,
        "test-prod",
        [{"name": "a", "connection_id": "conn-prune-a"}],
        sealing_env="PRUNE_SEAL",
        secret_env="PRUNE_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    journal = {"url": "sqlite:///journal.db", "retention": retention or {"batch": 10}}
    text = config_toml(journal, {"prod": prod})
    return RotatorCli(
        tmp_path, text, {"PRUNE_SEAL": generate_key(), "PRUNE_SECRET": "test-prod-secret"}
    )


def test_db_prune_shows_then_deletes_and_audits_it(tmp_path: Path, sim: SimServer) -> None:
    cli = _cli(tmp_path, sim)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    cli("db", "current")  # makes the journal
    _old_audit(url, [500, 450, 1])

    dry = cli("db", "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["dry_run"] and shown["counts"]["audit"] == 2
    assert len(_audit_actions(url)) == 3

    table = cli("db", "prune", "--dry-run")
    assert table.returncode == 0 and "would delete 2 rows" in table.stdout

    done = cli("db", "prune", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["audit"] == 2
    assert _audit_actions(url) == ["rotation.promoted", "journal.pruned"]
    again = cli("db", "prune")
    assert again.returncode == 0 and "deleted 0 rows" in again.stdout


def test_db_prune_says_so_when_another_process_prunes(tmp_path: Path, sim: SimServer) -> None:
    cli = _cli(tmp_path, sim)
    cli("db", "current")
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        assert journal.acquire(LEASE, "replica-1:42", timedelta(minutes=5))
    finally:
        journal.close()
    busy = cli("db", "prune")
    assert busy.returncode != 0
    assert "another process is pruning the journal now (replica-1:42)" in busy.stderr
    assert "Traceback" not in busy.stderr


def test_a_prune_killed_between_batches_kept_what_it_committed(
    tmp_path: Path, sim: SimServer
) -> None:
    cli = _cli(tmp_path, sim)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    cli("db", "current")
    _old_audit(url, [500.0 - i * 0.01 for i in range(35)] + [1])
    killed = cli("db", "prune", env={ENV_VAR: "prune-batch:audit"})
    assert killed.returncode == KILLED
    assert len(_audit_actions(url)) == 36 - 10  # the first batch was committed
    # the killed process's lease lingers until it expires; then the next pass goes on
    later = Journal(url, clock=FakeClock(utcnow() + timedelta(minutes=2)))
    try:
        assert later.lock_holder(LEASE) is None
        done = prune(later, RetentionSettings(batch=10), active_window=WINDOW, owner="next")
    finally:
        later.close()
    assert done.counts["audit"] == 25 and done.complete
    assert _audit_actions(url) == ["rotation.promoted", "journal.pruned"]


def test_run_due_prunes_at_its_end(tmp_path: Path, sim: SimServer) -> None:
    cli = _cli(tmp_path, sim)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    cli("db", "current")
    _old_audit(url, [500, 450])
    run = cli("run-due")
    assert run.returncode == 0, run.stderr
    journal = Journal(url)
    try:
        entries = journal.audit_entries(limit=None, oldest_first=True)
    finally:
        journal.close()
    assert min(e.at for e in entries) > utcnow() - timedelta(days=1)  # the old ones went
    assert {"rotation.promoted", "journal.pruned"} <= {e.action for e in entries}


async def test_serve_prunes_on_its_schedule_and_counts_it(make_runtime: RuntimeFactory) -> None:
    runtime = make_runtime()
    journal = runtime.journal
    now = utcnow()
    for age in (500, 450, 1):
        journal.audit(actor="t", action="rotation.promoted", outcome="ok")
        journal.execute(
            "age it",
            AuditEntry.__table__.update()  # type: ignore[attr-defined]
            .where(AuditEntry.id == journal.audit_settled())
            .values(at=now - timedelta(days=age)),
        )
    metrics = Metrics()
    scheduler = AsyncIOScheduler(timezone=UTC)
    # a clock two minutes behind: the first pass (a minute after start) is already due
    _schedule_pruning(scheduler, runtime, metrics, FakeClock(now - timedelta(minutes=2)))
    scheduler.start()
    try:
        await until(
            "serve's pass pruned the old entries",
            lambda: [e.action for e in journal.audit_entries(limit=None, oldest_first=True)]
            == ["rotation.promoted", "journal.pruned"],
        )
    finally:
        scheduler.shutdown(wait=False)
    assert b'rotator_journal_pruned_rows_total{table="audit"} 2.0' in metrics.render()
