"""Runtimes against the simulator (over a real socket) with a memory and a file backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.revoke import CredentialReport, Revoker, RevokeRequest, resume_held
from rotator.rotation.runtime import Runtime
from tests.factories import environment, make_config

Factory = Callable[..., Runtime]
REVOKE_PATH = "/api/system/tokens/revoke"


@pytest.fixture
async def make_runtime(tmp_path: Path, sim: SimServer) -> AsyncIterator[Factory]:
    opened: list[Runtime] = []

    def make(
        credentials: list[dict[str, Any]] | None = None,
        *,
        makini: dict[str, Any] | None = None,
        backends: list[dict[str, Any]] | None = None,
        top: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        journal_url: str | None = None,
    ) -> Runtime:
        creds = credentials or [{"name": "a", "connection_id": "conn-a"}]
        envs = {
            "prod": environment(
                sim.url,
                "test-prod",
                creds,
                sealing_env="SEAL_prod",
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
        config = make_config(tmp_path, url, envs, **(top or {}))
        runtime = Runtime.open(config, resume_revoke=resume_held)
        opened.append(runtime)
        return runtime

    yield make
    for runtime in opened:
        await runtime.aclose()


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
