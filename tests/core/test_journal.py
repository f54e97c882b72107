"""The journal on SQLite and on a real PostgreSQL: leases, steps, audit."""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import pytest

from rotator.errors import ConfigError, JournalError
from rotator.journal import CredentialState, Journal, Rotation, Step
from rotator.model import utcnow
from tests.clock import FakeClock
from tests.wait import wait_until, waiting_in


def _rotation(env: str = "prod", cred: str = "a") -> Rotation:
    now = utcnow()
    return Rotation(
        id=str(uuid.uuid4()),
        environment=env,
        credential=cred,
        kind="rotate",
        step=Step.STARTED,
        version_id=str(uuid.uuid4()),
        started_at=now,
        updated_at=now,
        attempts=0,
        notes="[]",
        reason="t",
        actor="t",
    )


def test_lease_is_exclusive_and_expires(journal_url: str) -> None:
    clock = FakeClock()
    journal = Journal(journal_url, clock=clock)
    assert journal.acquire("prod/a", "w1", timedelta(seconds=30))
    assert not journal.acquire("prod/a", "w2", timedelta(seconds=30))
    assert journal.acquire("prod/a", "w1")  # re-entrant for its owner
    assert journal.renew("prod/a", "w1") and not journal.renew("prod/a", "w2")
    journal.release("prod/a", "w2")  # not the owner: no effect
    assert not journal.acquire("prod/a", "w2")
    journal.release("prod/a", "w1")
    assert journal.acquire("prod/a", "w2", timedelta(milliseconds=1))
    clock.advance(0.01)
    assert journal.acquire("prod/a", "w3")  # w2's lease expired: a crashed holder
    assert not journal.renew("prod/a", "w2")  # and w2 learns it lost the lease
    journal.close()


def test_one_winner_among_racing_workers(journal_url: str) -> None:
    journals = [Journal(journal_url) for _ in range(8)]
    barrier = threading.Barrier(8)

    def race(i: int) -> bool:
        barrier.wait()
        return journals[i].acquire("prod/race", f"w{i}")

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(race, range(8)))
    assert sum(wins) == 1
    for j in journals:
        j.close()


def test_steps_state_and_audit_commit_together(journal_url: str) -> None:
    journal = Journal(journal_url)
    rot = journal.add_rotation(_rotation())
    assert journal.open_rotation("prod", "a") is not None
    journal.commit_step(
        rot.id,
        {"step": Step.PROMOTED, "sealed": None},
        state={"current_version_id": rot.version_id, "rotated_at": utcnow()},
        audit={
            "actor": "t",
            "action": "rotation.promoted",
            "outcome": "success",
            "request_ids": ["r1", None],
        },
    )
    state = journal.state("prod", "a")
    assert state is not None and state.current_version_id == rot.version_id
    assert state.rotated_at is not None and state.rotated_at.tzinfo is not None
    [entry] = journal.audit_entries(environment="prod")
    assert entry.as_dict()["request_ids"] == ["r1"]
    journal.commit_step(rot.id, {"step": Step.DONE})
    assert journal.open_rotation("prod", "a") is None
    with pytest.raises(JournalError):
        journal.commit_step("missing", {"step": Step.DONE})
    journal.close()


def test_bad_url_is_a_config_error(tmp_path: object) -> None:
    with pytest.raises(ConfigError) as info:
        Journal("nosuchdb://x")
    assert "journal URL" in info.value.describe()


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(JournalError) as info:
        Journal("postgresql+psycopg://nobody:pw@127.0.0.1:1/none?connect_timeout=1")
    text = info.value.describe()
    assert "reachable" in text and "pw" not in text


def test_two_journals_on_one_sqlite_file_wait_for_each_other(tmp_path: Path) -> None:
    # Two processes on one SQLite journal: a batch that read first must not lose its write to
    # the other's commit (SQLite refuses, without waiting, to upgrade a stale read snapshot).
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    first, second = Journal(url), Journal(url)
    with ThreadPoolExecutor(1) as pool, first.session("test") as s:
        assert s.get(CredentialState, ("prod", "a")) is None  # a read, then...
        other = pool.submit(second.set_state, "prod", "b", attention="from the other process")
        # ...the other process writes meanwhile (it waits for this batch's turn)
        wait_until("the other writer to wait for its turn", lambda: waiting_in("_turn"))
        s.add(CredentialState(environment="prod", credential="a", attention="from this one"))
    other.result(timeout=30)
    states = first.states("prod")
    assert {k[1]: v.attention for k, v in states.items()} == {
        "a": "from this one",
        "b": "from the other process",
    }
    first.close()
    second.close()


