"""pytest fixtures that start the real servers the backend tests use (listed in
``tests/conftest.py`` as ``pytest_plugins = ["tests.servers.plugin"]``).

Each server starts once per session, on first use, and only for sessions that need it; tests
keep apart through unique names (and ``reset()`` where a test changes server-wide settings).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.aws_server import MotoServer
from tests.servers.canned import CannedServer
from tests.servers.keyvault_emulator import KeyVaultEmulator
from tests.servers.openbao_server import OpenBaoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's Secrets Manager as an HTTP server on 127.0.0.1 (``.endpoint``)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy keys in the environment, read by boto3's standard chain; no profile, no IMDS."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoServer]:
    """A real OpenBao dev server (root token ``root``, KV v2 at ``secret/``)."""
    server = OpenBaoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def keyvault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyVaultEmulator]:
    emulator = KeyVaultEmulator(tmp_path_factory.mktemp("keyvault"))
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def keyvault(keyvault_server: KeyVaultEmulator) -> Iterator[KeyVaultEmulator]:
    """The Key Vault emulator, with default settings and an empty vault for this test."""
    keyvault_server.reset()
    yield keyvault_server
    keyvault_server.reset()


@pytest.fixture
def unique_prefix() -> str:
    """A short name part unique to this test, for prefixes and paths on shared servers."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    """An HTTP server giving every request the answer set with ``.respond(...)``."""
    server = CannedServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    from tests.servers.openbao_server import free_port

    return f"http://127.0.0.1:{free_port()}"
