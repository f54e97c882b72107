"""``rotator serve`` as a subprocess, as it runs in production (its own uvicorn configuration,
its own logging): hostile requests are answered with 4xx, and everything on its stderr, uvicorn's
own warnings included, is structlog's JSON: no raw traceback, no key, no secret (issue 14,
item 5)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from pathlib import Path

import httpx

from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.keys import create_key
from rotator.makini.sim import SimServer
from tests.api.conftest import WEBHOOK_SECRETS, LogTrap, bearer, connection
from tests.cli import RotatorCli
from tests.wait import until

CONFIG = """
[journal]
url = "sqlite:///journal.db"

[environments.prod]
sealing_key = {{ env = "SERVE_LOGS_SEAL" }}
webhook = {{ secret_env = "SERVE_LOGS_WEBHOOK" }}
[environments.prod.makini]
base_url = "{url}"
client_id = "test-prod"
client_secret_env = "SERVE_LOGS_MAKINI"
[[environments.prod.backends]]
type = "file"
path = "files"
key = {{ file = "files.key", generate = true }}
[[environments.prod.credentials]]
name = "alpha"
connection_id = "{alpha}"
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deep(depth: int = 2000) -> bytes:
    return b'{"reason": ' + b"[" * depth + b"]" * depth + b"}"


def garbage_request(port: int) -> bytes:
    """Bytes that are not HTTP: uvicorn answers 400 itself and logs a warning."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
        return sock.recv(1000)


async def test_serve_answers_hostile_bodies_and_logs_only_structlog_json(
    tmp_path: Path, sim: SimServer, log_trap: LogTrap
) -> None:
    secret = WEBHOOK_SECRETS["prod"]
    cli = RotatorCli(
        tmp_path,
        CONFIG.format(url=sim.url, alpha=connection("prod", "alpha")),
        {
            "SERVE_LOGS_SEAL": generate_key(),
            "SERVE_LOGS_WEBHOOK": secret,
            "SERVE_LOGS_MAKINI": "test-prod-secret",
        },
    )
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        _, admin = create_key(journal, "prod", "ops", admin=True)
    finally:
        journal.close()
    log_trap.secrets.update({admin, secret})
    port = free_port()
    proc = cli.start("--log-format", "json", "serve", "--port", str(port))
    stderr = ""
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def started() -> bool:
                assert proc.poll() is None, proc.communicate()
                try:
                    return (await http.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await until("rotator serve to start", started)

            body = deep()
            signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            hook = await http.post(
                "/v1/webhooks/makini/prod",
                content=body,
                headers={"content-type": "application/json", "X-Webhook-Signature": signature},
            )
            assert hook.status_code == 422, hook.text
            assert hook.json()["error"]["code"] == "invalid_request"
            url = "/v1/admin/rotate/prod/alpha"
            json_type = {"content-type": "application/json"}
            r = await http.post(url, content=body, headers={**json_type, **bearer(admin)})
            assert r.status_code == 422 and "nested deeper" in r.json()["error"]["message"]
            r = await http.post(url, content=body, headers=json_type)
            assert r.status_code == 401  # no key: the key decides before the body is read
        answer = await asyncio.to_thread(garbage_request, port)
        assert answer.startswith(b"HTTP/1.1 400")
    finally:
        proc.terminate()
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
        log_trap.add(stderr)
    # SIGTERM drains and exits 0 (uvicorn no longer re-raises the signal it caught)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert admin not in stderr and secret not in stderr
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line structlog did not write: {line[:100]!r}") from None
    [warning] = [r for r in records if r.get("logger") == "uvicorn.error"]
    assert warning["level"] == "warning" and warning["event"] == "Invalid HTTP request received."
    assert any(r.get("event") == "serve.started" for r in records)
