"""``rotator serve --tls-cert --tls-key``: the API over HTTPS (certificates from trustme)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path

import httpx
import trustme

from rotator.makini.sim import SimServer
from rotator.service import serve as run_service
from tests.api.conftest import api_environments
from tests.factories import make_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_speaks_https(tmp_path: Path, sim: SimServer, namespace: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    config = make_config(
        tmp_path, f"sqlite:///{tmp_path / 'journal.db'}", api_environments(sim.url, namespace)
    )
    port = free_port()
    task = asyncio.ensure_future(
        run_service(config, host="127.0.0.1", port=port, tls_cert=cert_file, tls_key=key_file)
    )
    verify = ssl.create_default_context(cafile=str(ca_file))
    try:
        async with httpx.AsyncClient(verify=verify) as https:
            for _ in range(200):
                try:
                    r = await https.get(f"https://127.0.0.1:{port}/healthz")
                    break
                except httpx.ConnectError:
                    assert not task.done(), task
                    await asyncio.sleep(0.02)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
        async with httpx.AsyncClient() as plain:
            try:
                refused = await plain.get(f"http://127.0.0.1:{port}/healthz")
                assert refused.status_code >= 400
            except httpx.HTTPError:
                pass  # a TLS server drops a plain HTTP request
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
