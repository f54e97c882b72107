"""The simulator's connection listing at 10,000 connections: pages like Makini's, created in
one request, listed without a scan per page; discovery enrols all of them; an incomplete
listing off-boards nothing."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from rotator.crypto import KeySource
from rotator.makini import ListedConnection
from rotator.makini.sim import SimServer
from rotator.rotation import discovery
from rotator.settings import EnvironmentSettings, MakiniSettings
from tests.discovery.test_discovery import _open
from tests.factories import Runtimes


def _admin_token(sim: SimServer) -> str:
    answer = httpx.post(f"{sim.url}/link/token", json={
        "grant_type": "client_credentials", "client_id": "test-prod",
        "client_secret": "test-prod-secret"})
    token: str = answer.json()["access_token"]
    return token


def test_pages_links_and_meta_like_makini(sim: SimServer) -> None:
    sim.add_connections(25, prefix="m-", client_id="test-prod", platform="sap",
                        metadata={"tier": "gold"})
    sim.add_connection("other", "test-dev")
    auth = {"Authorization": f"Bearer {_admin_token(sim)}"}
    first = httpx.get(f"{sim.url}/api/system/connections?per_page=10", headers=auth).json()
    assert [c["key"] for c in first["data"]] == [f"m-{n:05d}" for n in range(10)]
    assert first["data"][0]["integration_name"] == "sap"
    assert first["data"][0]["user_metadata"] == '{"tier":"gold"}'
    assert first["meta"] == {"current_page": 1, "from": 1, "last_page": 3,
                             "path": f"{sim.url}/api/system/connections", "per_page": 10,
                             "to": 10, "total": 25}
    assert first["links"]["prev"] is None
    last = httpx.get(first["links"]["last"], headers=auth).json()
    assert last["links"]["next"] is None and last["meta"]["to"] == 25
    assert len(last["data"]) == 5
    sim.remove_connection("m-00003")
    again = httpx.get(f"{sim.url}/api/system/connections?per_page=10", headers=auth).json()
    assert "m-00003" not in [c["key"] for c in again["data"]]
    assert again["meta"]["total"] == 24
    assert not sim.tokens("m-00003", status="active")


async def test_ten_thousand_connections(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    started = time.perf_counter()
    sim.add_connections(10_000, prefix="k-", client_id="test-prod")
    created = time.perf_counter() - started
    runtime = _open(runtimes, sim, tmp_path)
    started = time.perf_counter()
    change = await discovery.discover(runtime, "prod", first_tokens=False)
    took = time.perf_counter() - started
    assert len(change.new) == 10_000 and change.complete
    assert sim.stats()["received"]["GET /api/system/connections"] == 100  # 100 a page
    assert len(runtime.environments["prod"].settings.credentials) == 10_000
    # generous bounds on a loaded two-core machine; bench/ measures
    assert created < 5 and took < 30, (created, took)


def test_an_incomplete_listing_offboards_nothing() -> None:
    env = EnvironmentSettings.model_construct(
        makini=MakiniSettings(client_id="c", client_secret_env="S"),
        sealing_key=KeySource(env="K"), backends=[], credentials=[],
    )
    now = datetime.now(UTC)
    known = [discovery.Known("was-here", "simulated-was-here", discovery.ENROLLED)]
    listed = [ListedConnection("new-one")]
    partial = discovery.compute("prod", env, listed, known, complete=False, now=now)
    assert not partial.gone and [c.connection_id for c in partial.new] == ["new-one"]
    whole = discovery.compute("prod", env, listed, known, complete=True, now=now)
    assert [c.credential for c in whole.gone] == ["simulated-was-here"]
