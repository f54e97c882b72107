"""Fixtures for the core tests: runtimes built against the simulator over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rotator.clock import SYSTEM, Clock
from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.revoke import resume_held
from rotator.rotation.runtime import Runtime
from tests.factories import environment, make_config

Factory = Callable[..., Runtime]


@pytest.fixture
async def make_runtime(tmp_path: Path, sim: SimServer) -> AsyncIterator[Factory]:
    opened: list[Runtime] = []

    def make(
        credentials: list[dict[str, Any]] | None = None,
        *,
        journal_url: str | None = None,
        makini: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        backends: list[dict[str, Any]] | None = None,
        env: str = "prod",
        lock_ttl: str | None = None,
        clock: Clock = SYSTEM,
    ) -> Runtime:
        creds = credentials or [{"name": "a", "connection_id": "conn-a"}]
        envs = {
            env: environment(
                sim.url,
                f"test-{env}",
                creds,
                sealing_env=f"SEAL_{env}",
                makini=makini,
                schedule=schedule,
                backends=backends
                or [
                    {"type": "memory", "name": "one", "namespace": str(tmp_path)},
                    {
                        "type": "file",
                        "name": "two",
                        "path": "files",
                        "key": {"file": "file.key", "generate": True},
                    },
                ],
            )
        }
        url = journal_url or f"sqlite:///{tmp_path / 'journal.db'}"
        journal = {"url": url, **({"lock_ttl": lock_ttl} if lock_ttl else {})}
        runtime = Runtime.open(
            make_config(tmp_path, url, envs, journal=journal),
            resume_revoke=resume_held,
            clock=clock,
        )
        opened.append(runtime)
        return runtime

    yield make
    for runtime in opened:
        await runtime.aclose()


def current(runtime: Runtime, name: str = "a", env: str = "prod") -> list[StoredVersion | None]:
    return [b.read(name, Stage.CURRENT) for b in runtime.environments[env].backends]


def active(sim: SimServer, connection: str = "conn-a") -> set[str]:
    return {t["fingerprint"] for t in sim.tokens(connection, kind="access", status="active")}
