"""Admin endpoints (admin keys only, audited with the key's name), health, readiness, metrics
and the OpenAPI document."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Factory, LogTrap, bearer, make_keys, wait_for


async def test_admin_rotate(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    url = "/v1/admin/rotate/prod/alpha"
    assert (await api.http.post(url)).status_code == 401
    assert (await api.http.post(url, headers=bearer(keys.reader["prod"]))).status_code == 403
    assert (await api.http.post(url, headers=bearer(keys.admin["dev"]))).status_code == 403
    r = await api.http.post("/v1/admin/rotate/prod/gamma", headers=bearer(keys.admin["prod"]))
    assert r.status_code == 404
    r = await api.http.post(
        url, headers=bearer(keys.admin["prod"]), json={"reason": "suspected leak"}
    )
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["outcome"] == "rotated" and result["ok"] is True
    served = await api.http.get("/v1/tokens/prod/alpha", headers=bearer(keys.reader["prod"]))
    assert served.json()["version"] == result["version_id"]
    [promoted] = api.runtime.journal.audit_entries(action="rotation.promoted")
    assert promoted.actor == "admin-prod"
    [call] = api.runtime.journal.audit_entries(action="api.rotate")
    assert call.actor == "admin-prod" and call.outcome == "rotated"
    assert call.as_dict()["detail"]["reason"] == "suspected leak"
    # no body at all is fine too
    r = await api.http.post(url, headers=bearer(keys.admin["prod"]))
    assert r.status_code == 200
    # if_version: only while that is still the current version (the caller's view is stale
    # once another rotation happened: nothing is rotated twice)
    stale = result["version_id"]
    current = r.json()["version_id"]
    again = await api.http.post(
        url, headers=bearer(keys.admin["prod"]), json={"if_version": stale}
    )
    assert again.status_code == 200 and again.json()["outcome"] == "nothing"
    assert "another worker rotated it" in again.json()["detail"]
    fresh = await api.http.post(
        url, headers=bearer(keys.admin["prod"]), json={"if_version": current}
    )
    assert fresh.json()["outcome"] == "rotated" and fresh.json()["version_id"] != current


async def test_admin_revoke_hands_over(
    serve: Factory, log_trap: LogTrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    admin = bearer(keys.admin["prod"])
    url = "/v1/admin/revoke/prod"
    body = {"credentials": ["alpha"], "reason": "leaked in a log"}

    calls: list[dict[str, Any]] = []

    async def revoke_from_api(runtime: object, env: str, **kw: Any) -> dict[str, Any]:
        calls.append({"env": env, **kw})
        return {"ok": True, "dry_run": kw["dry_run"]}

    monkeypatch.setattr("rotator.api.admin.revoke_from_api", revoke_from_api)
    r = await api.http.post(url, headers=admin, json={**body, "dry_run": True})
    assert r.status_code == 200 and r.json() == {"ok": True, "dry_run": True}
    assert calls == [
        {
            "env": "prod",
            "names": ["alpha"],
            "all_": False,
            "version": None,
            "no_replace": False,
            "reason": "leaked in a log",
            "actor": "admin-prod",
            "dry_run": True,
        }
    ]
    entries = api.runtime.journal.audit_entries(action="api.revoke")
    assert [e.outcome for e in entries] == ["dry_run"]
    assert {e.actor for e in entries} == {"admin-prod"}
    r = await api.http.post(url, headers=bearer(keys.reader["prod"]), json=body)
    assert r.status_code == 403
    r = await api.http.post(url, headers=admin, json={"reason": "x", "credentials": ["nope"]})
    assert r.status_code == 404
    r = await api.http.post(url, headers=admin, json={"credentials": ["alpha"]})
    assert r.status_code == 422


async def test_admin_revoke_end_to_end(serve: Factory, log_trap: LogTrap) -> None:
    """With the real ``rotator.revoke``: the revoked version is never served again, here at
    once (the engine's revoke listener) and by a replica within a second (the journal)."""
    api = await serve()
    replica = await serve()
    keys = make_keys(api, log_trap)
    replica.app.state.keys.load(replica.runtime.journal)
    reader = bearer(keys.reader["prod"])
    old = await api.rotate("prod", "alpha")
    assert (await replica.http.get("/v1/tokens/prod/alpha", headers=reader)).json()[
        "version"
    ] == old
    r = await api.http.post(
        "/v1/admin/revoke/prod",
        headers=bearer(keys.admin["prod"]),
        json={"credentials": ["alpha"], "reason": "leaked in a log"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True, r.json()
    assert old in api.app.state.cache.dropped
    served = await api.http.get("/v1/tokens/prod/alpha", headers=reader)
    assert served.status_code == 200 and served.json()["version"] != old

    async def replica_moved_on() -> bool:
        r = await replica.http.get("/v1/tokens/prod/alpha", headers=reader)
        return r.status_code == 200 and r.json()["version"] != old

    assert await wait_for(replica_moved_on) < 1.0
    assert old in replica.app.state.cache.dropped
    [entry] = api.runtime.journal.audit_entries(action="api.revoke")
    assert (entry.actor, entry.outcome) == ("admin-prod", "success")


async def test_health_readiness_metrics_and_openapi(serve: Factory, log_trap: LogTrap) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    assert (await api.http.get("/readyz")).json() == {"status": "ready", "problems": []}
    await api.rotate("prod", "alpha")
    key = bearer(keys.reader["prod"])
    token = (await api.http.get("/v1/tokens/prod/alpha", headers=key)).json()["token"]
    await api.http.get("/v1/tokens/prod/alpha", headers={**key, "If-None-Match": "*"})
    await api.http.get("/v1/tokens/prod/alpha")
    await api.http.get("/v1/tokens/dev/alpha", headers=key)

    text = (await api.http.get("/metrics")).text
    for line in (
        'rotator_rotations_total{credential="alpha",environment="prod",outcome="rotated"} 1.0',
        'rotator_token_reads_total{environment="prod",status="200"} 1.0',
        'rotator_token_reads_total{environment="prod",status="304"} 1.0',
        'rotator_token_reads_total{environment="prod",status="401"} 1.0',
        'rotator_token_reads_total{environment="dev",status="403"} 1.0',
        'rotator_credential_attention{credential="alpha",environment="prod"} 0.0',
    ):
        assert line in text, line
    assert 'rotator_rotation_duration_seconds_count{environment="prod"} 1.0' in text
    assert 'rotator_token_age_seconds{credential="alpha",environment="prod"}' in text
    assert 'rotator_token_expires_in_seconds{credential="alpha",environment="prod"}' in text
    assert token not in text

    doc = (await api.http.get("/openapi.json")).json()
    assert set(doc["paths"]) == {
        "/v1/tokens/{env}/{name}",
        "/v1/tokens/{env}",
        "/v1/admin/rotate/{env}/{name}",
        "/v1/admin/revoke/{env}",
        "/v1/webhooks/makini/{env}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    read = doc["paths"]["/v1/tokens/{env}/{name}"]["get"]
    assert {"200", "304", "401", "403", "404", "422"} <= set(read["responses"])


async def test_readiness_names_what_is_missing(
    serve: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = await serve()
    monkeypatch.delenv("TEST_WEBHOOK_DEV")
    r = await api.http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["problems"] == [
        "dev: webhooks: the environment variable TEST_WEBHOOK_DEV is not set "
        "(environments.dev.webhook.secret_env)"
    ]
