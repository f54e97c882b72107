"""Two API processes on one journal: a promotion, a revoke and a key revocation made through
one are seen by the other within a second (SQLite: polling; PostgreSQL: LISTEN/NOTIFY)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rotator.api.cache import drop_everywhere
from rotator.keys import revoke_key
from tests.api.conftest import Factory, LogTrap, bearer, make_keys, wait_for
from tests.wait import until


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_replicas_learn_through_the_journal(
    serve: Factory, log_trap: LogTrap, shared_journal: str
) -> None:
    one = await serve(journal_url=shared_journal)
    two = await serve(journal_url=shared_journal)
    keys = make_keys(one, log_trap)
    two.app.state.keys.load(two.runtime.journal)
    key = bearer(keys.reader["prod"])
    first = await one.rotate("prod", "alpha")
    r = await two.http.get("/v1/tokens/prod/alpha", headers=key)  # a miss: primary backend
    assert r.json()["version"] == first

    async def served_by_two(version: str) -> bool:
        r = await two.http.get("/v1/tokens/prod/alpha", headers=key)
        return r.status_code == 200 and r.json()["version"] == version

    # a promotion through one: two's cache follows
    second = await one.rotate("prod", "alpha")
    took = await wait_for(lambda: served_by_two(second))
    assert took < 1.0

    # a long-poll on two wakes on a promotion through one
    poll = asyncio.ensure_future(
        two.http.get(f"/v1/tokens/prod/alpha?wait=10&known_version={second}", headers=key)
    )
    await until("two's long-poll to wait", lambda: two.app.state.cache.waiting("prod", "alpha"))
    third = await one.rotate("prod", "alpha")
    r = await asyncio.wait_for(poll, 3)
    assert r.status_code == 200 and r.json()["version"] == third

    # an emergency drop through one: two stops serving the version
    await asyncio.to_thread(drop_everywhere, one.runtime.journal, "prod", "alpha", third)

    async def refused_by_two() -> bool:
        r = await two.http.get("/v1/tokens/prod/alpha", headers=key)
        return r.status_code == 503

    assert await wait_for(refused_by_two) < 1.0

    # a revoked key: two refuses it
    info = two.app.state.keys.verify(keys.reader["dev"])
    assert info is not None
    revoke_key(one.runtime.journal, info.key_id)
    dev = bearer(keys.reader["dev"])

    async def key_refused() -> bool:
        return (await two.http.get("/v1/tokens/dev/alpha", headers=dev)).status_code == 401

    assert await wait_for(key_refused) < 1.0
    if not shared_journal.startswith("sqlite"):
        # PostgreSQL polls only every 5 s: everything above within a second was NOTIFY
        assert two.app.feed.poll_s >= 5.0
