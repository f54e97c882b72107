"""An emergency revoke's decisions in their own table, on SQLite and on a real PostgreSQL: written
and read back as the revoke builds them, fenced by the lease, and moved there from the notes of
revokes that an older release left open."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from rotator.errors import JournalError, LeaseLost
from rotator.journal import Journal, RevokeRecord, Rotation, Step, migrate
from tests.clock import FakeClock


def _record(**changes: Any) -> dict[str, Any]:
    """A record as ``rotator.revoke`` builds it (``dataclasses.asdict`` of its ``Record``)."""
    record: dict[str, Any] = {
        "strategy": "auto",
        "method": "issue",
        "escalate": False,
        "replace": True,
        "target_stage": "current",
        "current_version": "v-old",
        "superseded": [
            {"id": "r-0", "step": "issued", "version_id": "v-new", "old_version_id": "v-old"}
        ],
        "adopted": None,
        "disconnected": False,
        "replaced": None,
    }
    return {**record, **changes}


def _revoke_row(clock: FakeClock, rotation_id: str = "rev-1", notes: str = "[]") -> Rotation:
    now = clock.now()
    return Rotation(
        id=rotation_id,
        environment="prod",
        credential="a",
        kind="revoke",
        step=Step.STARTED,
        version_id="v-old",
        reason="leaked",
        actor="ops",
        started_at=now,
        updated_at=now,
        attempts=0,
        notes=notes,
    )


def test_a_record_is_read_back_as_last_written(journal_url: str) -> None:
    clock = FakeClock()
    journal = Journal(journal_url, clock=clock)
    try:
        journal.add_rotation(_revoke_row(clock))
        first = _record()
        journal.save_revoke_record("rev-1", first)
        assert journal.revoke_record("rev-1") == first
        clock.advance(5)
        later = _record(adopted="r-0", disconnected=True, replaced="v-3")
        journal.save_revoke_record("rev-1", later)
        assert journal.revoke_record("rev-1") == later
        assert journal.revoke_record("rev-other") is None
        with journal.reader() as s:
            rows = s.execute(
                text("SELECT environment, credential, updated_at FROM revoke_records")
            ).all()
        assert [(r[0], r[1]) for r in rows] == [("prod", "a")]  # one row per revoke
        with journal.reader() as s:
            at = s.scalars(select(RevokeRecord.updated_at)).one()
        assert at == clock.now()
    finally:
        journal.close()


def test_a_record_is_written_only_under_a_live_lease(journal_url: str) -> None:
    clock = FakeClock()
    journal = Journal(journal_url, clock=clock, lock_ttl=timedelta(seconds=10))
    try:
        journal.add_rotation(_revoke_row(clock))
        assert journal.acquire("prod/a", "revoke-1")
        journal.save_revoke_record("rev-1", _record(), lease=("prod/a", "revoke-1"))
        clock.advance(11)  # the lease expired: its holder must not write
        with pytest.raises(LeaseLost):
            journal.save_revoke_record("rev-1", _record(adopted="x"), lease=("prod/a", "revoke-1"))
        assert journal.revoke_record("rev-1") == _record()
    finally:
        journal.close()


def test_a_record_that_does_not_fit_the_table_is_refused(journal_url: str) -> None:
    clock = FakeClock()
    journal = Journal(journal_url, clock=clock)
    try:
        journal.add_rotation(_revoke_row(clock))
        with pytest.raises(ValueError, match="unknown fields \\['surprise'\\]"):
            journal.save_revoke_record("rev-1", _record(surprise=1))
        with pytest.raises(JournalError, match="not in the journal"):
            journal.save_revoke_record("missing", _record())
        assert journal.revoke_record("rev-1") is None
    finally:
        journal.close()


def test_a_record_joins_a_transaction_of_the_caller(journal_url: str) -> None:
    clock = FakeClock()
    journal = Journal(journal_url, clock=clock)
    try:
        journal.add_rotation(_revoke_row(clock))
        with journal.session("start a revoke") as s:
            journal.save_revoke_record_in(s.connection(), "rev-1", _record())
        assert journal.revoke_record("rev-1") == _record()
    finally:
        journal.close()


def test_an_upgrade_moves_open_revokes_records_out_of_their_notes(journal_url: str) -> None:
    # a revoke left open by a release that kept its record as the first note resumes with the
    # same decisions: the record moves to revoke_records, the other notes stay
    engine = create_engine(journal_url)
    try:
        with engine.begin() as conn:
            migrate.run_scripts(conn, "0002")
            earlier, record = _record(), _record(adopted="r-0")
            old_notes = [
                "revoke-record " + json.dumps(earlier, separators=(",", ":")),
                "revoke-record " + json.dumps(record, separators=(",", ":")),
                "killed the old token at Makini",
            ]
            when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
            stored = when if engine.dialect.name != "sqlite" else when.replace(tzinfo=None)
            for rid, notes in (("rev-1", old_notes), ("rot-1", ["a plain note"])):
                conn.execute(
                    text(
                        "INSERT INTO rotations (id, environment, credential, kind, step, "
                        "version_id, reason, actor, started_at, updated_at, attempts, notes) "
                        "VALUES (:id, 'prod', 'a', :kind, 'killed', 'v-old', 'leaked', 'ops', "
                        ":at, :at, 0, :notes)"
                    ),
                    {
                        "id": rid,
                        "kind": "revoke" if rid.startswith("rev") else "rotate",
                        "at": stored,
                        "notes": json.dumps(notes),
                    },
                )
    finally:
        engine.dispose()
    journal = Journal(journal_url)
    try:
        assert migrate.state(journal.engine, journal.where).current
        assert journal.revoke_record("rev-1") == record  # the last one recorded
        revoke = journal.rotation("rev-1")
        assert revoke is not None and revoke.note_list() == ["killed the old token at Makini"]
        plain = journal.rotation("rot-1")
        assert plain is not None and plain.note_list() == ["a plain note"]
        assert journal.revoke_record("rot-1") is None
        with journal.reader() as s:
            at = s.scalars(select(RevokeRecord.updated_at)).one()
        assert at == when  # when the revoke last wrote its record
    finally:
        journal.close()
