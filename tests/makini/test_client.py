"""MakiniClient against the simulator over a real socket (httpx.MockTransport only for what the
simulator cannot produce: connection-level failures and malformed answers)."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import structlog

from rotator.errors import (
    BadRequest,
    Forbidden,
    InvalidToken,
    MakiniError,
    MakiniProtocolError,
    MakiniTimeout,
    MakiniTransient,
    MakiniUnreachable,
    RateLimited,
    ServerError,
    WrongConnection,
)
from rotator.makini import MakiniClient
from rotator.makini.sim import SimServer
from rotator.model import Secret
from tests.makini.conftest import DEV, ClientFactory, FakeSleep, assert_clean

REDIRECT = "http://localhost/callback"


def tokens_of(sim: SimServer, **filters: str) -> list[dict[str, Any]]:
    return sim.tokens(**filters)


def count(sim: SimServer, route: str, status: int | None = None) -> int:
    seen = sim.stats()["routes"].get(route, {})
    return sum(n for s, n in seen.items() if status is None or int(s) == status)


ISSUE = "POST /api/system/connections/{id}/token"
CURRENT = "GET /api/integrations/current"
TOKEN = "POST /link/token"


# --- admin authentication ---------------------------------------------------------------------


async def test_admin_token_is_cached(client: MakiniClient, sim: SimServer) -> None:
    for conn in ("c1", "c2", "c3"):
        await client.issue_token(conn)
    assert len(tokens_of(sim, kind="admin")) == 1
    assert count(sim, TOKEN) == 1


async def test_concurrent_calls_authenticate_once(client: MakiniClient, sim: SimServer) -> None:
    await asyncio.gather(*(client.issue_token(f"c{i}") for i in range(20)))
    assert len(tokens_of(sim, kind="admin")) == 1


async def test_admin_token_renewed_before_expiry(
    make_client: ClientFactory, sim: SimServer
) -> None:
    now = [time.time()]
    client = make_client(clock=lambda: now[0])
    await client.issue_token("c1")
    now[0] += 30 * 86400 - 90  # 90 s before expiry: still outside the 60 s margin
    await client.issue_token("c1")
    assert len(tokens_of(sim, kind="admin")) == 1
    now[0] += 45  # 45 s before expiry: inside the margin
    await client.issue_token("c1")
    assert len(tokens_of(sim, kind="admin")) == 2


async def test_short_lived_admin_token_is_reused_for_half_its_life(
    make_client: ClientFactory, sim: SimServer
) -> None:
    sim.set(admin_token_lifetime_s=40, expires_in_format="seconds")
    now = [time.time()]
    client = make_client(clock=lambda: now[0])
    await client.issue_token("c1")
    now[0] += 10
    await client.issue_token("c1")
    assert len(tokens_of(sim, kind="admin")) == 1
    now[0] += 15
    await client.issue_token("c1")
    assert len(tokens_of(sim, kind="admin")) == 2


async def test_admin_reauthenticates_once_on_401(client: MakiniClient, sim: SimServer) -> None:
    await client.issue_token("c1")
    [admin] = tokens_of(sim, kind="admin")
    sim.revoke(admin["fingerprint"])
    issued = await client.issue_token("c1")
    assert issued.tokens.access.fingerprint in {t["fingerprint"] for t in
                                                tokens_of(sim, kind="access", status="active")}
    assert len(tokens_of(sim, kind="admin", status="active")) == 1
    assert count(sim, ISSUE, 401) == 1


async def test_admin_401_after_reauthentication_raises(make_client: ClientFactory) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y", "expires_in": 3600})
        return httpx.Response(401, json={"error": {"code": "AUTHENTICATION_FAILED"}})

    client = make_client(transport=httpx.MockTransport(handler))
    with pytest.raises(InvalidToken) as caught:
        await client.disconnect("c1")
    assert calls == ["/link/token", "/api/system/connections/c1",
                     "/link/token", "/api/system/connections/c1"]
    assert_clean(caught.value, "eyJadmin.x.y")


async def test_a_cookie_makini_sets_is_never_sent_back(make_client: ClientFactory) -> None:
    """A bearer-token API keeps no cookie state: a cookie set by one answer must not ride along
    on the next request, which may carry another connection's token."""
    seen: list[tuple[str, str | None, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("cookie"), str(request.url)))
        if request.url.path == "/link/token":
            return httpx.Response(
                200, json={"access_token": "eyJadmin.x.y", "expires_in": 3600},
                headers={"Set-Cookie": "session=abc; Path=/"},
            )
        if request.url.path == "/api/integrations/current":
            return httpx.Response(200, json={"id": "c1"}, headers={"Set-Cookie": "s2=def"})
        return httpx.Response(
            200, json={"access_token": "eyJnew.x.y", "expires_in": 3600},
            headers={"Set-Cookie": "s3=ghi; Path=/"},
        )

    client = make_client(transport=httpx.MockTransport(handler))
    issued = await client.issue_token("c1")
    await client.verify(issued.tokens.access, "c1")
    await client.issue_token("c 2/x")
    assert [(path, cookie) for path, cookie, _ in seen] == [
        ("/link/token", None),
        ("/api/system/connections/c1/token", None),
        ("/api/integrations/current", None),
        ("/api/system/connections/c 2/x/token", None),
    ]
    # absolute URLs built by the client are the ones httpx would have joined to base_url
    base = str(httpx.URL(client._settings.base_url)).rstrip("/")
    assert seen[3][2] == f"{base}/api/system/connections/c%202%2Fx/token"


