"""Token reads over a real socket: the response, ETag/304, scopes, long-polls, bad input."""

from __future__ import annotations

import asyncio
import json

import pytest

from rotator.api.cache import drop_everywhere
from rotator.keys import revoke_key
from rotator.model import Stage
from tests.api.conftest import ENVS, Factory, LogTrap, bearer, make_keys, wait_for
from tests.wait import until

ALL_NAMES = sorted({c for creds in ENVS.values() for c in creds} | {"nope"})


def envelope_ok(body: dict[str, object], code: str | None = None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"code", "message", "request_id"}
    if code is not None:
        assert error["code"] == code


async def test_read_serves_the_access_token_only(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    version = await api.rotate("prod", "alpha")
    stored = api.runtime.environments["prod"].primary.read("alpha", Stage.CURRENT)
    assert stored is not None and stored.tokens.refresh is not None

    r = await api.http.get("/v1/tokens/prod/alpha", headers=bearer(keys.reader["prod"]))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"token", "version", "expires_at", "rotated_at"}
    assert body["token"] == stored.tokens.access.reveal()
    assert body["version"] == version
    assert stored.tokens.refresh.reveal() not in r.text  # a refresh token never leaves
    assert r.headers["etag"] == f'"{version}"'
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-type"] == "application/json"


