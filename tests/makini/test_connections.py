"""Listing the admin client's connections (``rotator doctor``): against the simulator, and
across pages, never sending the admin token to another host."""

from __future__ import annotations

import json

import httpx
import pytest

from rotator.errors import InvalidToken, MakiniProtocolError
from rotator.makini import MakiniClient
from rotator.makini.sim import SimServer
from tests.makini.conftest import settings


async def test_the_connections_the_simulator_has_for_this_client(sim: SimServer) -> None:
    sim.add_connection("conn-list-a", "test-prod")
    sim.add_connection("conn-list-other", "test-dev")  # another client's: not listed
    async with MakiniClient(settings(sim.url, "test-prod"), "test-prod-secret",
                            environment="prod") as client:
        await client.check_admin()
        assert await client.connection_ids() == {"conn-list-a"}
    async with MakiniClient(settings(sim.url, "test-prod"), "wrong", environment="prod") as bad:
        with pytest.raises(InvalidToken):
            await bad.check_admin()


async def test_pages_are_followed_on_makinis_host_only() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "adm", "expires_in": 3600})
        pages = {
            "1": {"data": [{"key": "a"}], "links": {"next": "https://m.test/api/system/"
                                                            "connections?page=2"}},
            "2": {"data": [{"id": "b"}, "junk"], "links": {"next": "https://evil.test/x"}},
        }
        return httpx.Response(200, json=pages[request.url.params.get("page", "1")])

    client = MakiniClient(settings("https://m.test"), "s", environment="prod",
                          transport=httpx.MockTransport(handler))
    async with client:
        assert await client.connection_ids() == {"a", "b"}
    assert not any("evil.test" in url for url in seen)


async def test_an_answer_without_a_list_is_a_protocol_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "adm", "expires_in": 3600})
        return httpx.Response(200, content=json.dumps({"data": {"key": "a"}}).encode())

    client = MakiniClient(settings("https://m.test"), "s", environment="prod",
                          transport=httpx.MockTransport(handler))
    async with client:
        with pytest.raises(MakiniProtocolError, match="no list under 'data'"):
            await client.connection_ids()