async def test_waiters_share_a_failed_authentication(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep
) -> None:
    sim.set(outage_s=30)
    client = make_client(retry={"max_attempts": 2, "total_timeout_s": 300})
    results = await asyncio.gather(*(client.issue_token(f"c{i}") for i in range(10)),
                                   return_exceptions=True)
    assert all(isinstance(r, ServerError) for r in results)
    assert count(sim, TOKEN) == 2  # one authentication (two attempts), not ten
    sim.set(outage_s=0)
    await client.issue_token("c1")  # and the next call tries afresh


async def test_wrong_client_secret(make_client: ClientFactory, sim: SimServer) -> None:
    client = make_client(secret="not-the-secret")
    with pytest.raises(InvalidToken) as caught:
        await client.issue_token("c1")
    assert caught.value.code == "INVALID_CLIENT" and caught.value.status == 401
    assert count(sim, TOKEN) == 1  # a definite answer: not retried
    assert_clean(caught.value, "not-the-secret")


# --- issue, refresh, exchange -----------------------------------------------------------------


async def test_issue_returns_a_pair_makini_knows(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("conn-1")
    tokens = issued.tokens
    assert tokens.access.reveal().startswith("eyJ") and tokens.refresh is not None
    assert issued.request_id
    view = sim.token(tokens.access.fingerprint)
    assert view is not None and view["status"] == "active" and view["connection_id"] == "conn-1"
    assert tokens.expires_at is not None
    expected = datetime.fromisoformat(view["expires_at"])
    assert abs((tokens.expires_at - expected).total_seconds()) < 2


@pytest.mark.parametrize(("fmt", "mode"), [("timestamp", "auto"), ("seconds", "auto"),
                                           ("timestamp", "timestamp"), ("seconds", "seconds")])
async def test_expires_in_formats(
    make_client: ClientFactory, sim: SimServer, fmt: str, mode: str
) -> None:
    sim.set(expires_in_format=fmt, token_lifetime_s=3600)
    issued = await make_client(expires_in=mode).issue_token("c1")
    assert issued.tokens.expires_at is not None
    left = (issued.tokens.expires_at - datetime.now(UTC)).total_seconds()
    assert 3590 < left <= 3601


async def test_issue_invalidates_previous(client: MakiniClient, sim: SimServer) -> None:
    first = await client.issue_token("c1")
    second = await client.issue_token("c1")
    with pytest.raises(InvalidToken) as caught:
        await client.verify(first.tokens.access, "c1")
    assert_clean(caught.value, first.tokens.access.reveal())
    assert (await client.verify(second.tokens.access, "c1")).connection_id == "c1"


async def test_issue_keeps_previous_when_makini_does(client: MakiniClient, sim: SimServer) -> None:
    sim.set(issue_invalidates_previous=False)
    first = await client.issue_token("c1")
    await client.issue_token("c1")
    assert (await client.verify(first.tokens.access, "c1")).connection_id == "c1"


async def test_refresh_is_single_use(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    assert issued.tokens.refresh is not None
    renewed = await client.refresh(issued.tokens.refresh)
    assert renewed.tokens.access != issued.tokens.access
    assert (await client.verify(renewed.tokens.access, "c1")).connection_id == "c1"
    with pytest.raises(InvalidToken) as caught:
        await client.refresh(issued.tokens.refresh)
    assert caught.value.code == "INVALID_GRANT" and not caught.value.ambiguous
    assert_clean(caught.value, issued.tokens.refresh.reveal(), "test-prod-secret")


async def test_refresh_reusable_when_makini_allows(client: MakiniClient, sim: SimServer) -> None:
    sim.set(refresh_single_use=False, issue_invalidates_previous=False)
    issued = await client.issue_token("c1")
    assert issued.tokens.refresh is not None
    await client.refresh(issued.tokens.refresh)
    again = await client.refresh(issued.tokens.refresh)
    # OAuth servers usually keep the old access token alive until it expires
    assert (await client.verify(issued.tokens.access, "c1")).connection_id == "c1"
    assert (await client.verify(again.tokens.access, "c1")).connection_id == "c1"


async def test_exchange_code(client: MakiniClient, sim: SimServer) -> None:
    code = sim.link_code("c-link", client_id="test-prod", redirect_uri=REDIRECT)
    issued = await client.exchange_code(code, REDIRECT)
    assert issued.tokens.refresh is not None
    assert (await client.verify(issued.tokens.access, "c-link")).connection_id == "c-link"
    with pytest.raises(InvalidToken) as caught:
        await client.exchange_code(code, REDIRECT)
    assert_clean(caught.value, code)


async def test_exchange_code_with_another_redirect_is_refused(
    client: MakiniClient, sim: SimServer
) -> None:
    code = sim.link_code("c-link", client_id="test-prod", redirect_uri=REDIRECT)
    with pytest.raises(InvalidToken):
        await client.exchange_code(code, "http://elsewhere/cb")


# --- verify, disconnect, revoke ---------------------------------------------------------------


async def test_verify_names_the_connection(client: MakiniClient) -> None:
    issued = await client.issue_token("c1")
    info = await client.verify(issued.tokens.access, "c1")
    assert info.connection_id == "c1" and info.company_name and info.provider
    assert info.request_id


async def test_verify_wrong_connection(client: MakiniClient) -> None:
    issued = await client.issue_token("c1")
    with pytest.raises(WrongConnection) as caught:
        await client.verify(issued.tokens.access, "c2")
    assert "c1" in str(caught.value) and "c2" in str(caught.value)
    assert_clean(caught.value, issued.tokens.access.reveal())


async def test_verify_expired_token(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    sim.set(advance_s=31 * 86400)
    with pytest.raises(InvalidToken) as caught:
        await client.verify(issued.tokens.access, "c1")
    assert caught.value.code == "AUTHENTICATION_FAILED"
    assert sim.token(issued.tokens.access.fingerprint)["status"] == "expired"  # type: ignore[index]


async def test_verify_refuses_a_refresh_token(client: MakiniClient) -> None:
    issued = await client.issue_token("c1")
    assert issued.tokens.refresh is not None
    with pytest.raises(InvalidToken):
        await client.verify(issued.tokens.refresh, "c1")


async def test_disconnect_kills_every_token(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    await client.disconnect("c1")
    with pytest.raises(InvalidToken):
        await client.verify(issued.tokens.access, "c1")
    assert not tokens_of(sim, connection_id="c1", status="active")
    with pytest.raises(BadRequest) as caught:
        await client.issue_token("c1")
    assert caught.value.status == 404 and caught.value.code == "NOT_FOUND"


async def test_revoke_token_when_configured(make_client: ClientFactory, sim: SimServer) -> None:
    sim.set(revoke_endpoint=True, issue_invalidates_previous=False)
    client = make_client(revoke_path="/api/system/tokens/revoke")
    issued = await client.issue_token("c1")
    assert await client.revoke_token(issued.tokens.access) is True
    assert sim.token(issued.tokens.access.fingerprint)["status"] == "revoked"  # type: ignore[index]
    with pytest.raises(InvalidToken):
        await client.verify(issued.tokens.access, "c1")


async def test_revoke_token_not_configured(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    before = sim.stats()["total"]
    assert await client.revoke_token(issued.tokens.access) is False
    assert sim.stats()["total"] == before
    assert sim.token(issued.tokens.access.fingerprint)["status"] == "active"  # type: ignore[index]


async def test_revoke_path_makini_does_not_serve(
    make_client: ClientFactory, sim: SimServer
) -> None:
    client = make_client(revoke_path="/api/system/tokens/revoke")
    issued = await client.issue_token("c1")
    with pytest.raises(BadRequest) as caught:
        await client.revoke_token(issued.tokens.access)
    assert caught.value.status == 404
    assert_clean(caught.value, issued.tokens.access.reveal())


# --- environments stay apart ------------------------------------------------------------------


async def test_client_cannot_touch_another_clients_connection(
    make_client: ClientFactory, sim: SimServer
) -> None:
    prod, dev = make_client(), make_client(DEV)
    issued = await prod.issue_token("shared-id")
    assert issued.tokens.refresh is not None
    with pytest.raises(BadRequest) as caught:
        await dev.issue_token("shared-id")
    assert caught.value.status == 404
    with pytest.raises(BadRequest):
        await dev.disconnect("shared-id")
    with pytest.raises(InvalidToken):
        await dev.refresh(issued.tokens.refresh)
    assert (await prod.verify(issued.tokens.access, "shared-id")).connection_id == "shared-id"
    [conn] = [c for c in sim.connections() if c["id"] == "shared-id"]
    assert conn["client_id"] == "test-prod"


async def test_connection_token_is_not_an_admin_token(sim: SimServer) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        auth = await http.post("/link/token", json={"grant_type": "client_credentials",
                                                     "client_id": "test-prod",
                                                     "client_secret": "test-prod-secret"})
        admin = auth.json()["access_token"]
        issued = await http.post("/api/system/connections/c1/token",
                                 headers={"Authorization": f"Bearer {admin}"})
        access = issued.json()["data"]["access_token"]
        refused = await http.post("/api/system/connections/c1/token",
                                  headers={"Authorization": f"Bearer {access}"})
    assert refused.status_code == 403


async def test_forbidden_is_mapped(make_client: ClientFactory) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y", "expires_in": 3600})
        return httpx.Response(403, json={"error": {"code": "FORBIDDEN", "type": "authz"}})

    with pytest.raises(Forbidden) as caught:
        await make_client(transport=httpx.MockTransport(handler)).issue_token("c1")
    assert caught.value.code == "FORBIDDEN" and not caught.value.ambiguous


# --- error bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["nested", "flat", "list", "plain"])
async def test_every_error_shape_is_parsed(
    client: MakiniClient, sim: SimServer, shape: str
) -> None:
    # an unusual header name: the request id must then come from the body (except plain text,
    # which has only the header, under a name the client knows)
    header = "X-Request-Id" if shape == "plain" else "X-Sim-Trace-Ref"
    sim.set(error_shape=shape, request_id_header=header)
    bogus = Secret("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bogus-signature")
    with pytest.raises(InvalidToken) as caught:
        await client.verify(bogus, "c1")
    error = caught.value
    assert error.code == "AUTHENTICATION_FAILED" and error.status == 401
    assert error.request_id and len(error.request_id) == 32
    assert "Unauthenticated" in str(error)
    assert_clean(error, bogus.reveal())


async def test_rate_limit_error_carries_type_and_retry_after(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep
) -> None:
    sim.set(rate_limit_per_minute=1)
    client = make_client(retry={"max_attempts": 1})
    issued = await client.issue_token("c1")
    with pytest.raises(RateLimited) as caught:
        await client.verify(issued.tokens.access, "c1")
    assert caught.value.code == "RATE_LIMIT_EXCEEDED"
    assert caught.value.retry_after_s is not None and 0 < caught.value.retry_after_s <= 60
    assert "rate_limit_error" in str(caught.value)


async def test_masks_tokens_echoed_in_error_messages(make_client: ClientFactory) -> None:
    token = Secret("opaque-token-value-that-is-not-a-jwt-at-all-0123456789")
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhYmMifQ.c2lnbmF0dXJl"

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        message = f"token {token.reveal()} is bad; also {jwt}; auth={auth}"
        return httpx.Response(401, json={"errors": [{"errorCode": "BAD", "detail": message}]},
                              headers={"x-correlation-id": "corr-1"})

    client = make_client(transport=httpx.MockTransport(handler))
    with pytest.raises(InvalidToken) as caught:
        await client.verify(token, "c1")
    assert caught.value.code == "BAD" and caught.value.request_id == "corr-1"
    assert "[masked]" in str(caught.value)
    assert_clean(caught.value, token.reveal(), jwt, "c2lnbmF0dXJl")


# --- retries ----------------------------------------------------------------------------------


async def test_429_is_retried_after_retry_after(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep
) -> None:
    sim.set(rate_limit_per_minute=2)
    # The simulator counts per wall-clock minute. Half-way through one, the three calls share a
    # window and the Retry-After (about 30 s) fits the retry budget (60 s); at a minute's start
    # it would be 60 s, past the budget, and the client would rightly give up.
    sim.set(advance_s=(30 - time.time() % 60) % 60)
    sleeper.then = lambda delay: sim.set(advance_s=delay)  # the wait really passes at "Makini"
    client = make_client()
    issued = await client.issue_token("c1")
    await client.verify(issued.tokens.access, "c1")
    info = await client.verify(issued.tokens.access, "c1")  # 429, waits out the window, succeeds
    assert info.connection_id == "c1"
    assert count(sim, CURRENT, 429) == 1 and count(sim, CURRENT, 200) == 2
    [delay] = sleeper.delays
    assert 25 <= delay <= 31


@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
async def test_retry_after_formats(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep, fmt: str
) -> None:
    sim.set(outage_s=20, retry_after_format=fmt)
    client = make_client(retry={"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.01})
    with pytest.raises(ServerError) as caught:
        await client.verify(Secret("eyJx.y.z"), "c1")
    assert caught.value.status == 503 and caught.value.code == "SERVICE_UNAVAILABLE"
    [delay] = sleeper.delays
    assert 17 <= delay <= 23  # Retry-After, not the 10 ms backoff


async def test_verify_retries_every_server_error(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep
) -> None:
    issued = await client.issue_token("c1")
    sim.set(fail_next=[500, 502, 504])
    info = await client.verify(issued.tokens.access, "c1")
    assert info.connection_id == "c1"
    assert len(sleeper.delays) == 3
    # full jitter: each delay under base * 2**(attempt-1)
    assert all(0 <= d <= 0.5 * 2**i for i, d in enumerate(sleeper.delays))


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_issue_not_retried_when_it_may_have_happened(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep, status: int
) -> None:
    await client.issue_token("c0")  # authenticate first
    sim.set(fail_next=[status])
    with pytest.raises(ServerError) as caught:
        await client.issue_token("c1")
    assert caught.value.ambiguous and caught.value.status == status
    assert "may have been issued" in caught.value.describe()
    assert not sleeper.delays and count(sim, ISSUE, status) == 1
    if status != 500:  # the simulator processed it: a token exists that nobody received
        assert len(tokens_of(sim, connection_id="c1", kind="access")) == 1


async def test_refresh_not_retried_when_it_may_have_happened(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep
) -> None:
    issued = await client.issue_token("c1")
    assert issued.tokens.refresh is not None
    sim.set(fail_next=[502])
    with pytest.raises(ServerError) as caught:
        await client.refresh(issued.tokens.refresh)
    assert caught.value.ambiguous and not sleeper.delays
    assert_clean(caught.value, issued.tokens.refresh.reveal())


@pytest.mark.parametrize("status", [503, 429])
async def test_issue_retried_when_surely_not_processed(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep, status: int
) -> None:
    await client.issue_token("c0")
    sim.set(fail_next=[status, status])
    issued = await client.issue_token("c1")
    assert len(sleeper.delays) == 2
    assert [t["fingerprint"] for t in tokens_of(sim, connection_id="c1", kind="access")] == [
        issued.tokens.access.fingerprint
    ]


async def test_retries_are_bounded_by_attempts(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep
) -> None:
    client = make_client(retry={"max_attempts": 3})
    sim.set(error_rate=1.0, seed=7)
    with pytest.raises(ServerError):
        await client.verify(Secret("eyJx.y.z"), "c1")
    assert len(sleeper.delays) == 2 and count(sim, CURRENT) == 3


async def test_retries_are_bounded_by_total_time(
    make_client: ClientFactory, sim: SimServer, sleeper: FakeSleep
) -> None:
    client = make_client(retry={"max_attempts": 10, "total_timeout_s": 10})
    sim.set(outage_s=30)  # Retry-After 30 s is beyond the budget: give up at once
    with pytest.raises(ServerError):
        await client.verify(Secret("eyJx.y.z"), "c1")
    assert not sleeper.delays and count(sim, CURRENT) == 1


async def test_outage_window_then_recovery(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep
) -> None:
    issued = await client.issue_token("c1")
    sim.set(outage_s=5)
    assert sim.tokens("c1")  # /_sim/ keeps answering during the outage
    sleeper.then = lambda delay: sim.set(advance_s=delay)
    info = await client.verify(issued.tokens.access, "c1")
    assert info.connection_id == "c1"
    assert sleeper.delays and sleeper.delays[0] >= 5
    assert count(sim, CURRENT, 503) >= 1


async def test_outage_during_issue_is_retried(
    client: MakiniClient, sim: SimServer, sleeper: FakeSleep
) -> None:
    sim.set(outage_s=3)
    sleeper.then = lambda delay: sim.set(advance_s=delay)
    issued = await client.issue_token("c1")  # the auth and the issue both wait it out
    assert sim.token(issued.tokens.access.fingerprint) is not None


# --- malformed answers ------------------------------------------------------------------------


async def test_garbage_is_a_protocol_error(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    sim.set(garbage=True)
    with pytest.raises(MakiniProtocolError) as caught:
        await client.verify(issued.tokens.access, "c1")
    assert not caught.value.ambiguous
    with pytest.raises(MakiniProtocolError) as caught:
        await client.issue_token("c1")
    assert caught.value.ambiguous  # processed: a token was issued and could not be read
    assert "<html" not in str(caught.value)
    assert count(sim, ISSUE, 200) == 2


@pytest.mark.parametrize("body", [{"data": {}}, {"data": {"access_token": 42}}, [1, 2], "x"])
async def test_issue_answer_without_token(make_client: ClientFactory, body: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y"})
        return httpx.Response(200, json=body)

    with pytest.raises(MakiniProtocolError) as caught:
        await make_client(transport=httpx.MockTransport(handler)).issue_token("c1")
    assert caught.value.ambiguous


@pytest.mark.parametrize("data", [{"data": {}}, {"data": {"id": {"x": 1}}}, {"id": None}])
async def test_verify_answer_without_id(make_client: ClientFactory, data: Any) -> None:
    client = make_client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=data)))
    with pytest.raises(MakiniProtocolError):
        await client.verify(Secret("eyJx.y.z"), "c1")


async def test_bare_and_string_fields_are_accepted(make_client: ClientFactory) -> None:
    expires = int(time.time()) + 600

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":  # the admin answer has no expiry at all
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y"})
        if request.method == "GET":
            return httpx.Response(200, json={"id": 17, "company_name": "ACME"})
        return httpx.Response(200, json={"token": "eyJnew.x.y", "expires_in": str(expires)})

    client = make_client(transport=httpx.MockTransport(handler))
    issued = await client.issue_token("17")
    assert issued.tokens.access.reveal() == "eyJnew.x.y" and issued.tokens.refresh is None
    assert issued.tokens.expires_at == datetime.fromtimestamp(expires, UTC)
    info = await client.verify(issued.tokens.access, "17")
    assert info.connection_id == "17" and info.company_name == "ACME" and info.provider is None


async def test_missing_expiry_uses_the_default_lifetime(make_client: ClientFactory) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": {"access_token": "eyJnew.x.y"}})

    client = make_client(transport=httpx.MockTransport(handler),
                         default_token_lifetime=timedelta(days=7))
    issued = await client.issue_token("c1")
    assert issued.tokens.expires_at is not None
    left = issued.tokens.expires_at - datetime.now(UTC)
    assert timedelta(days=7) - timedelta(seconds=5) < left <= timedelta(days=7)


# --- transport failures -----------------------------------------------------------------------


def _instance(cls: type[Exception], request: httpx.Request) -> Exception:
    if issubclass(cls, httpx.HTTPStatusError):
        return cls("boom", request=request, response=httpx.Response(500, request=request))
    if issubclass(cls, httpx.RequestError):
        return cls("boom", request=request)
    if issubclass(cls, httpx.StreamError) and cls is not httpx.StreamError:
        return cls()  # type: ignore[call-arg]  # StreamConsumed() and co. take no message
    return cls("boom")


def _httpx_exceptions() -> list[type[Exception]]:
    found = {
        obj for name in dir(httpx)
        if isinstance(obj := getattr(httpx, name), type) and issubclass(obj, Exception)
        and obj.__module__.startswith("httpx")
    }
    return sorted(found, key=lambda c: c.__name__)


def test_enumeration_finds_the_whole_httpx_tree() -> None:
    names = {c.__name__ for c in _httpx_exceptions()}
    assert {"HTTPError", "ConnectError", "ReadTimeout", "RemoteProtocolError", "StreamConsumed",
            "InvalidURL", "CookieConflict", "DecodingError", "ProxyError"} <= names
    assert len(names) >= 28


@pytest.mark.parametrize("exc_class", _httpx_exceptions(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("call", ["issue", "verify"])
async def test_every_httpx_exception_is_mapped(
    make_client: ClientFactory, sleeper: FakeSleep, exc_class: type[Exception], call: str
) -> None:
    token = Secret("eyJsecret.x.y")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y"})
        raise _instance(exc_class, request)

    client = make_client(transport=httpx.MockTransport(handler), retry={"max_attempts": 2})
    with pytest.raises(MakiniError) as caught:
        if call == "issue":
            await client.issue_token("c1")
        else:
            await client.verify(token, "c1")
    error = caught.value
    assert type(error) is not MakiniError  # always a specific subclass
    assert_clean(error, token.reveal(), "eyJadmin.x.y")
    if isinstance(error, MakiniTransient) and call == "verify":
        assert len(sleeper.delays) == 1  # verify retries every transient failure
    if call == "issue" and error.ambiguous:
        assert not sleeper.delays


@pytest.mark.parametrize(
    ("exc", "expected", "ambiguous"),
    [
        (httpx.ConnectError, MakiniUnreachable, False),
        (httpx.ConnectTimeout, MakiniTimeout, False),
        (httpx.PoolTimeout, MakiniTimeout, False),
        (httpx.ReadTimeout, MakiniTimeout, True),
        (httpx.WriteTimeout, MakiniTimeout, True),
        (httpx.ReadError, MakiniUnreachable, True),
        (httpx.RemoteProtocolError, MakiniUnreachable, True),
        (httpx.LocalProtocolError, MakiniProtocolError, False),
        (httpx.UnsupportedProtocol, MakiniProtocolError, False),
    ],
)
async def test_transport_failures_during_issue(
    make_client: ClientFactory, sleeper: FakeSleep, exc: type[httpx.RequestError],
    expected: type[MakiniError], ambiguous: bool,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/link/token":
            return httpx.Response(200, json={"access_token": "eyJadmin.x.y"})
        raise exc("boom", request=request)

    client = make_client(transport=httpx.MockTransport(handler), retry={"max_attempts": 3})
    with pytest.raises(expected) as caught:
        await client.issue_token("c1")
    assert caught.value.ambiguous is ambiguous
    retried = issubclass(expected, MakiniTransient) and not ambiguous
    assert len(sleeper.delays) == (2 if retried else 0)


async def test_connection_refused(make_client: ClientFactory, sleeper: FakeSleep) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(url=f"http://127.0.0.1:{port}", retry={"max_attempts": 3})
    with pytest.raises(MakiniUnreachable) as caught:
        await client.issue_token("c1")
    assert not caught.value.ambiguous and len(sleeper.delays) == 2
    assert "makini.base_url" in (caught.value.hint or "")


# --- latency, logs, repr ----------------------------------------------------------------------


async def test_latency(client: MakiniClient, sim: SimServer) -> None:
    issued = await client.issue_token("c1")
    sim.set(latency_ms=80)
    started = time.monotonic()
    await client.verify(issued.tokens.access, "c1")
    assert time.monotonic() - started >= 0.08


async def test_no_token_in_logs_or_reprs(client: MakiniClient, sim: SimServer) -> None:
    with structlog.testing.capture_logs() as logs:
        issued = await client.issue_token("c1")
        assert issued.tokens.refresh is not None
        renewed = await client.refresh(issued.tokens.refresh)
        await client.verify(renewed.tokens.access, "c1")
        sim.set(fail_next=[503])
        await client.verify(renewed.tokens.access, "c1")
        with pytest.raises(InvalidToken):
            await client.verify(issued.tokens.access, "c1")
    assert any(e["event"] == "makini.request" and e.get("status") == 200 for e in logs)
    assert any(e["event"] == "makini.retry" for e in logs)
    text = repr(logs) + repr(issued) + repr(renewed) + repr(client)
    secrets = [issued.tokens.access, issued.tokens.refresh, renewed.tokens.access]
    assert all(s.reveal() not in text for s in secrets)
    assert "test-prod-secret" not in text
    for value in sim.state.tokens:  # the admin tokens too
        assert value not in text
