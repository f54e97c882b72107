"""Fixtures for the core tests: runtimes built against the simulator over a real socket."""

from __future__ import annotations

from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.rotation.runtime import Runtime
from tests.factories import RuntimeFactory

Factory = RuntimeFactory


def current(runtime: Runtime, name: str = "a", env: str = "prod") -> list[StoredVersion | None]:
    return [b.read(name, Stage.CURRENT) for b in runtime.environments[env].backends]


def active(sim: SimServer, connection: str = "conn-a") -> set[str]:
    return {t["fingerprint"] for t in sim.tokens(connection, kind="access", status="active")}
