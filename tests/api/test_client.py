"""The consumer client: TTL cache and revalidation, stale tokens through an outage, refusals,
and MakiniAuth re-fetching after a 401 from the Makini simulator (sync and async)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from rotator.client import (
    AsyncTokenClient,
    MakiniAuth,
    TokenClient,
    TokenDenied,
    TokenUnavailable,
)
from rotator.makini.sim import SimServer
from tests.api.conftest import Factory, LogTrap, bearer, connection, make_keys, stop_server
from tests.isolation import REPO, import_alone

SERVER_DEPENDENCIES = (
    "pydantic", "pydantic_settings", "sqlalchemy", "alembic", "fastapi", "starlette", "uvicorn",
    "boto3", "botocore", "hvac", "azure", "structlog", "typer", "rich", "prometheus_client",
    "cryptography", "apscheduler", "stamina", "backends",
)


def test_the_client_imports_without_the_server_dependencies() -> None:
    loaded = import_alone("rotator.client", refuse=SERVER_DEPENDENCIES)
    ours = {m for m in loaded if m.split(".")[0] == "rotator"}
    assert ours == {"rotator", "rotator.client"}
    assert "httpx" in loaded


def test_the_client_distribution_ships_this_very_module() -> None:
    shipped = REPO / "clients" / "python" / "rotator" / "client.py"
    assert shipped.resolve() == REPO / "rotator" / "client.py"


class Counter:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    async def hook(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)


async def test_async_client_caches_and_revalidates(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    key = make_keys(api, log_trap).reader["prod"]
    first = await api.rotate("prod", "alpha")
    seen = Counter()
    http = httpx.AsyncClient(event_hooks={"response": [seen.hook]})
    async with AsyncTokenClient(api.url, key, ttl_s=0.3, http=http) as tokens:
        token = await tokens.get("prod", "alpha")
        assert token.version == first and "value" not in repr(token)
        assert (await tokens.get("prod", "alpha")) is token
        assert seen.statuses == [200]
        await asyncio.sleep(0.31)
        assert (await tokens.get("prod", "alpha")).version == first
        assert seen.statuses == [200, 304]  # revalidated with If-None-Match
        second = await api.rotate("prod", "alpha")
        assert (await tokens.refresh("prod", "alpha")).version == second
        assert seen.statuses == [200, 304, 200]
    await http.aclose()


async def test_the_cached_token_outlives_an_outage(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    key = make_keys(api, log_trap).reader["prod"]
    version = await api.rotate("prod", "alpha")
    async with AsyncTokenClient(api.url, key, ttl_s=0.05, retry_s=0.05, timeout_s=1) as tokens:
        assert (await tokens.get("prod", "alpha")).version == version
        await stop_server(api)
        await asyncio.sleep(0.06)
        assert (await tokens.get("prod", "alpha")).version == version  # stale, still valid
        with pytest.raises(TokenUnavailable):
            await tokens.get("prod", "beta")  # nothing cached


async def test_refusals_raise(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    await api.rotate("prod", "alpha")
    async with AsyncTokenClient(api.url, "mrk_000000000000_" + "y" * 43) as tokens:
        with pytest.raises(TokenDenied) as denied:
            await tokens.get("prod", "alpha")
        assert denied.value.status == 401 and denied.value.code == "unauthorized"
    async with AsyncTokenClient(api.url, keys.reader["dev"]) as tokens:
        with pytest.raises(TokenDenied) as denied:
            await tokens.get("prod", "alpha")
        assert denied.value.status == 403


def test_server_errors_serve_the_cached_token() -> None:
    answers = iter([200, 503, 500])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status == 200:
            return httpx.Response(
                200, json={"token": "t", "version": "v1", "expires_at": None, "rotated_at": None}
            )
        return httpx.Response(status, json={"error": {"code": "x"}})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    tokens = TokenClient("http://rotator", "k", ttl_s=0.01, retry_s=0.01, http=http)
    assert tokens.get("e", "n").token == "t"
    assert tokens.refresh("e", "n").token == "t"  # 503: the cached one
    assert tokens.refresh("e", "n").token == "t"  # 500: the cached one


def test_the_token_is_named_as_the_api_names_it_and_value_is_a_deprecated_alias() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"token": "t-1", "version": "v1", "expires_at": None, "rotated_at": None}
        return httpx.Response(200, json=body)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    token = TokenClient("http://rotator", "k", http=http).get("e", "n")
    assert token.token == "t-1" and "t-1" not in repr(token)
    with pytest.warns(DeprecationWarning, match="Token.token"):
        assert token.value == "t-1"


def test_errors_name_the_url_tried_and_what_went_wrong() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(TokenUnavailable) as gone:
        TokenClient(url, "k", timeout_s=2).get("prod", "acme-sap")
    assert str(gone.value) == f"no token for prod/acme-sap from {url}: connection refused"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found"}})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(TokenDenied) as denied:
        TokenClient("http://rotator:8080/", "k", http=http).get("prod", "acme-sap")
    assert str(denied.value) == (
        "the rotator at http://rotator:8080 refused prod/acme-sap: 404 not_found"
    )


async def test_makini_auth_refetches_after_a_401_async(
    serve: Factory, log_trap: LogTrap, sim: SimServer
) -> None:
    api = await serve()
    key = make_keys(api, log_trap).reader["prod"]
    await api.rotate("prod", "alpha")
    seen = Counter()
    rotator_http = httpx.AsyncClient(event_hooks={"response": [seen.hook]})
    tokens = AsyncTokenClient(api.url, key, ttl_s=3600, http=rotator_http)
    async with httpx.AsyncClient(
        base_url=sim.url, auth=MakiniAuth(tokens, "prod", "alpha")
    ) as makini:
        r = await makini.get("/api/integrations/current")
        assert r.status_code == 200
        await api.rotate("prod", "alpha")  # the simulator kills the old token at once
        r = await makini.get("/api/integrations/current")
        assert r.status_code == 200 and r.json()["data"]["id"] == connection("prod", "alpha")
    assert seen.statuses == [200, 200]  # one fetch, one re-fetch after Makini's 401
    await rotator_http.aclose()


async def test_makini_auth_refetches_after_a_401_sync(
    serve: Factory, log_trap: LogTrap, sim: SimServer
) -> None:
    api = await serve(threaded=True)
    keys = make_keys(api, log_trap)

    def scenario() -> list[int]:
        admin = httpx.Client(base_url=api.url, headers=bearer(keys.admin["prod"]))
        assert admin.post("/v1/admin/rotate/prod/alpha").json()["outcome"] == "rotated"
        tokens = TokenClient(api.url, keys.reader["prod"], ttl_s=3600)
        statuses = []
        with httpx.Client(base_url=sim.url, auth=MakiniAuth(tokens, "prod", "alpha")) as makini:
            statuses.append(makini.get("/api/integrations/current").status_code)
            assert admin.post("/v1/admin/rotate/prod/alpha").json()["outcome"] == "rotated"
            statuses.append(makini.get("/api/integrations/current").status_code)
            # another client on the same TokenClient: the cached new token, no 401
            shared = MakiniAuth(tokens, "prod", "alpha")
            with httpx.Client(base_url=sim.url, auth=shared) as again:
                statuses.append(again.get("/api/integrations/current").status_code)
        tokens.close()
        admin.close()
        return statuses

    assert await asyncio.to_thread(scenario) == [200, 200, 200]
    with pytest.raises(TypeError):
        async with httpx.AsyncClient(
            auth=MakiniAuth(TokenClient(api.url, "k"), "prod", "alpha")
        ) as wrong_kind:
            await wrong_kind.get(sim.url)