async def test_if_none_match_answers_304_until_the_version_changes(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    await api.rotate("prod", "alpha")
    first = await api.http.get("/v1/tokens/prod/alpha", headers=key)
    etag = first.headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = await api.http.get("/v1/tokens/prod/alpha", headers={**key, "If-None-Match": value})
        assert r.status_code == 304, value
        assert r.headers["etag"] == etag and r.content == b""
    await api.rotate("prod", "alpha")
    r = await api.http.get("/v1/tokens/prod/alpha", headers={**key, "If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] != etag


async def test_scopes_every_key_kind_environment_and_credential(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    for env, creds in ENVS.items():
        for cred in creds:
            await api.rotate(env, cred)
    callers: list[tuple[str, str | None, str | None, str | None]] = [
        ("none", None, None, None),
        ("unknown", "mrk_0123456789ab_" + "x" * 43, None, None),
        ("malformed", "not-a-key", None, None),
    ]
    for env in ENVS:
        callers.append(("reader", keys.reader[env], env, None))
        callers.append(("admin", keys.admin[env], env, None))
        for cred in ENVS[env]:
            callers.append(("scoped", keys.scoped[(env, cred)], env, cred))

    def expected(kind: str, key_env: str | None, key_cred: str | None, env: str, cred: str) -> int:
        if key_env is None:
            return 401
        if key_env != env or kind == "admin":
            return 403
        if key_cred is not None and key_cred != cred:
            return 403
        return 200 if cred in ENVS[env] else 404

    checked = 0
    for kind, key, key_env, key_cred in callers:
        headers = bearer(key) if key else {}
        for env in ENVS:
            for cred in ALL_NAMES:
                r = await api.http.get(f"/v1/tokens/{env}/{cred}", headers=headers)
                want = expected(kind, key_env, key_cred, env, cred)
                assert r.status_code == want, (kind, key_env, key_cred, env, cred, r.text)
                if want == 200:
                    assert r.json()["token"]
                else:
                    envelope_ok(r.json())
                    assert "token" not in r.json()["error"]
                checked += 1
            listing = await api.http.get(f"/v1/tokens/{env}", headers=headers)
            if key_env is None:
                assert listing.status_code == 401
            elif key_env != env:
                assert listing.status_code == 403
            else:
                names = [c["name"] for c in listing.json()["credentials"]]
                assert names == ([key_cred] if key_cred else sorted(ENVS[env]))
                assert "token" not in listing.text
    assert checked == len(callers) * len(ENVS) * len(ALL_NAMES)


async def test_unauthorized_answers_carry_www_authenticate(serve: Factory) -> None:
    api = await serve()
    r = await api.http.get("/v1/tokens/prod/alpha")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    envelope_ok(r.json(), "unauthorized")


async def test_a_revoked_key_stops_working(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    await api.rotate("prod", "alpha")
    key = bearer(keys.reader["prod"])
    assert (await api.http.get("/v1/tokens/prod/alpha", headers=key)).status_code == 200
    info = api.app.state.keys.verify(keys.reader["prod"])
    assert info is not None
    revoke_key(api.runtime.journal, info.key_id)

    async def refused() -> bool:
        r = await api.http.get("/v1/tokens/prod/alpha", headers=key)
        return r.status_code == 401

    assert await wait_for(refused) < 1.0  # the feed reloads keys from the journal


async def test_a_credential_without_a_token_is_404_no_token(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    r = await api.http.get("/v1/tokens/prod/beta", headers=bearer(keys.reader["prod"]))
    assert r.status_code == 404
    envelope_ok(r.json(), "no_token")


async def test_promotion_is_served_at_once(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    for _ in range(3):
        version = await api.rotate("prod", "alpha")
        r = await api.http.get("/v1/tokens/prod/alpha", headers=key)
        assert r.json()["version"] == version


async def test_long_poll_answers_as_soon_as_the_version_changes(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    first = await api.rotate("prod", "alpha")
    loop = asyncio.get_running_loop()

    async def poll() -> tuple[int, str, float]:
        started = loop.time()
        r = await api.http.get(f"/v1/tokens/prod/alpha?wait=20&known_version={first}", headers=key)
        return r.status_code, r.json()["version"], loop.time() - started

    waiting = asyncio.ensure_future(poll())
    await until("the long-poll to wait", lambda: api.app.state.cache.waiting("prod", "alpha"))
    assert not waiting.done()
    second = await api.rotate("prod", "alpha")
    status, version, took = await asyncio.wait_for(waiting, 5)
    assert (status, version) == (200, second)
    assert took < 2

    # unchanged until the wait is over: 304
    r = await api.http.get(f"/v1/tokens/prod/alpha?wait=1&known_version={second}", headers=key)
    assert r.status_code == 304 and r.headers["etag"] == f'"{second}"'
    # a known version that is not current: at once
    r = await api.http.get(f"/v1/tokens/prod/alpha?wait=20&known_version={first}", headers=key)
    assert r.status_code == 200 and r.json()["version"] == second
    # If-None-Match stands in for known_version
    etag = f'"{second}"'
    r = await api.http.get("/v1/tokens/prod/alpha?wait=1", headers={**key, "If-None-Match": etag})
    assert r.status_code == 304


async def test_previous_stage_only_during_a_grace_period(
    serve: Factory, log_trap: LogTrap, sim: object
) -> None:
    sim.set(issue_invalidates_previous=False)  # type: ignore[attr-defined]
    api = await serve(
        makini={"issue_invalidates_previous": False},
        schedule={"interval": "1h", "grace_period": "1h"},
    )
    key = bearer(make_keys(api, log_trap).reader["prod"])
    first = await api.rotate("prod", "alpha")
    r = await api.http.get("/v1/tokens/prod/alpha?stage=previous", headers=key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_previous"
    second = await api.rotate("prod", "alpha")
    r = await api.http.get("/v1/tokens/prod/alpha?stage=previous", headers=key)
    assert r.status_code == 200 and r.json()["version"] == first
    r = await api.http.get("/v1/tokens/prod/alpha?stage=current", headers=key)
    assert r.json()["version"] == second


async def test_a_dropped_version_is_unservable_at_once(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    version = await api.rotate("prod", "alpha")
    assert (await api.http.get("/v1/tokens/prod/alpha", headers=key)).status_code == 200
    await asyncio.to_thread(drop_everywhere, api.runtime.journal, "prod", "alpha", version)
    r = await api.http.get("/v1/tokens/prod/alpha", headers=key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "token_revoked"
    assert r.headers["retry-after"] == "1"
    replacement = await api.rotate("prod", "alpha")
    r = await api.http.get("/v1/tokens/prod/alpha", headers=key)
    assert r.status_code == 200 and r.json()["version"] == replacement


BAD_READS = [
    # the key decides first: a malformed environment is not the key's (403, before any 422)
    ("/v1/tokens/PROD/alpha", 403),
    ("/v1/tokens/prod/Alpha", 422),
    ("/v1/tokens/prod/al%20pha", 422),
    ("/v1/tokens/prod/alpha%0A", 422),
    ("/v1/tokens/" + "p" * 40 + "/alpha", 403),
    ("/v1/tokens/prod/alpha?wait=-1", 422),
    ("/v1/tokens/prod/alpha?wait=abc", 422),
    ("/v1/tokens/prod/alpha?wait=99999", 422),
    ("/v1/tokens/prod/alpha?wait=61", 422),
    ("/v1/tokens/prod/alpha?stage=pending", 422),
    ("/v1/tokens/prod/alpha?known_version=a%20b", 422),
    ("/v1/tokens/prod/alpha?stage=previous&wait=5", 422),
    ("/v1/tokens/prod/alpha/extra", 404),
    ("/v1/tokens/prod/", 404),
    ("/v1/nothing", 404),
]


async def test_bad_input_answers_the_envelope(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    for path, status in BAD_READS:
        r = await api.http.get(path, headers={**key, "X-Request-Id": "req-123"})
        assert r.status_code == status, (path, r.text)
        envelope_ok(r.json())
        assert r.json()["error"]["request_id"] == "req-123" == r.headers["x-request-id"]


async def test_wrong_methods_and_bodies_answer_the_envelope(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    r = await api.http.post("/v1/tokens/prod/alpha", headers=bearer(keys.reader["prod"]))
    assert r.status_code == 405
    envelope_ok(r.json(), "method_not_allowed")
    admin = bearer(keys.admin["prod"])
    cases = [
        (b"{", "application/json", 422),
        (b'{"reason": ""}', "application/json", 422),
        (json.dumps({"reason": "x" * 501}).encode(), "application/json", 422),
        (b'{"unknown": 1}', "application/json", 422),
        (b"[1, 2]", "application/json", 422),
        (b"x" * 20000, "application/json", 413),
    ]
    for body, ctype, status in cases:
        r = await api.http.post(
            "/v1/admin/rotate/prod/alpha", content=body, headers={**admin, "content-type": ctype}
        )
        assert r.status_code == status, (body[:20], r.text)
        envelope_ok(r.json())


async def test_a_bug_in_the_token_route_answers_the_envelope(
    serve: Factory, log_trap: LogTrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await serve()
    key = bearer(make_keys(api, log_trap).reader["prod"])
    await api.rotate("prod", "alpha")

    def broken(env: str, name: str) -> None:
        raise RuntimeError("a bug in the cache")

    monkeypatch.setattr(api.app.state.cache, "get", broken)
    r = await api.http.get("/v1/tokens/prod/alpha", headers={**key, "X-Request-Id": "bug-1"})
    assert r.status_code == 500
    envelope_ok(r.json(), "internal")
    assert r.json()["error"]["request_id"] == "bug-1"
    assert "a bug in the cache" not in r.text  # the cause is logged, not answered
    assert "api.internal_error" in log_trap.text()
