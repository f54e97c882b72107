"""Fixtures shared by every suite: journals (SQLite and a real PostgreSQL), the bundled Makini
simulator, runtimes closed at the end of a test (configurations: ``tests.factories``), and
fresh memory backends for each test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import backends
from rotator.clock import SYSTEM, Clock
from rotator.rotation.runtime import Runtime
from tests.factories import RuntimeFactory, Runtimes, environment, make_config
from tests.fakes.memory import MemoryStores, backend_class

pytest_plugins = ["tests.servers.plugin"]

PG_ADMIN_URL = os.environ.get("ROTATOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The random order's seed, also under ``-q`` (which hides pytest-randomly's header line):
    a failure that depends on the order is reproduced with that seed."""
    seed = config.getoption("randomly_seed", default=None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(
            f"tests ran in random order: repeat it with -p randomly --randomly-seed={seed}"
        )


@pytest.fixture(autouse=True)
def memory_stores() -> Iterator[MemoryStores]:
    """``type = "memory"`` in this test: the fake (no installed backend), on its own stores."""
    stores = MemoryStores()
    backends.register(backend_class(stores))
    yield stores
    backends.unregister("memory")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'journal.db'}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session. No server = a failure, not a skip:
    CI starts PostgreSQL (.ci/run) and a missing one must be seen."""
    import psycopg

    name = f"rotator_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}; start it as .ci/run does"
        )
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """The session's database, emptied (the first journal opened on it migrates it)."""
    import psycopg

    plain = pg_database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    yield pg_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def runtimes() -> AsyncIterator[Runtimes]:
    """Open runtimes with ``runtimes.open(config)``; each is closed at the end of the test."""
    opened = Runtimes()
    yield opened
    await opened.aclose()


@pytest.fixture
def make_runtime(tmp_path: Path, sim: Any, runtimes: Runtimes) -> RuntimeFactory:
    """Runtimes of one environment (``prod`` unless named) against the simulator, with a memory
    backend (``mem``) and a file backend (``file``) unless ``backends`` are given."""

    def make(
        credentials: list[dict[str, Any]] | None = None,
        *,
        env: str = "prod",
        journal_url: str | None = None,
        makini: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        backends: list[dict[str, Any]] | None = None,
        lock_ttl: str | None = None,
        top: dict[str, Any] | None = None,
        clock: Clock = SYSTEM,
    ) -> Runtime:
        envs = {
            env: environment(
                sim.url,
                f"test-{env}",
                credentials or [{"name": "a", "connection_id": "conn-a"}],
                sealing_env=f"SEAL_{env}",
                makini=makini,
                schedule=schedule,
                backends=backends
                or [
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
        url = journal_url or f"sqlite:///{tmp_path / 'journal.db'}"
        journal = {"url": url, **({"lock_ttl": lock_ttl} if lock_ttl else {})}
        config = make_config(tmp_path, url, envs, journal=journal, **(top or {}))
        return runtimes.open(config, clock=clock)

    return make


# --- the Makini simulator -------------------------------------------------------------------

SIM_CLIENTS = {
    "test-prod": "test-prod-secret",
    "test-dev": "test-dev-secret",
    "sched": "sched-secret",
}


@pytest.fixture(scope="session")
def sim_server() -> Iterator[Any]:
    from rotator.makini.sim import SimOptions, SimServer

    with SimServer(SimOptions(clients=SIM_CLIENTS)) as server:
        yield server


@pytest.fixture
def sim(sim_server: Any) -> Any:
    """The session's simulator, reset to defaults for this test."""
    from rotator.makini.sim import SimOptions

    sim_server.reset(SimOptions(clients=SIM_CLIENTS))
    return sim_server
