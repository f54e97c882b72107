"""Fixtures shared by every suite: journals (SQLite and a real PostgreSQL), configurations
built against the bundled Makini simulator, and a guard that no test leaks a token."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import backends
from rotator.crypto import generate_key
from rotator.settings import Config, parse_config
from tests.fakes.memory import MemoryStores, backend_class

pytest_plugins = ["tests.servers.plugin"]

PG_ADMIN_URL = os.environ.get("ROTATOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


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


def environment(
    sim_url: str,
    client_id: str,
    credentials: list[dict[str, Any]],
    *,
    backends: list[dict[str, Any]] | None = None,
    sealing_env: str,
    makini: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One environment's table, as it would be in TOML."""
    os.environ.setdefault(sealing_env, generate_key())
    secret_env = f"TEST_MAKINI_SECRET_{client_id.upper().replace('-', '_')}"
    os.environ[secret_env] = f"{client_id}-secret"
    return {
        "sealing_key": {"env": sealing_env},
        "makini": {
            "base_url": sim_url,
            "client_id": client_id,
            "client_secret_env": secret_env,
            "retry": {
                "max_attempts": 3,
                "base_delay_s": 0.01,
                "max_delay_s": 0.05,
                "total_timeout_s": 5,
            },
            **(makini or {}),
        },
        "backends": backends or [{"type": "memory", "namespace": uuid.uuid4().hex}],
        "schedule": schedule or {"interval": "1h", "grace_period": "0s"},
        "credentials": credentials,
    }


def make_config(
    tmp_path: Path, journal_url: str, environments: dict[str, Any], **top: Any
) -> Config:
    data = {"journal": {"url": journal_url}, "environments": environments, **top}
    return parse_config(data, source=tmp_path / "rotator.toml")


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
