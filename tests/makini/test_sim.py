"""The simulator itself, over raw HTTP: what it plays, its options and its inspection surface."""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rotator.makini.sim import SimOptions, SimServer, create_app, link_code
from rotator.model import fingerprint
from tests.wait import wait_until

CLIENTS = {"test-prod": "test-prod-secret", "test-dev": "test-dev-secret"}


class Api:
    """A thin raw-HTTP caller of the simulator, as one admin client."""

    def __init__(self, sim: SimServer, client_id: str = "test-prod") -> None:
        self.http = httpx.Client(base_url=sim.url)
        self.client_id = client_id
        self._admin: str | None = None

    def close(self) -> None:
        self.http.close()

    def grant(self, **fields: str) -> httpx.Response:
        data = {"client_id": self.client_id, "client_secret": CLIENTS[self.client_id], **fields}
        if fields.get("grant_type") == "client_credentials":
            return self.http.post("/link/token", json=data)
        return self.http.post("/link/token", data=data)

    @property
    def admin(self) -> str:
        if self._admin is None:
            self._admin = self.grant(grant_type="client_credentials").json()["access_token"]
        return self._admin

    def issue(self, conn: str) -> httpx.Response:
        return self.http.post(f"/api/system/connections/{conn}/token",
                              headers={"Authorization": f"Bearer {self.admin}"})

    def pair(self, conn: str) -> dict[str, Any]:
        response = self.issue(conn)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    def current(self, token: str) -> httpx.Response:
        return self.http.get("/api/integrations/current",
                             headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def api(sim: SimServer) -> Any:
    caller = Api(sim)
    yield caller
    caller.close()


def status_of(sim: SimServer, token: str) -> str:
    view = sim.token(fingerprint(token))
    assert view is not None
    return str(view["status"])


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_tokens_look_like_jwts(api: Api, sim: SimServer) -> None:
    pair = api.pair("c1")
    header, payload, signature = pair["access_token"].split(".")
    assert pair["access_token"].startswith("eyJ") and signature
    assert _b64json(header) == {"alg": "HS256", "typ": "JWT"}
    claims = _b64json(payload)
    assert claims["sub"] == "c1" and claims["exp"] == pair["expires_in"]
    view = sim.token(fingerprint(pair["access_token"]))
    assert view is not None and view["kind"] == "access" and view["connection_id"] == "c1"


def test_issue_answer_shape(api: Api) -> None:
    response = api.issue("c1")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]
    assert set(response.json()["data"]) == {"access_token", "refresh_token", "expires_in"}
    assert response.json()["data"]["expires_in"] > 10**9  # a Unix timestamp by default


def test_lifetimes_and_seconds_format(api: Api, sim: SimServer) -> None:
    sim.set(token_lifetime_s=120, expires_in_format="seconds")
    pair = api.pair("c1")
    assert pair["expires_in"] == 120
    sim.set(advance_s=121)
    assert status_of(sim, pair["access_token"]) == "expired"
    assert status_of(sim, pair["refresh_token"]) == "active"  # 31 days
    assert api.current(pair["access_token"]).status_code == 401


def test_current_describes_the_connection(api: Api) -> None:
    pair = api.pair("c1")
    data = api.current(pair["access_token"]).json()["data"]
    assert set(data) == {"id", "company_name", "email", "provider", "updated_at", "sync_status",
                         "sync_updated_at"}
    assert data["id"] == "c1"


def test_issue_revokes_the_previous_pair(api: Api, sim: SimServer) -> None:
    first = api.pair("c1")
    api.pair("c1")
    assert status_of(sim, first["access_token"]) == "revoked"
    assert status_of(sim, first["refresh_token"]) == "revoked"
    sim.set(issue_invalidates_previous=False)
    third = api.pair("c1")
    api.pair("c1")
    assert status_of(sim, third["access_token"]) == "active"