def test_a_writer_waits_for_its_turn_and_wakes_when_the_other_commits(tmp_path: Path) -> None:
    # Writers of processes sharing a SQLite journal take turns on a lock file beside it; one
    # that waits wakes as soon as the turn is free, not after SQLite's busy handler's sleeps.
    journal = Journal(f"sqlite:///{tmp_path}/journal.db")
    turn = tmp_path / "journal.db-writer"
    journal.set_state("prod", "a", attention="x")  # the first write makes the turn file
    assert turn.stat().st_mode & 0o777 == 0o600
    other = os.open(turn, os.O_RDWR)  # another process's writer, holding the turn
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with ThreadPoolExecutor(1) as pool:
            write = pool.submit(journal.acquire, "prod/a", "me")
            wait_until("the writer to wait for its turn", lambda: waiting_in("_turn"))
            assert not write.done()  # it waits for its turn
            assert journal.lock_holder("prod/a") is None
            fcntl.flock(other, fcntl.LOCK_UN)
            assert write.result(timeout=5) is True
    finally:
        os.close(other)
    holder = journal.lock_holder("prod/a")
    assert holder is not None and holder.owner == "me"
    journal.close()
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(FileNotFoundError):  # the listing's own descriptor, closed by now
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert str(turn) not in open_files  # closed with the journal


def test_a_turn_file_that_cannot_be_opened_is_a_journal_error(tmp_path: Path) -> None:
    (tmp_path / "journal.db-writer").mkdir()  # in the way of the writer's turn file
    journal = Journal(f"sqlite:///{tmp_path}/journal.db", migrate="off")
    with pytest.raises(JournalError) as info:
        journal.acquire("prod/a", "me")
    text = info.value.describe()
    assert "journal.db-writer" in text and "writable" in text
    journal.close()


def test_processes_starting_together_create_one_journal(tmp_path: Path) -> None:
    for attempt in range(5):
        url = f"sqlite:///{tmp_path / f'journal-{attempt}.db'}"
        barrier = threading.Barrier(4)

        def open_journal(_: int, url: str = url, barrier: threading.Barrier = barrier) -> Journal:
            barrier.wait()
            return Journal(url)

        with ThreadPoolExecutor(4) as pool:
            journals = list(pool.map(open_journal, range(4)))
        journals[0].set_state("prod", "a", attention="x")
        assert journals[3].state("prod", "a") is not None
        for journal in journals:
            journal.close()


def test_a_failing_work_in_a_batch_undoes_only_its_own_writes(tmp_path: Path) -> None:
    # The writer runs a batch without a savepoint per work, and runs it again with savepoints
    # when a work fails: the failed work's writes go, everyone else's stay, each caller gets
    # its own result.
    journal = Journal(f"sqlite:///{tmp_path}/journal.db")
    gate = threading.Event()
    blocker = journal.submit(gate.wait)  # holds the writer: what follows is one batch
    assert blocker is not None

    def half_then_fail() -> None:
        def work(conn: object) -> None:
            journal._acquire(conn, "prod/bad", "me", None)  # type: ignore[arg-type]
            raise RuntimeError("boom")

        journal.transaction("test", work)

    first = [journal.submit(lambda n=n: journal.acquire(f"prod/ok{n}", "me")) for n in range(3)]
    failing = journal.submit(half_then_fail)
    last = journal.submit(lambda: journal.acquire("prod/ok3", "me"))
    gate.set()
    assert blocker.result(timeout=10)
    for future in [*first, last]:
        assert future is not None and future.result(timeout=10) is True
    assert failing is not None
    with pytest.raises(RuntimeError, match="boom"):
        failing.result(timeout=10)
    assert journal.lock_holder("prod/bad") is None
    for n in range(4):
        holder = journal.lock_holder(f"prod/ok{n}")
        assert holder is not None and holder.owner == "me"
    journal.close()


async def test_coroutines_get_each_result_of_a_batch(tmp_path: Path) -> None:
    journal = Journal(f"sqlite:///{tmp_path}/journal.db")
    gate = threading.Event()
    blocker = journal.submit(gate.wait)  # holds the writer: what follows is one batch
    futures = [
        journal.submit_async(lambda n=n: journal.acquire(f"prod/{n}", "me")) for n in range(4)
    ]
    failing = journal.submit_async(lambda: 1 / 0)
    assert blocker is not None and failing is not None
    wanted = [f for f in futures if f is not None]
    wanted.pop(2).cancel()  # its awaiter gave up before the batch ran: the work never runs
    gate.set()
    assert [await f for f in wanted] == [True, True, True]
    with pytest.raises(ZeroDivisionError):
        await failing
    assert journal.lock_holder("prod/2") is None
    assert journal.lock_holder("prod/3") is not None
    journal.close()
