"""Hostile JSON bodies and the server's own logs (issue 14, item 5).

Every operation of the OpenAPI document that takes a JSON body (the admin actions, whose bodies
FastAPI parses, and the webhook receiver, which parses its own) answers a body nested 2,000 deep
with 422 in the error envelope, never 500; and an exception that does reach uvicorn is written by
structlog, masked, never as a raw traceback from uvicorn's loggers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from rotator.jsonbody import MAX_DEPTH, loads, too_deep_at
from tests.api.conftest import WEBHOOK_SECRETS, Factory, LogTrap, Served, bearer, make_keys

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsZWFrZWQtaW4tYW4tZXhjZXB0aW9uIn0.c2lnbmF0dXJlLXBhcnQ"


def nested(depth: int) -> bytes:
    """An object whose ``reason`` is ``depth`` arrays deep (2,000 deep: about 4 KB)."""
    return b'{"reason": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def fill(path: str) -> str:
    for name, value in (("env", "prod"), ("name", "alpha")):
        path = path.replace("{" + name + "}", value)
    return path


def body_operations(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(method, path, needs a key) of every operation that takes a JSON body."""
    return [
        (method, path, bool(op.get("security")))
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
    ]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as the JSON structlog renders; a line that is not JSON (a raw
    traceback, uvicorn's own format) fails the test with its first characters."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not written by structlog: {line[:80]!r}") from None
    return out


async def send(api: Served, keys: dict[str, str], method: str, path: str, keyed: bool,
               body: bytes) -> Any:
    headers = {"content-type": "application/json"}
    if keyed:
        headers.update(bearer(keys["prod"]))
    else:  # the webhook receiver: signed with the environment's secret
        secret = WEBHOOK_SECRETS["prod"].encode()
        headers["X-Webhook-Signature"] = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return await api.http.request(method.upper(), fill(path), content=body, headers=headers)


async def test_every_json_body_answers_422_to_pathological_nesting(
    serve: Factory, log_trap: LogTrap
) -> None:
    api = await serve()
    keys = make_keys(api, log_trap)
    doc = (await api.http.get("/openapi.json")).json()
    operations = body_operations(doc)
    assert {(m, p) for m, p, keyed in operations if not keyed} == {
        ("post", "/v1/webhooks/makini/{env}")
    }
    assert len(operations) >= 3
    mark = len(log_trap.text())
    for method, path, keyed in operations:
        too_deep = f"nested deeper than {MAX_DEPTH} levels"
        for body, why in (
            (nested(2000), too_deep),
            (b"[" * 5000 + b"]" * 5000, too_deep),
            (nested(MAX_DEPTH + 1), too_deep),
            (b'{"reason": "' + b"[" * 5000 + b'"}', None),  # brackets in a string: no depth
            (b'{"reason": ' + b"7" * 5000 + b"}", "digits"),  # past Python's int conversion
            (b'{"reason": "\xff"}', "not UTF-8"),
        ):
            r = await send(api, keys.admin, method, path, keyed, body)
            if why is None:
                assert r.status_code != 422 or "JSON" not in r.text, (path, r.text)
                continue
            assert r.status_code == 422, (path, len(body), r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request", (path, error)
            assert why in error["message"], (path, error)
    # the limit refuses the pathological only: a body at the limit is read (and answered on)
    r = await send(api, keys.admin, "post", "/v1/webhooks/makini/{env}", False, nested(MAX_DEPTH))
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    logged = log_trap.text()[mark:]
    assert "Traceback" not in logged and "RecursionError" not in logged
    json_lines(logged)


async def test_an_exception_that_reaches_the_server_is_logged_by_structlog_masked(
    serve: Factory, log_trap: LogTrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here a fault injected into /metrics) escapes to Starlette and uvicorn: both
    records are structlog's JSON, with the token-shaped text of the message masked."""
    api = await serve()
    keys = make_keys(api, log_trap)
    key = keys.reader["prod"]

    def broken() -> bytes:
        raise RuntimeError(f"boom: Authorization: Bearer {key} and {JWT}")

    monkeypatch.setattr(api.app.state.metrics, "render", broken)
    mark = len(log_trap.text())
    r = await api.http.get("/metrics")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    logged = log_trap.text()[mark:]
    assert key not in logged and key.split("_", 2)[2] not in logged and JWT not in logged
    records = json_lines(logged)
    [server] = [r for r in records if r.get("logger") == "uvicorn.error"]
    assert server["level"] == "error" and "Exception in ASGI application" in server["event"]
    assert "RuntimeError: boom" in server["exception"] and "[masked" in server["exception"]
    [ours] = [r for r in records if r.get("event") == "api.internal_error"]
    assert ours["path"] == "/metrics" and "[masked" in ours["exception"]


def test_the_depth_scan_skips_strings_and_takes_linear_time() -> None:
    assert too_deep_at('{"a": "[[[[\\"[[[[", "b": [[1]]}', limit=3) is None
    assert too_deep_at('{"a": "[[[[\\"[[[[", "b": [[[1]]]}', limit=3) == 27
    assert too_deep_at("[" * 65 + "]" * 65) == 64
    with pytest.raises(json.JSONDecodeError, match="nested deeper than 64 levels"):
        loads(b"[" * 65 + b"]" * 65)
    assert loads(b"[" * 64 + b"]" * 64) is not None
    # texts that would make a backtracking string pattern quadratic (seconds): unterminated
    # strings full of escaped quotes, a trailing backslash; 64 KB each, after enough brackets
    # to be scanned at all
    for tail in ('"' + '\\"' * 32_000 + "\\", '["' + '\\"[' * 21_000, '"\\' * 32_000):
        text = "[]" * (MAX_DEPTH + 1) + tail
        start = time.perf_counter()
        assert too_deep_at(text) is None
        assert time.perf_counter() - start < 0.5, len(text)
