"""Runtimes against the simulator (over a real socket) with a memory and a file backend."""

from __future__ import annotations

from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.revoke import CredentialReport, Revoker, RevokeRequest
from rotator.rotation.runtime import Runtime
from tests.factories import RuntimeFactory

Factory = RuntimeFactory
REVOKE_PATH = "/api/system/tokens/revoke"


def current(runtime: Runtime, name: str = "a") -> list[StoredVersion | None]:
    return [b.read(name, Stage.CURRENT) for b in runtime.environments["prod"].backends]


def readable_anywhere(runtime: Runtime, name: str, version_id: str) -> bool:
    return any(
        b.read_version(name, version_id) is not None for b in runtime.environments["prod"].backends
    )


def status_of(sim: SimServer, version: StoredVersion) -> str:
    view = sim.token(version.tokens.access.fingerprint)
    assert view is not None
    return str(view["status"])


async def revoke(
    runtime: Runtime,
    *names: str,
    all_: bool = False,
    version: str | None = None,
    replace: bool = True,
    strategy: str | None = None,
    resume: bool = False,
    reason: str = "leaked in a build log",
) -> list[CredentialReport]:
    req = RevokeRequest(
        environment="prod",
        names=names,
        all=all_,
        version=version,
        replace=replace,
        reason=reason,
        actor="tester@host",
        strategy=strategy,  # type: ignore[arg-type]
        resume=resume,
    )
    revoker = Revoker(runtime.engine)
    plans = await revoker.plan(req)
    return await revoker.run(req, plans)
