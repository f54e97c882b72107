"""``rotator status`` reads the journal as a snapshot (``sqlite3``, no runtime) where it can:
what it shows must be exactly what the runtime's :func:`collect` shows, credential by
credential, on a journal where every column has something to say (healthy, no token yet,
backends that differ, an open rotation, a stalled lease, attention, unaccounted tokens, a
reader on an old version, a discovered credential, an off-boarded one); and where it cannot
(PostgreSQL, a journal to create or migrate) it says so and the command opens the runtime."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from rotator.journal import snapshot
from rotator.keys import create_key
from rotator.makini.sim import SimServer
from rotator.model import Secret, StoredVersion, TokenPair, new_version_id, utcnow
from rotator.readers import write_batch
from rotator.rotation import discovery
from rotator.rotation.status import collect, read_status
from tests.clock import FakeClock
from tests.factories import Runtimes, environment, make_config

NAMES = ("healthy", "fresh", "differ", "opened", "stalled", "attention")


def _config(tmp_path: Path, sim: SimServer, url: str) -> Any:
    envs = {
        "prod": environment(
            sim.url,
            "test-prod",
            [{"name": n, "connection_id": f"conn-{n}"} for n in NAMES],
            sealing_env="SEAL_STATUS_READ",
            backends=[
                {"type": "memory", "name": "mem", "namespace": str(tmp_path)},
                {
                    "type": "file",
                    "name": "file",
                    "path": "files",
                    "key": {"file": "file.key", "generate": True},
                },
            ],
        )
    }
    envs["prod"]["discover"] = {"enabled": True}
    return make_config(tmp_path, url, envs)


def _shown(rows: list[Any], now: Any) -> list[dict[str, Any]]:
    return [r.as_dict(now) for r in rows]


async def test_the_snapshot_shows_exactly_what_the_runtime_shows(
    tmp_path: Path, sim: SimServer, runtimes: Runtimes
) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    clock = FakeClock(utcnow())
    runtime = runtimes.open(_config(tmp_path, sim, url), clock=clock)
    engine, journal = runtime.engine, runtime.journal
    for name in ("healthy", "differ", "opened", "stalled", "attention"):
        result = await engine.rotate("prod", name, reason="t", actor="t")
        assert result.ok, result
    # one backend holds another current version than the journal says
    mem = runtime.environments["prod"].backends[0]
    other = StoredVersion("prod", "differ", new_version_id(), TokenPair(Secret("x" * 32)))
    mem.stage_pending(other)
    mem.promote("differ", other.version_id)
    # an open rotation (Makini went away in the middle of it)
    sim.set(outage_s=30)
    stopped = await engine.rotate("prod", "opened", reason="t", actor="t")
    sim.set(outage_until=None)
    assert not stopped.ok and journal.open_rotation("prod", "opened") is not None
    # a rotation due, and its lease held by a holder that stopped renewing it
    journal.set_state("prod", "stalled", expires_at=utcnow() + timedelta(minutes=1))
    assert journal.acquire("prod/stalled", "dead-holder", ttl=timedelta(seconds=1))
    journal.set_state("prod", "attention", attention="Makini says the connection is gone")
    journal.set_state("prod", "attention", unaccounted=2)
    # a reader that last read the version before the current one
    info, _ = create_key(journal, "prod", "billing")
    at = utcnow().timestamp()
    write_batch(journal, {(info.key_id, "prod", "healthy", "an-old-one"): [at, at, 3, "billing"]})
    # a discovered credential, and one off-boarded (still shown, never planned)
    sim.add_connection("c-new", "test-prod", platform="SAP", company="Acme")
    sim.add_connection("c-gone", "test-prod")
    await discovery.discover(runtime, "prod", first_tokens=False)
    sim.remove_connection("c-gone")
    await discovery.discover(runtime, "prod", first_tokens=False)

    fresh = _config(tmp_path, sim, url)  # as a command loads it: the file's credentials
    light = read_status(fresh, clock=clock)
    assert light is not None  # a SQLite journal at this release's revision
    now = runtime.engine.clock.now()
    assert _shown(light, now) == _shown(await collect(runtime), now)
    # and the journal had something to say in every column
    by_name = {r["credential"]: r for r in _shown(light, now)}
    assert set(by_name) == {*NAMES, "sap-c-new"}  # the off-boarded one is not planned, as before
    assert by_name["healthy"]["stale_readers"][0]["name"] == "billing"
    assert by_name["differ"]["backends_agree"] is False
    assert by_name["fresh"]["next_action"] == "rotate"
    assert by_name["opened"]["open_step"] is not None
    assert "dead-holder" in (by_name["stalled"]["stalled_lease"] or "")
    assert by_name["attention"]["attention"] and by_name["attention"]["unaccounted"] == 2
    one = read_status(fresh, "prod", clock=clock)
    assert one is not None and _shown(one, now) == _shown(light, now)


def test_a_journal_the_snapshot_cannot_read_is_left_to_the_runtime(tmp_path: Path) -> None:
    since = utcnow()
    missing = tmp_path / "none.db"
    assert snapshot.read(f"sqlite:///{missing}", since=since, environments=["prod"]) is None
    assert not missing.exists()  # never created: creating and migrating are the Journal's
    assert snapshot.read("postgresql+psycopg://u@h/db", since=since, environments=[]) is None
    import sqlite3

    behind = tmp_path / "behind.db"
    with sqlite3.connect(behind) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('0001')")
    assert snapshot.read(f"sqlite:///{behind}", since=since, environments=[]) is None
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    assert snapshot.read(f"sqlite:///{garbage}", since=since, environments=[]) is None

