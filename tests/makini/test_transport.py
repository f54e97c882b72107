"""The Makini client's network layer (``rotator.makini.transport``): httpcore on plain asyncio.

Against real sockets: the simulator over HTTPS (a trustme CA given through SSL_CERT_FILE, as an
operator would), and a bare asyncio server that closes idle keep-alive connections.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
import uvicorn
import uvloop

from rotator.errors import MakiniTransient, MakiniUntrusted
from rotator.makini import MakiniClient
from rotator.makini.sim import SimOptions, SimServer
from rotator.makini.sim.app import SimApp
from rotator.makini.sim.state import SimState
from rotator.makini.transport import AsyncioBackend, http_transport
from tests.makini.conftest import PROD, PROD_SECRET, settings


def test_every_pool_of_the_client_runs_on_the_asyncio_backend() -> None:
    # httpx 0.28 takes no network backend: http_transport replaces the pool httpx built, and
    # this fails if a new httpx moves it
    client = MakiniClient(settings("http://127.0.0.1:9"), "s", environment="t")
    pools = [shard._transport._pool for shard in client._shards]  # type: ignore[attr-defined]
    assert len(pools) > 1
    assert all(isinstance(p._network_backend, AsyncioBackend) for p in pools)
    asyncio.run(client.aclose())


@pytest.fixture
def https_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    app = SimApp(SimState(SimOptions(clients={PROD: PROD_SECRET}))).build()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
            ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the simulator did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


async def test_issue_and_verify_over_https(https_sim: str) -> None:
    async with MakiniClient(settings(https_sim), PROD_SECRET, environment="t") as client:
        issued = await client.issue_token("c1")
        info = await client.verify(issued.tokens.access, "c1")
    assert info.connection_id == "c1"


async def test_an_untrusted_certificate_is_refused(
    https_sim: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    async with MakiniClient(settings(https_sim), PROD_SECRET, environment="t") as client:
        with pytest.raises(MakiniUntrusted) as caught:
            await client.issue_token("c1")
    assert not isinstance(caught.value, MakiniTransient)  # a retry meets the same certificate
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message
    assert caught.value.hint is not None and "SSL_CERT_FILE" in caught.value.hint


class _ClosingServer:
    """HTTP/1.1 on a bare socket: answers each request with keep-alive, then closes the
    connection shortly after, as a server's idle timeout does."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        writer.close()  # as a server's idle timeout does, once the answer is out
        await writer.wait_closed()
        self.closed.set()


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    handler = _ClosingServer()
    server = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = http_transport(verify=httpx.create_ssl_context(), limits=httpx.Limits())
    async with server, httpx.AsyncClient(transport=transport) as client:
        first = await client.get(f"http://127.0.0.1:{port}/a")
        await asyncio.wait_for(handler.closed.wait(), 10)  # the server closed the idle one
        second = await client.get(f"http://127.0.0.1:{port}/b")
    assert first.json() == second.json() == {"ok": True}
    assert handler.connections == 2


async def test_connect_errors_and_timeouts_are_httpx_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
    transport = http_transport(verify=httpx.create_ssl_context(), limits=httpx.Limits())
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = http_transport(verify=httpx.create_ssl_context(), limits=httpx.Limits())
    async with server, httpx.AsyncClient(transport=transport, timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"http://127.0.0.1:{port}/")


def test_issue_and_verify_on_uvloop(sim: SimServer) -> None:
    # `rotator serve` runs on uvloop (uvicorn[standard]), whose transports are not asyncio's
    async def issue_and_verify() -> str:
        async with MakiniClient(settings(sim.url), PROD_SECRET, environment="t") as client:
            issued = await client.issue_token("c1")
            return (await client.verify(issued.tokens.access, "c1")).connection_id

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(issue_and_verify()) == "c1"
