"""The Makini webhook receiver and its worker, and the simulator's signed webhook sender."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select

from rotator.journal.schema import WebhookEvent
from rotator.makini.sim import SimServer
from rotator.webhooks.queue import DONE, IGNORED, parse_event
from rotator.webhooks.signature import signature_valid
from tests.api.conftest import WEBHOOK_SECRETS, Factory, Served, connection, wait_for

SECRET = WEBHOOK_SECRETS["prod"].encode()
URL = "/v1/webhooks/makini/prod"


def body_of(event: str = "sync.completed", **extra: Any) -> bytes:
    doc = {"id": extra.pop("id", "wh_1"), "event": event, "connection_id": "conn-prod-alpha"}
    return json.dumps({**doc, **extra}).encode()


def digest(body: bytes, secret: bytes = SECRET) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


async def post(api: Served, body: bytes, signature: str | None, **headers: str) -> httpx.Response:
    sent = {"content-type": "application/json", **headers}
    if signature is not None:
        sent["X-Webhook-Signature"] = signature
    return await api.http.post(URL, content=body, headers=sent)


def queued(api: Served) -> list[WebhookEvent]:
    with api.runtime.journal.reader() as s:
        return list(s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


async def test_signature_cases(serve: Factory) -> None:
    api = await serve()
    body = body_of()
    raw = digest(body)
    cases: list[tuple[str, bytes, str | None, int]] = [
        ("valid hex", body_of(id="h"), digest(body_of(id="h")).hex(), 200),
        ("valid hex, upper case", body_of(id="H"), digest(body_of(id="H")).hex().upper(), 200),
        ("valid base64", body, base64.b64encode(raw).decode(), 200),
        (
            "valid url-safe base64, unpadded",
            body_of(id="u"),
            base64.urlsafe_b64encode(digest(body_of(id="u"))).decode().rstrip("="),
            200,
        ),
        ("sha256= prefix", body_of(id="p"), "sha256=" + digest(body_of(id="p")).hex(), 200),
        ("invalid", body, base64.b64encode(digest(body, b"wrong")).decode(), 401),
        ("missing", body, None, 401),
        ("empty", body, "", 401),
        ("wrong encoding (hex of hex)", body, raw.hex().encode().hex(), 401),
        ("truncated", body, raw.hex()[:40], 401),
        ("not base64", body, "!!!!" * 11, 401),
        ("signature of another body", body_of(id="x"), raw.hex(), 401),
        ("huge header", body, "a" * 5000, 401),
    ]
    for name, sent, signature, status in cases:
        r = await post(api, sent, signature)
        assert r.status_code == status, (name, r.text)
        if status != 200:
            assert r.json()["error"]["code"] == "unauthorized", name
    assert len(queued(api)) == 5


async def test_duplicates_and_bad_requests(serve: Factory) -> None:
    api = await serve()
    body = body_of("connection.status_changed", id="dup-1")
    sig = digest(body).hex()
    first = await post(api, body, sig)
    assert first.json() == {"status": "accepted", "id": "dup-1"}
    again = await post(api, body, sig)  # a redelivery (Makini retries until it sees 200)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    # no id in the body: the body's hash is the id, so identical redeliveries still dedupe
    anonymous = json.dumps({"event": "sync.failed", "connection_id": "x"}).encode()
    for _ in range(2):
        r = await post(api, anonymous, digest(anonymous).hex())
    assert r.json()["status"] == "duplicate" and r.json()["id"].startswith("sha256:")
    assert len(queued(api)) == 2

    too_big = b"{" + b" " * (70 * 1024) + b"}"
    r = await post(api, too_big, digest(too_big).hex())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    not_json = b"hello"
    r = await post(api, not_json, digest(not_json).hex())
    assert r.status_code == 422
    array = b"[1, 2]"
    r = await post(api, array, digest(array).hex())
    assert r.status_code == 422
    r = await post(api, body, sig, **{"content-type": "text/plain"})
    assert r.status_code == 415
    r = await api.http.post(
        "/v1/webhooks/makini/nowhere", content=body, headers={"X-Webhook-Signature": sig}
    )
    assert r.status_code == 404
    r = await api.http.post("/v1/webhooks/makini/Bad_Env", content=body)
    assert r.status_code == 422
    # dev's secret does not sign prod's webhooks
    r = await post(api, body_of(id="cross"), digest(body_of(id="cross"), b"whsec-dev").hex())
    assert r.status_code == 401


async def test_dedupe_keys_only_on_what_the_signature_covers(serve: Factory) -> None:
    """The signature covers the body, not the headers: an id header (unsigned, anyone on the
    path can change it) never makes a redelivered body new, nor two bodies one."""
    api = await serve()
    anonymous = json.dumps(
        {"event": "connection.authentication_required", "connection_id": "conn-prod-alpha"}
    ).encode()
    sig = digest(anonymous).hex()
    body_hash = "sha256:" + hashlib.sha256(anonymous).hexdigest()
    answers = []
    for headers in (
        {"X-Webhook-Id": "hdr-1"},
        {"X-Webhook-Id": "hdr-2"},
        {"X-Makini-Webhook-Id": "hdr-3"},
        {},
    ):
        r = await post(api, anonymous, sig, **headers)
        assert r.status_code == 200, r.text
        answers.append((r.json()["status"], r.json()["id"]))
    assert answers == [("accepted", body_hash)] + [("duplicate", body_hash)] * 3
    # the id inside the body is signed: it alone names the event, whatever the header says
    signed = body_of("sync.completed", id="signed-1")
    first = await post(api, signed, digest(signed).hex(), **{"X-Webhook-Id": "hdr-4"})
    again = await post(api, signed, digest(signed).hex(), **{"X-Webhook-Id": "hdr-5"})
    assert first.json() == {"status": "accepted", "id": "signed-1"}
    assert again.json() == {"status": "duplicate", "id": "signed-1"}
    # two different signed bodies never share a header's id
    other = body_of("sync.failed", id="signed-2")
    r = await post(api, other, digest(other).hex(), **{"X-Webhook-Id": "signed-1"})
    assert r.json() == {"status": "accepted", "id": "signed-2"}
    assert [e.webhook_id for e in queued(api)] == [body_hash, "signed-1", "signed-2"]


async def test_the_worker_marks_attention_and_verifies(serve: Factory, sim: SimServer) -> None:
    api = await serve()
    await api.rotate("prod", "alpha")
    await api.rotate("prod", "beta")
    verifies_before = sim.stats()["routes"]["GET /api/integrations/current"]["200"]

    auth = json.dumps(
        {
            "id": "a1",
            "event": "connection.authentication_required",
            "connection_id": connection("prod", "alpha"),
        }
    ).encode()
    status = json.dumps(
        {
            "id": "s1",
            "type": "connection.status_changed",
            "data": {"connection": {"id": connection("prod", "beta")}},
        }
    ).encode()
    unknown = json.dumps(
        {
            "id": "u1",
            "event": "connection.authentication_required",
            "connection_id": "conn-of-someone-else",
        }
    ).encode()
    sync = json.dumps(
        {"id": "y1", "event": "sync.completed", "connection_id": connection("prod", "beta")}
    ).encode()
    for body in (auth, status, unknown, sync):
        assert (await post(api, body, digest(body).hex())).status_code == 200

    async def processed() -> bool:
        return all(e.status in (DONE, IGNORED) for e in queued(api))

    await wait_for(processed)
    by_id = {e.webhook_id: e for e in queued(api)}
    assert by_id["a1"].status == DONE and by_id["a1"].outcome == "attention marked"
    assert by_id["s1"].status == DONE and "verified: ok" in (by_id["s1"].outcome or "")
    assert by_id["u1"].status == IGNORED
    assert by_id["y1"].status == IGNORED
    state = api.runtime.journal.state("prod", "alpha")
    assert state is not None and state.attention and "re-authorize" in state.attention
    beta = api.runtime.journal.state("prod", "beta")
    assert beta is not None and beta.attention is None
    verifies = sim.stats()["routes"]["GET /api/integrations/current"]["200"]
    assert verifies == verifies_before + 1
    [alert] = api.runtime.journal.audit_entries(action="webhook.attention")
    assert alert.actor == "makini-webhook" and alert.credential == "alpha"


async def test_a_late_attention_event_only_verifies(serve: Factory) -> None:
    """Out of order: an 'authentication required' from before the last rotation is stale."""
    api = await serve()
    await api.rotate("prod", "alpha")
    old = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    body = json.dumps(
        {
            "id": "late",
            "event": "connection.authentication_required",
            "connection_id": connection("prod", "alpha"),
            "timestamp": old,
        }
    ).encode()
    assert (await post(api, body, digest(body).hex())).status_code == 200

    async def processed() -> bool:
        return queued(api)[0].status == DONE

    await wait_for(processed)
    assert "older than the last rotation" in (queued(api)[0].outcome or "")
    state = api.runtime.journal.state("prod", "alpha")
    assert state is not None and state.attention is None


async def test_simulator_sends_signed_duplicated_shuffled_webhooks(
    serve: Factory, sim: SimServer
) -> None:
    api = await serve()
    await api.rotate("prod", "alpha")
    events = [
        {"event": "sync.completed", "connection_id": connection("prod", "alpha")},
        {"event": "connection.status_changed", "connection_id": connection("prod", "alpha")},
        {
            "event": "connection.authentication_required",
            "connection_id": connection("prod", "alpha"),
        },
    ]
    for encoding in ("base64", "hex"):
        reply = (
            await api.http.post(
                f"{sim.url}/_sim/webhooks/send",
                json={
                    "url": api.url + URL,
                    "secret": SECRET.decode(),
                    "events": events,
                    "duplicates": 2,
                    "shuffle": True,
                    "seed": 7,
                    "encoding": encoding,
                },
            )
        ).json()["deliveries"]
        assert len(reply) == 9 and {d["status"] for d in reply} == {200}
        assert [d["event"] for d in reply] != [e["event"] for e in events for _ in range(3)]
    bad = (
        await api.http.post(
            f"{sim.url}/_sim/webhooks/send",
            json={
                "url": api.url + URL,
                "secret": SECRET.decode(),
                "event": "sync.failed",
                "connection_id": "c",
                "bad_signature": True,
            },
        )
    ).json()["deliveries"]
    assert [d["status"] for d in bad] == [401]
    assert len(queued(api)) == 6  # three events per run, each once whatever the duplicates

    async def processed() -> bool:
        return all(e.status in (DONE, IGNORED) for e in queued(api))

    await wait_for(processed)
    state = api.runtime.journal.state("prod", "alpha")
    assert state is not None and state.attention


def test_signature_and_parsing_units() -> None:
    body = b'{"webhook_id": 42, "type": "x", "created_at": 1700000000000}'
    assert signature_valid(SECRET, body, digest(body).hex())
    assert not signature_valid(SECRET, body, None)
    assert not signature_valid(b"", body, digest(body).hex())
    event = parse_event(body)
    assert event.webhook_id == "42" and event.event_type == "x"
    assert event.occurred_at == datetime.fromtimestamp(1700000000, UTC)
    anonymous = b'{"event": "e"}'
    hashed = "sha256:" + hashlib.sha256(anonymous).hexdigest()
    assert parse_event(anonymous).webhook_id == hashed
    # an id too long for the column is hashed, not cut: two ids that share a prefix stay two
    long_ids = [json.dumps({"id": "x" * 250 + end}).encode() for end in "ab"]
    a, b = (parse_event(body).webhook_id for body in long_ids)
    assert a != b and a.startswith("id-sha256:") and len(a) <= 200
