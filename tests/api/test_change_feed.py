"""The replica feed reads what changed, not every row: change numbers kept by the journal's
triggers (migration 0007), a promotion elsewhere read as its one row, nothing read while
nothing changes, token bodies read after start (or on first request), and on PostgreSQL a
change committed out of number order still found by the safety poll."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, select

from rotator.api.cache import TokenCache
from rotator.api.feed import ReplicaFeed
from rotator.journal import CredentialState, Journal
from rotator.keys import KeyIndex
from rotator.rotation.runtime import Runtime
from tests.api.conftest import ENVS, Factory, LogTrap, bearer, make_keys
from tests.wait import until

FILLER = 40
"""Extra credential rows, so that a full read and a read of the changed row differ plainly."""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("pg_url"))


def change_seq(journal: Journal, env: str, cred: str) -> int | None:
    with journal.reader() as s:
        return s.scalar(
            select(CredentialState.change_seq).where(
                CredentialState.environment == env, CredentialState.credential == cred
            )
        )


def fill(journal: Journal) -> None:
    for i in range(FILLER):
        journal.set_state("prod", f"filler-{i}", current_version_id=f"filler-version-{i}")


async def test_the_journal_numbers_each_change_of_current_version(
    serve: Factory, shared_journal: str
) -> None:
    journal = (await serve(journal_url=shared_journal)).runtime.journal
    journal.set_state("prod", "numbered", current_version_id="v1")
    first = change_seq(journal, "prod", "numbered")
    assert first is not None
    journal.set_state("prod", "other", current_version_id="o1")
    other = change_seq(journal, "prod", "other")
    assert other is not None and other > first
    journal.set_state("prod", "numbered", last_outcome="failed")  # not a version change
    assert change_seq(journal, "prod", "numbered") == first
    journal.set_state("prod", "numbered", current_version_id="v1")  # the same version
    assert change_seq(journal, "prod", "numbered") == first
    journal.set_state("prod", "numbered", current_version_id="v2")
    second = change_seq(journal, "prod", "numbered")
    assert second is not None and second > other


async def test_a_promotion_elsewhere_is_read_as_its_row_and_nothing_is_read_while_idle(
    serve: Factory, log_trap: LogTrap, shared_journal: str
) -> None:
    sqlite = shared_journal.startswith("sqlite")
    # PostgreSQL: no timer looks during the test (NOTIFY wakes the feed); its safety poll
    # re-reads the changes of the last minute, by design
    api = None if sqlite else {"replica_poll": "1h"}
    one = await serve(journal_url=shared_journal, api=api)
    fill(one.runtime.journal)
    first = await one.rotate("prod", "alpha")
    two = await serve(journal_url=shared_journal, api=api)
    feed = two.app.feed
    rows = FILLER + 1
    # at start one full read; on PostgreSQL the listener's first connect reads every row again
    full_reads = 1 if sqlite else 2
    await until("two's full reads", lambda: feed.rows_read >= full_reads * rows)
    keys = make_keys(one, log_trap)
    two.app.state.keys.load(two.runtime.journal)
    key = bearer(keys.reader["prod"])
    r = await two.http.get("/v1/tokens/prod/alpha", headers=key)
    assert r.status_code == 200 and r.json()["version"] == first

    read_before, polls = feed.rows_read, feed.polls
    second = await one.rotate("prod", "alpha")

    async def served() -> bool:
        r = await two.http.get("/v1/tokens/prod/alpha", headers=key)
        return r.status_code == 200 and r.json()["version"] == second

    await until("two to serve the promotion", served)
    assert feed.polls > polls
    # the changed row (on PostgreSQL read twice at most: named by the notification, and above
    # the last number), never the whole table
    assert 1 <= feed.rows_read - read_before <= 2

    # idle: looks, and reads no row
    read_idle, polls = feed.rows_read, feed.polls
    for _ in range(3):
        feed.changed()  # a look now, as a notification or the timer would start
        await until("a look", lambda n=feed.polls: feed.polls > n)
    assert feed.polls >= polls + 3
    assert feed.rows_read == read_idle


async def test_ready_before_any_token_is_read_and_reads_serve_the_current_version(
    serve: Factory, log_trap: LogTrap, shared_journal: str
) -> None:
    one = await serve(journal_url=shared_journal)
    versions = {}
    for env, creds in ENVS.items():
        for cred in creds:
            await one.rotate(env, cred)
            versions[(env, cred)] = await one.rotate(env, cred)

    # a second process's start: the journal's versions known, no token read
    runtime: Runtime = one.runtime
    cache = TokenCache(runtime)
    feed = ReplicaFeed(runtime.journal, cache, KeyIndex(), poll_s=0.25)
    feed.start()
    assert cache.entries == {}
    assert {k: v for k, v in feed.versions().items() if k in versions} == versions

    # a replica serving at once: each read is the journal's current version, warm or not
    two = await serve(journal_url=shared_journal)
    keys = make_keys(one, log_trap)
    two.app.state.keys.load(two.runtime.journal)
    for (env, cred), version in versions.items():
        r = await two.http.get(f"/v1/tokens/{env}/{cred}", headers=bearer(keys.reader[env]))
        assert r.status_code == 200 and r.json()["version"] == version

    # the warm-up with versions read before a promotion: the promoted one stays served
    stale = feed.versions()
    served = {env: frozenset(creds) for env, creds in ENVS.items()}
    third = await one.rotate("prod", "beta")
    cache.bind(asyncio.get_running_loop())
    cached = await cache.warm(stale, served)
    assert cached == len(versions)
    entry = cache.entries[("prod", "beta")]
    assert entry.version == third
    older = dataclasses.replace(entry, version=versions[("prod", "beta")])
    assert cache.put(older) is False  # an older version never replaces a newer one
    assert cache.entries[("prod", "beta")].version == third


@pytest.mark.postgres
async def test_a_change_committed_out_of_number_order_is_found_by_the_safety_poll(
    serve: Factory, pg_url: str
) -> None:
    import psycopg

    one = await serve(journal_url=pg_url)
    journal = one.runtime.journal
    journal.set_state("prod", "early", current_version_id="e1")
    journal.set_state("prod", "late", current_version_id="l1")
    feed = ReplicaFeed(journal, TokenCache(one.runtime), KeyIndex(), poll_s=5)
    feed.start()

    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as slow:  # takes its number first, commits last
        slow.execute(
            "UPDATE credential_state SET current_version_id = 'e2' "
            "WHERE environment = 'prod' AND credential = 'early'"
        )
        journal.set_state("prod", "late", current_version_id="l2")
        states, drops, _ = feed.poll()
        feed._apply(states, drops)
        assert states[("prod", "late")][0] == "l2"
        slow.commit()
    states, drops, _ = feed.poll(safety=True)  # no notification named it: the timer's look
    feed._apply(states, drops)
    assert states[("prod", "early")][0] == "e2"
    assert feed.versions()[("prod", "early")] == "e2"


async def test_the_journal_gauges_describe_every_family_they_collect(serve: Factory) -> None:
    """Registering them reads the families from ``describe`` (not every credential's state):
    it must name everything ``collect`` yields."""
    from rotator.metrics import JournalGauges, Probes

    one = await serve()
    await one.rotate("prod", "alpha")
    probes = Probes(
        webhook_depth=lambda: {},
        stale_readers=lambda: {},
        backends_agree=lambda: {("prod", "alpha"): True},
    )
    gauges = JournalGauges(one.runtime.config, one.runtime.journal, lambda: probes)
    collected = {family.name for family in gauges.collect()}
    described = [family.name for family in gauges.describe()]
    assert len(collected) == 10
    assert collected == set(described)


async def test_on_sqlite_a_look_runs_no_query_until_a_connection_commits(
    serve: Factory, tmp_path: Path
) -> None:
    # the idle cost of a replica on SQLite: every api.replica_poll (250 ms) a pragma, no query
    path = tmp_path / "quiet.db"
    one = await serve(journal_url=f"sqlite:///{path}")
    journal = one.runtime.journal
    journal.set_state("prod", "quiet", current_version_id="q1")
    feed = ReplicaFeed(journal, TokenCache(one.runtime), KeyIndex(), poll_s=5)
    feed.start()
    mine = threading.get_ident()  # the polls below run here, without awaiting in between
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if threading.get_ident() == mine:
            statements.append(statement)

    event.listen(journal.engine, "before_cursor_execute", count)
    try:
        for _ in range(3):
            assert feed.poll() == ({}, [], False)
        assert statements == []  # not even the marks: nothing was committed since start
        with contextlib.closing(sqlite3.connect(path)) as other:  # another process's commit
            other.execute(
                "UPDATE credential_state SET current_version_id = 'q2' "
                "WHERE environment = 'prod' AND credential = 'quiet'"
            )
            other.commit()
        states, _, _ = feed.poll()
        assert states[("prod", "quiet")][0] == "q2"
        assert statements  # the marks, then the changed row
        read = len(statements)
        feed.changed("credential_state prod quiet")  # a named look reads, whatever the mark
        assert feed.poll()[0][("prod", "quiet")][0] == "q2"
        assert len(statements) > read
    finally:
        event.remove(journal.engine, "before_cursor_execute", count)
