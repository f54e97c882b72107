"""Processes opening one empty PostgreSQL journal at the same moment (replicas of a new
deployment): before migrations, ``create_all`` raced and all but one failed with an
IntegrityError on PostgreSQL's catalog. Now one migrates under an advisory lock and the
others find the schema made."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from rotator.journal import Journal, migrate

pytestmark = pytest.mark.postgres

OPENERS = 3


def empty(url: str) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


def test_journals_opened_together_on_an_empty_database_all_succeed(pg_url: str) -> None:
    for attempt in range(3):
        if attempt:
            empty(pg_url)
        barrier = threading.Barrier(OPENERS)

        def open_journal(_: int, barrier: threading.Barrier = barrier) -> Journal:
            barrier.wait()
            return Journal(pg_url)

        with ThreadPoolExecutor(OPENERS) as pool:
            journals = list(pool.map(open_journal, range(OPENERS)))
        try:
            for journal in journals:
                assert migrate.state(journal.engine, journal.where).current
            with journals[0].engine.connect() as conn:
                [count] = conn.exec_driver_sql("SELECT count(*) FROM alembic_version").one()
            assert count == 1
            # each works on the one schema: a lease taken by one is refused to the others
            assert journals[0].acquire("prod/a", "first")
            assert not journals[1].acquire("prod/a", "second")
            journals[2].set_state("prod", "a", attention="x")
            state = journals[1].state("prod", "a")
            assert state is not None and state.attention == "x"
        finally:
            for journal in journals:
                journal.close()
