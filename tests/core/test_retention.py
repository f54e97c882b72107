"""Retention: the journal's history pruned, on SQLite and on a real PostgreSQL, never what an
open rotation or revoke, a credential's status or a SIEM cursor needs."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from rotator.errors import ConfigError
from rotator.journal import Journal, Rotation, Step
from rotator.journal import audit as audit_log
from rotator.journal.retention import LEASE, Busy, prune
from rotator.journal.schema import (
    AuditEntry,
    ReaderRead,
    RevokeRecord,
    UnaccountedToken,
    WebhookEvent,
)
from rotator.settings import RetentionSettings, load_config
from tests.clock import FakeClock

NOW = datetime(2030, 6, 1, tzinfo=UTC)
DAY = timedelta(days=1)
WINDOW = timedelta(hours=24)
KEEP = RetentionSettings()  # audit 400d, rotations 90d


def _rot(
    journal: Journal,
    cred: str,
    age_days: float,
    *,
    step: str = Step.DONE,
    kind: str = "rotate",
    sealed: bytes | None = None,
    finished: bool = True,
    env: str = "prod",
) -> Rotation:
    at = NOW - age_days * DAY
    row = Rotation(
        id=str(uuid.uuid4()),
        environment=env,
        credential=cred,
        kind=kind,
        step=step,
        version_id=str(uuid.uuid4()),
        started_at=at - timedelta(minutes=1),
        updated_at=at,
        finished_at=at if finished else None,
        sealed=sealed,
        attempts=0,
        notes="[]",
        reason="t",
        actor="t",
    )
    return journal.add_rotation(row)


def _ids(journal: Journal) -> set[str]:
    return {r.id for r in journal.rotations(limit=10_000)}


def _prune(journal: Journal, keep: RetentionSettings = KEEP, **kw: Any) -> Any:
    return prune(journal, keep, active_window=WINDOW, owner="test", **kw)


@pytest.fixture
def journal(journal_url: str) -> Any:
    j = Journal(journal_url, clock=FakeClock(NOW))
    yield j
    j.close()


def test_old_finished_rotations_go_and_what_anything_needs_stays(journal: Journal) -> None:
    # a: old history; the latest, which made the current version, stays
    a1, a2, a3 = (_rot(journal, "a", d) for d in (200, 150, 120))
    journal.set_state("prod", "a", current_version_id=a3.version_id)
    # b: an open rotation keeps every row of its credential
    b1 = _rot(journal, "b", 200)
    _rot(journal, "b", 100)
    b_open = _rot(journal, "b", 1, step=Step.STAGED, finished=False)
    # c: a superseded rotation still holding a sealed token stays, whatever its age
    c1 = _rot(journal, "c", 300, step=Step.SUPERSEDED, sealed=b"sealed")
    c2 = _rot(journal, "c", 200, step=Step.FAILED)
    _rot(journal, "c", 100)
    # d: the old revoke (and its record) goes, the latest revoke stays
    d_old = _rot(journal, "d", 300, kind="revoke", step="revoke-done")
    d_new = _rot(journal, "d", 200, kind="revoke", step="revoke-done")
    d_rot = _rot(journal, "d", 150)
    for rid in (d_old.id, d_new.id):
        journal.save_revoke_record(
            rid,
            {
                "strategy": "issue",
                "method": "issue",
                "escalate": False,
                "replace": True,
                "target_stage": None,
                "current_version": None,
            },
        )
    # e: an unfinished revoke keeps every row of its credential
    e1 = _rot(journal, "e", 300)
    _rot(journal, "e", 200)
    _rot(journal, "e", 100, kind="revoke", step="revoke-killed", finished=False)
    # f: a rotation an open unaccounted token names stays
    f1 = _rot(journal, "f", 300, step=Step.FAILED)
    _rot(journal, "f", 200)
    journal.execute(
        "add",
        insert(UnaccountedToken).values(
            environment="prod",
            credential="f",
            connection_id="conn-f",
            rotation_id=f1.id,
            asked_at=NOW - 300 * DAY,
            recorded_at=NOW - 300 * DAY,
            cause="lost",
            status="open",
        ),
    )
    # g: recent history stays
    g1, g2 = _rot(journal, "g", 30), _rot(journal, "g", 10)
    # another environment is pruned by the same rules
    o1, o2 = _rot(journal, "x", 200, env="dev"), _rot(journal, "x", 100, env="dev")

    before = _ids(journal)
    dry = _prune(journal, dry_run=True)
    assert _ids(journal) == before  # a dry run deletes nothing
    done = _prune(journal)

    gone = {a1.id, a2.id, c2.id, d_old.id, o1.id}
    assert dry.counts["rotations"] == done.counts["rotations"] == len(gone)
    assert dry.counts["revoke_records"] == done.counts["revoke_records"] == 1
    assert _ids(journal) == before - gone
    for kept in (a3, b1, b_open, c1, d_new, d_rot, e1, f1, g1, g2, o2):
        assert journal.rotation(kept.id) is not None
    assert journal.revoke_record(d_old.id) is None
    assert journal.revoke_record(d_new.id) is not None
    assert done.complete and done.total == 6
    entry = journal.audit_entries(action="journal.pruned")[0]
    detail = json.loads(entry.detail)
    assert entry.outcome == "ok" and detail["counts"]["rotations"] == 5
    # a second pass finds nothing: idempotent
    assert _prune(journal).total == 0


def test_forever_keeps_everything(journal: Journal) -> None:
    _rot(journal, "a", 5000)
    _rot(journal, "a", 4000)
    forever = RetentionSettings(audit=None, rotations=None)
    journal.audit(actor="t", action="rotation.started", outcome="ok")
    assert _prune(journal, forever).total == 0
    assert len(_ids(journal)) == 2


def _audit_at(journal: Journal, clock: FakeClock, ages_days: list[float]) -> None:
    for age in ages_days:
        journal.execute(
            "add",
            insert(AuditEntry).values(
                at=NOW - age * DAY,
                actor="t",
                action="rotation.promoted",
                outcome="ok",
                request_ids="[]",
                detail="{}",
            ),
        )


def test_audit_older_than_its_retention_goes_and_a_siem_cursor_carries_on(
    journal: Journal,
) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [500, 450, 420, 300, 10])
    shipped = io.StringIO()
    cursor = audit_log.ship(journal, shipped, audit_log.Filters(), after=0, batch=2)
    seqs = [json.loads(line)["seq"] for line in shipped.getvalue().splitlines()]
    assert cursor == seqs[-1] == 5

    done = _prune(journal)
    assert done.counts["audit"] == 3
    left = [e.id for e in journal.audit_entries(limit=None, oldest_first=True)]
    assert left[:2] == [4, 5] and left[2] == 6  # the journal.pruned entry comes next

    journal.audit(actor="t", action="rotation.started", outcome="ok")
    more = io.StringIO()
    assert audit_log.ship(journal, more, audit_log.Filters(), after=cursor) == 7
    assert [json.loads(x)["seq"] for x in more.getvalue().splitlines()] == [6, 7]
    # a cursor that points into what was pruned works too: it ships what is left after it
    older = io.StringIO()
    audit_log.ship(journal, older, audit_log.Filters(), after=2)
    assert [json.loads(x)["seq"] for x in older.getvalue().splitlines()] == [4, 5, 6, 7]


def test_the_newest_entry_stays_so_sequence_numbers_never_repeat(journal: Journal) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [900, 800, 700])
    done = _prune(journal)
    assert done.counts["audit"] == 2
    assert [e.id for e in journal.audit_entries(limit=None)] == [4, 3]  # pruned entry, newest
    clock.advance(2000 * 86400)
    done = _prune(journal)
    assert done.counts["audit"] == 1  # entry 3 goes, 4 (the newest) stays
    journal.audit(actor="t", action="rotation.started", outcome="ok")
    ids = [e.id for e in journal.audit_entries(limit=None, oldest_first=True)]
    assert ids == [4, 5, 6] and journal.audit_settled() == 6


def test_a_pass_commits_batch_by_batch_and_the_next_goes_on(journal: Journal) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [500.0 - i * 0.01 for i in range(45)] + [1])
    seen: list[dict[str, int]] = []

    class Crash(Exception):
        pass

    def crash_after_two(counts: dict[str, int]) -> None:
        seen.append(counts)
        if len(seen) == 2:
            raise Crash

    with pytest.raises(Crash):
        _prune(journal, batch=10, on_batch=crash_after_two)
    assert seen == [{"audit": 10}, {"audit": 10}]
    assert len(journal.audit_entries(action="rotation", limit=None)) == 46 - 20  # committed
    partial = journal.audit_entries(action="journal.pruned")
    assert [e.outcome for e in partial] == ["partial"]  # what it deleted is said
    assert json.loads(partial[0].detail)["counts"]["audit"] == 20
    assert journal.lock_holder(LEASE) is None  # the lease went back
    done = _prune(journal, batch=10)
    assert done.counts["audit"] == 25 and done.batches == 3 + 4  # one empty look per other table
    assert len(journal.audit_entries(action="rotation", limit=None)) == 1  # the recent one


def test_a_pass_stops_at_its_budget_and_leaves_the_rest(journal: Journal) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [500.0 - i * 0.01 for i in range(30)] + [1])
    done = _prune(journal, batch=10, budget_s=5, on_batch=lambda _c: clock.advance(3))
    assert done.counts["audit"] == 20 and not done.complete
    entry = journal.audit_entries(action="journal.pruned")[0]
    assert entry.outcome == "partial"


def test_one_process_prunes_at_a_time(journal_url: str) -> None:
    clock = FakeClock(NOW)
    one, two = Journal(journal_url, clock=clock), Journal(journal_url, clock=clock)
    try:
        _audit_at(one, clock, [500, 400, 1])
        assert one.acquire(LEASE, "replica-1", timedelta(seconds=30))
        with pytest.raises(Busy) as busy:
            prune(two, KEEP, active_window=WINDOW, owner="replica-2")
        assert busy.value.holder == "replica-1"
        assert len(two.audit_entries(limit=None)) == 3  # nothing pruned by the second
        clock.advance(31)  # replica-1 died without giving it back: its lease expires
        done = prune(two, KEEP, active_window=WINDOW, owner="replica-2")
        assert done.counts["audit"] == 2
        # replica-1 wakes and prunes again: nothing is left to delete twice
        assert prune(one, KEEP, active_window=WINDOW, owner="replica-1").total == 0
    finally:
        one.close()
        two.close()


def test_webhooks_unaccounted_tokens_and_reader_records(journal: Journal) -> None:
    old, recent = NOW - 200 * DAY, NOW - 10 * DAY
    for i, (status, at) in enumerate(
        [("done", old), ("ignored", old), ("failed", old), ("pending", old), ("done", recent)]
    ):
        journal.execute(
            "add",
            insert(WebhookEvent).values(
                environment="prod",
                webhook_id=f"w{i}",
                received_at=at,
                processed_at=None if status == "pending" else at,
                payload="{}",
                status=status,
                attempts=1,
            ),
        )
    for i, (status, closed) in enumerate(
        [("resolved", old), ("acknowledged", old), ("open", None), ("resolved", recent)]
    ):
        journal.execute(
            "add",
            insert(UnaccountedToken).values(
                environment="prod",
                credential=f"u{i}",
                connection_id="c",
                asked_at=old,
                recorded_at=old,
                cause="lost",
                status=status,
                closed_at=closed,
            ),
        )
    for i, at in enumerate([old, recent]):
        journal.execute(
            "add",
            insert(ReaderRead).values(
                key_id=f"k{i}",
                environment="prod",
                credential="a",
                version_id="v",
                key_name="k",
                first_at=at,
                last_at=at,
                count=1,
            ),
        )
    done = _prune(journal)
    assert done.counts["webhook_events"] == 3
    assert done.counts["unaccounted_tokens"] == 2
    assert done.counts["reader_reads"] == 1
    with journal.reader() as s:
        hooks = set(s.scalars(select(WebhookEvent.webhook_id)))
        tokens = set(s.scalars(select(UnaccountedToken.credential)))
        reads = set(s.scalars(select(ReaderRead.key_id)))
        records = list(s.scalars(select(RevokeRecord)))
    assert hooks == {"w3", "w4"} and tokens == {"u2", "u3"} and reads == {"k1"}
    assert records == []


ENV = """
[environments.dev]
sealing_key = { env = "DEV_SEAL" }
[environments.dev.makini]
client_id = "d"
client_secret_env = "D_SECRET"
[[environments.dev.backends]]
type = "file"
path = "dev-files"
key = { file = "dev.key", generate = true }
"""


def _load(tmp_path: Path, retention: str) -> RetentionSettings:
    path = tmp_path / "rotator.toml"
    path.write_text(f"[journal.retention]\n{retention}\n{ENV}")
    return load_config(path).journal.retention


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('audit = "10d"', "journal.retention.audit: must be at least 30d"),
        ('rotations = "2d"', "journal.retention.rotations: must be at least 7d"),
        ('audit = "a year"', "journal.retention.audit: 'a year' is not a duration"),
        ('interval = "5s"', "journal.retention.interval: must be at least 1m"),
        ("batch = 1", "journal.retention.batch"),
        ('keep = "1d"', "journal.retention.keep"),
    ],
)
def test_bad_retention_names_its_key(tmp_path: Path, line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, line)
    assert expected in err.value.describe()


def test_retention_accepts_durations_and_forever(tmp_path: Path) -> None:
    got = _load(tmp_path, 'audit = "forever"\nrotations = "P30D"\ninterval = "15m"')
    assert got.audit is None and got.rotations == timedelta(days=30)
    assert got.interval == timedelta(minutes=15) and got.enabled
    off = _load(tmp_path, 'audit = "off"\nrotations = "never"')
    assert off.audit is None and off.rotations is None and not off.enabled
    default = _load(tmp_path, "")
    assert default.audit == timedelta(days=400) and default.rotations == timedelta(days=90)
    assert default.interval == timedelta(hours=1)


def test_a_pass_whose_lease_was_taken_over_stops(journal: Journal) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [500.0 - i * 0.01 for i in range(30)] + [1])

    def paused_past_its_lease(_counts: dict[str, int]) -> None:
        clock.advance(31)  # a long GC pause: the lease expired, another replica took it
        assert journal.acquire(LEASE, "replica-2", timedelta(seconds=30))

    done = _prune(journal, batch=10, on_batch=paused_past_its_lease)
    assert done.counts["audit"] == 10 and not done.complete  # it deleted nothing more
    assert journal.lock_holder(LEASE) is not None  # and left replica-2's lease alone
    assert journal.lock_holder(LEASE).owner == "replica-2"  # type: ignore[union-attr]


def test_a_pass_ends_after_its_batch_when_the_process_drains(journal: Journal) -> None:
    clock = journal.clock
    assert isinstance(clock, FakeClock)
    _audit_at(journal, clock, [500.0 - i * 0.01 for i in range(30)] + [1])
    drained: list[bool] = []
    done = _prune(
        journal, batch=10, on_batch=lambda _c: drained.append(True), stopping=lambda: bool(drained)
    )
    assert done.counts["audit"] == 10 and not done.complete
    assert journal.lock_holder(LEASE) is None  # given back for the next replica