@pytest.mark.parametrize("invalidates", [True, False])
def test_refresh_semantics(api: Api, sim: SimServer, invalidates: bool) -> None:
    sim.set(issue_invalidates_previous=invalidates)
    old = api.pair("c1")
    new = api.grant(grant_type="refresh_token", refresh_token=old["refresh_token"]).json()
    assert {"access_token", "refresh_token", "token_type", "expires_in"} <= set(new)
    assert status_of(sim, old["refresh_token"]) == "revoked"  # single use by default
    assert status_of(sim, old["access_token"]) == ("revoked" if invalidates else "active")
    reused = api.grant(grant_type="refresh_token", refresh_token=old["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"]["code"] == "INVALID_GRANT"


def test_admin_refresh_invalidates_previous_admin_tokens(api: Api, sim: SimServer) -> None:
    first = api.grant(grant_type="client_credentials").json()
    second = api.grant(grant_type="client_credentials").json()
    renewed = api.grant(grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert renewed.status_code == 200
    assert status_of(sim, first["access_token"]) == "revoked"
    assert status_of(sim, second["access_token"]) == "revoked"
    assert status_of(sim, renewed.json()["access_token"]) == "active"


def test_bad_client_and_grant(api: Api) -> None:
    wrong = api.http.post("/link/token", json={"grant_type": "client_credentials",
                                               "client_id": "test-prod", "client_secret": "no"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "INVALID_CLIENT"
    odd = api.grant(grant_type="password")
    assert odd.status_code == 400 and odd.json()["error"]["code"] == "UNSUPPORTED_GRANT_TYPE"


def test_link_code_exchange(api: Api, sim: SimServer) -> None:
    code = link_code(sim.url, "c-link", client_id="test-prod")
    posted = api.http.post("/_sim/connections/c-link/link-code").json()["code"]
    assert code != posted
    pair = api.grant(grant_type="authorization_code", code=code, redirect_uri="http://x/cb")
    assert pair.status_code == 200 and pair.json()["refresh_token"]
    assert api.current(pair.json()["access_token"]).json()["data"]["id"] == "c-link"
    again = api.grant(grant_type="authorization_code", code=code, redirect_uri="http://x/cb")
    assert again.status_code == 400


def test_link_code_expires(api: Api, sim: SimServer) -> None:
    code = sim.link_code("c-link", client_id="test-prod")
    sim.set(advance_s=601)
    response = api.grant(grant_type="authorization_code", code=code, redirect_uri="http://x")
    assert response.status_code == 400


def test_connections_belong_to_their_client(api: Api, sim: SimServer) -> None:
    api.pair("c1")
    dev = Api(sim, "test-dev")
    try:
        assert dev.issue("c1").status_code == 404
        assert dev.http.delete("/api/system/connections/c1",
                               headers={"Authorization": f"Bearer {dev.admin}"}).status_code == 404
        assert dev.pair("c2")
        listed = api.http.get("/api/system/connections",
                              headers={"Authorization": f"Bearer {api.admin}"}).json()["data"]
        assert [c["key"] for c in listed] == ["c1"]
    finally:
        dev.close()
    with pytest.raises(ValueError, match="404"):
        sim.link_code("c1", client_id="test-dev")


def test_without_auto_provision(api: Api, sim: SimServer) -> None:
    sim.set(auto_provision=False)
    assert api.issue("c-new").status_code == 404
    sim.add_connection("c-new", "test-prod")
    assert api.issue("c-new").status_code == 200
    with pytest.raises(ValueError, match="409"):
        sim.add_connection("c-new", "test-prod")


def test_disconnect(api: Api, sim: SimServer) -> None:
    pair = api.pair("c1")
    deleted = api.http.delete("/api/system/connections/c1",
                              headers={"Authorization": f"Bearer {api.admin}"})
    assert deleted.status_code == 200
    assert status_of(sim, pair["access_token"]) == "revoked"
    assert status_of(sim, pair["refresh_token"]) == "revoked"
    [conn] = sim.connections()
    assert conn["status"] == "disconnected" and conn["tokens"] == {"revoked": 2}
    assert api.issue("c1").status_code == 404


def test_revoke_endpoint(api: Api, sim: SimServer) -> None:
    pair = api.pair("c1")
    auth = {"Authorization": f"Bearer {api.admin}"}
    off = api.http.post("/api/system/tokens/revoke", json={"token": pair["access_token"]},
                        headers=auth)
    assert off.status_code == 404
    sim.set(revoke_endpoint=True)
    dev = Api(sim, "test-dev")
    try:  # another client's token is left alone, without telling
        foreign = dev.http.post("/api/system/tokens/revoke", json={"token": pair["access_token"]},
                                headers={"Authorization": f"Bearer {dev.admin}"})
    finally:
        dev.close()
    assert foreign.status_code == 200 and status_of(sim, pair["access_token"]) == "active"
    done = api.http.post("/api/system/tokens/revoke", json={"token": pair["access_token"]},
                         headers=auth)
    assert done.status_code == 200 and status_of(sim, pair["access_token"]) == "revoked"


def test_rate_limit_is_per_connection(api: Api, sim: SimServer) -> None:
    sim.set(rate_limit_per_minute=2)
    assert api.issue("c1").status_code == 200
    assert api.issue("c1").status_code == 200
    limited = api.issue("c1")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert api.issue("c2").status_code == 200
    sim.set(advance_s=60)
    assert api.issue("c1").status_code == 200


@pytest.mark.parametrize("shape", ["nested", "flat", "list", "plain"])
def test_error_shapes(api: Api, sim: SimServer, shape: str) -> None:
    sim.set(error_shape=shape, request_id_header="X-Makini-Request")
    response = api.current("eyJnope")
    request_id = response.headers["x-makini-request"]
    assert response.status_code == 401 and "x-request-id" not in response.headers
    if shape == "plain":
        assert response.text == "AUTHENTICATION_FAILED: Unauthenticated."
        return
    body = response.json()
    assert request_id in response.text
    assert "AUTHENTICATION_FAILED" in response.text
    assert {"nested": "error", "flat": "error_code", "list": "errors"}[shape] in body


def test_unknown_route_answers_in_the_error_shape(api: Api, sim: SimServer) -> None:
    response = api.http.get("/api/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"
    assert sim.stats()["routes"]["unmatched"] == {"404": 1}


def test_outage_and_options(api: Api, sim: SimServer) -> None:
    options = sim.set(outage_s=5)
    assert options.outage_until is not None and options.outage_until > time.time()
    down = api.grant(grant_type="client_credentials")
    assert down.status_code == 503 and 4 <= int(down.headers["retry-after"]) <= 5
    assert sim.tokens() == []  # /_sim/ still answers
    sim.set(outage_s=0)
    assert api.grant(grant_type="client_credentials").status_code == 200
    sim.set(outage_s=5)
    sim.set(advance_s=6)  # the simulator's clock moves past the outage
    assert api.grant(grant_type="client_credentials").status_code == 200


def test_invalid_options_are_refused(sim: SimServer) -> None:
    for bad in ({"error_rate": 2}, {"no_such_option": 1}, {"error_shape": "xml"}):
        response = httpx.patch(f"{sim.url}/_sim/options", json=bad)
        assert response.status_code == 422, bad
    assert sim.options.error_rate == 0


def test_fail_next_and_when_it_strikes(api: Api, sim: SimServer) -> None:
    api.admin  # noqa: B018 (authenticate before the failures are queued)
    sim.set(fail_next=[500, 502, 429])
    before = api.issue("c1")
    assert before.status_code == 500 and sim.tokens("c1") == []
    after = api.issue("c1")  # 502: processed, then the answer was lost
    assert after.status_code == 502 and len(sim.tokens("c1", kind="access")) == 1
    limited = api.issue("c1")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert api.issue("c1").status_code == 200
    assert sim.options.fail_next == []


def test_fail_only_aims_the_scripted_failures_at_one_route(api: Api, sim: SimServer) -> None:
    # a CLI process authenticates before it issues: the failure must skip that request
    sim.set(fail_only="POST /api/system/connections/{id}/token", fail_next=[502])
    assert api.grant(grant_type="client_credentials").status_code == 200
    assert api.current("eyJx").status_code == 401  # not a 502 either
    lost = api.issue("c1")  # processed, then the answer was lost
    assert lost.status_code == 502 and len(sim.tokens("c1", kind="access")) == 1
    assert api.issue("c1").status_code == 200
    assert sim.options.fail_next == []


def test_error_rate_is_reproducible_with_a_seed(api: Api, sim: SimServer) -> None:
    def run() -> list[int]:
        sim.set(error_rate=0.5, seed=None)
        sim.set(seed=42)
        return [api.current("eyJx").status_code for _ in range(30)]

    first, second = run(), run()
    assert first == second
    assert {500, 502, 503} & set(first) and 401 in first


def test_garbage(api: Api, sim: SimServer) -> None:
    sim.set(garbage=True)
    response = api.grant(grant_type="client_credentials")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()
    assert len(sim.tokens(kind="admin")) == 1  # processed all the same


def test_latency_only_on_the_api(api: Api, sim: SimServer) -> None:
    # a latency far above what a loaded machine adds to a local call: the inspection call is
    # never delayed by it, the API call always is (60 ms once failed under a busy test run)
    sim.set(latency_ms=1000)
    started = time.monotonic()
    sim.tokens()
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    api.current("eyJx")
    assert time.monotonic() - started >= 1.0


def test_inspection_never_shows_a_token_value(api: Api, sim: SimServer) -> None:
    sim.set(issue_invalidates_previous=False, revoke_endpoint=True)
    pair = api.pair("c1")
    api.pair("c1")
    api.grant(grant_type="refresh_token", refresh_token=pair["refresh_token"])
    code = sim.link_code("c2", client_id="test-prod")
    api.grant(grant_type="authorization_code", code=code, redirect_uri="http://x")
    api.http.delete("/api/system/connections/c2", headers={"Authorization": f"Bearer {api.admin}"})
    sim.set(advance_s=40 * 86400)
    values = list(sim.state.tokens)
    assert len(values) >= 10
    texts = [api.http.get(path).text for path in (
        "/_sim/connections", "/_sim/tokens", "/_sim/tokens?connection_id=c1", "/_sim/options",
        "/_sim/stats", *(f"/_sim/tokens/{fingerprint(v)}" for v in values),
    )]
    blob = "\n".join(texts)
    for value in values:
        assert value not in blob
    assert code not in blob
    assert "test-prod-secret" not in blob  # client secrets are hidden too
    assert {t["fingerprint"] for t in sim.tokens()} == {fingerprint(v) for v in values}
    assert {t["status"] for t in sim.tokens()} == {"expired", "revoked"}


def test_reset(api: Api, sim: SimServer) -> None:
    api.pair("c1")
    sim.set(latency_ms=1)
    sim.reset()
    assert sim.tokens() == [] and sim.connections() == [] and sim.stats()["total"] == 0
    assert sim.options.latency_ms == 1  # kept without new options
    sim.reset(SimOptions(clients=CLIENTS))
    assert sim.options.latency_ms == 0


def test_stats(api: Api, sim: SimServer) -> None:
    api.pair("c1")
    api.current("eyJx")
    routes = sim.stats()["routes"]
    assert routes["POST /link/token"] == {"200": 1}
    assert routes["POST /api/system/connections/{id}/token"] == {"200": 1}
    assert routes["GET /api/integrations/current"] == {"401": 1}


def test_stats_count_a_request_on_arrival(api: Api, sim: SimServer) -> None:
    api.admin  # noqa: B018 (authenticate first)
    sim.set(latency_ms=500)
    route = "POST /api/system/connections/{id}/token"
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(api.issue, "c1")
        wait_until(  # in flight: received, not answered
            "the request to arrive", lambda: sim.stats()["received"].get(route) == 1, 5
        )
        assert route not in sim.stats()["routes"] and not answer.done()
        assert answer.result(timeout=5).status_code == 200
    assert sim.stats()["routes"][route] == {"200": 1}


def test_server_lifecycle() -> None:
    with SimServer(SimOptions(latency_ms=0)) as server:
        port = int(server.url.rsplit(":", 1)[1])
        assert port > 0
        assert httpx.get(f"{server.url}/_sim/stats").status_code == 200
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(1)
        sock.connect(("127.0.0.1", port))


async def test_create_app_in_process() -> None:
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        response = await http.post("/link/token", json={
            "grant_type": "client_credentials", "client_id": "local-prod",
            "client_secret": "local-prod-secret"})
    assert response.status_code == 200 and response.json()["token_type"] == "bearer"
