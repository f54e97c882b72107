"""Fixtures of the HTTP API tests: runtimes on two environments against the simulator, the API
served by uvicorn on a real socket (port 0), keys of every kind, and a log trap.

The log trap routes every log line of this package's tests (the rotator's structlog output, the
standard library loggers, uvicorn's access log) into one buffer. After each test, what it logged
is checked for every token the simulator issued and every key the tests created;
``test_zz_logs.py`` checks the whole buffer after a representative run of its own
(:func:`api_traffic`), so it holds in any test order.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import uvicorn

from rotator import logs
from rotator.api import build_app
from rotator.api.app import ApiApp
from rotator.keys import create_key
from rotator.makini.sim import SimServer
from rotator.rotation.runtime import Runtime
from tests.factories import Runtimes, environment, make_config

ENVS: dict[str, list[str]] = {"prod": ["alpha", "beta"], "dev": ["alpha", "gamma"]}
"""Two environments; ``alpha`` is a name in both (a dev key must still never read prod's)."""
WEBHOOK_SECRETS = {"prod": "whsec-prod-0123456789", "dev": "whsec-dev-0123456789"}
CLIENTS = {"prod": "test-prod", "dev": "test-dev"}


def connection(env: str, cred: str) -> str:
    return f"conn-{env}-{cred}"


# --- the log trap ------------------------------------------------------------------------------


class LogTrap:
    """Everything the product would log, in one buffer; secrets the tests saw, in one set."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.secrets: set[str] = set()
        self._lock = threading.Lock()

    def install(self) -> None:
        logs.configure("debug", "json")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=self.buffer))
        [handler] = logging.getLogger().handlers  # the one logs.configure installed
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(self.buffer)
        for name in UVICORN_LOGGERS:  # the simulator's uvicorn may have given them handlers
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = [], True

    def add(self, text: str) -> None:
        with self._lock:
            self.buffer.write(text)

    def text(self) -> str:
        return self.buffer.getvalue()

    def leaked(self, since: int = 0) -> list[str]:
        """The first characters of each secret found in what was logged from ``since`` on."""
        text = self.text()[since:]
        return [s[:12] for s in self.secrets if s in text]


_TRAP = LogTrap()
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(scope="package")
def log_trap() -> Iterator[LogTrap]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    uvicorn_loggers = [logging.getLogger(n) for n in UVICORN_LOGGERS]
    uvicorn_saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in uvicorn_loggers]
    _TRAP.install()
    yield _TRAP
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    for lg, (hs, propagate, lvl) in zip(uvicorn_loggers, uvicorn_saved, strict=True):
        lg.handlers, lg.propagate = hs, propagate
        lg.setLevel(lvl)


@pytest.fixture(autouse=True)
def _trap_logs(log_trap: LogTrap, sim_server: SimServer) -> Iterator[None]:
    log_trap.install()  # a CLI test may have reconfigured logging
    start = len(log_trap.text())
    yield
    log_trap.secrets.update(sim_server.state.tokens)  # every token value the simulator issued
    leaked = log_trap.leaked(since=start)
    assert leaked == [], f"secrets in this test's logs (first characters): {leaked}"


# --- runtimes and servers ------------------------------------------------------------------------


def api_environments(
    sim_url: str,
    namespace: str,
    *,
    makini: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    envs = {}
    for env, creds in ENVS.items():
        os.environ[f"TEST_WEBHOOK_{env.upper()}"] = WEBHOOK_SECRETS[env]
        table = environment(
            sim_url,
            CLIENTS[env],
            [{"name": c, "connection_id": connection(env, c)} for c in creds],
            sealing_env=f"API_SEAL_{env.upper()}",
            backends=[{"type": "memory", "namespace": namespace}],
            makini=makini,
            schedule=schedule,
        )
        table["webhook"] = {"secret_env": f"TEST_WEBHOOK_{env.upper()}"}
        envs[env] = table
    return envs


@dataclass
class Served:
    """One API process: its runtime, its app and where it listens."""

    runtime: Runtime
    app: ApiApp
    url: str
    server: uvicorn.Server
    task: asyncio.Task[None] | None = None
    thread: threading.Thread | None = None
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def rotate(self, env: str, cred: str) -> str:
        result = await self.runtime.engine.rotate(env, cred, reason="test", actor="tests")
        assert result.ok, result
        assert result.version_id is not None
        return result.version_id


def uvicorn_config(app: ApiApp) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_config=None,  # uvicorn's loggers propagate to the root logger: the log trap
        log_level="info",
        access_log=True,
        timeout_graceful_shutdown=1,
    )


async def start_server(runtime: Runtime) -> Served:
    """The API on the running loop (tests drive the engine on the same loop)."""
    app = build_app(runtime)
    server = uvicorn.Server(uvicorn_config(app))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Served(runtime, app, f"http://127.0.0.1:{port}", server, task=task)


def start_server_thread(runtime: Runtime) -> Served:
    """The API on a loop of its own (for blocking clients)."""
    app = build_app(runtime)
    server = uvicorn.Server(uvicorn_config(app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        threading.Event().wait(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Served(runtime, app, f"http://127.0.0.1:{port}", server, thread=thread)


async def stop_server(served: Served) -> None:
    await served.http.aclose()
    served.server.should_exit = True
    if served.task is not None:
        await served.task
    if served.thread is not None:
        await asyncio.to_thread(served.thread.join, 10)


Factory = Callable[..., Awaitable[Served]]


@pytest.fixture
def namespace() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def serve(
    tmp_path: Path, sim: SimServer, namespace: str, runtimes: Runtimes
) -> AsyncIterator[Factory]:
    """``await serve(journal_url=None, api={...}, ...)`` → a started API (stopped at the end).
    Several calls with the same journal URL are replicas sharing the journal and backends."""
    opened: list[Served] = []

    async def make(
        *,
        journal_url: str | None = None,
        api: dict[str, Any] | None = None,
        makini: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        threaded: bool = False,
    ) -> Served:
        url = journal_url or f"sqlite:///{tmp_path / 'journal.db'}"
        top = {"api": api} if api else {}
        config = make_config(
            tmp_path,
            url,
            api_environments(sim.url, namespace, makini=makini, schedule=schedule),
            **top,
        )
        runtime = runtimes.open(config)
        served = start_server_thread(runtime) if threaded else await start_server(runtime)
        opened.append(served)
        return served

    yield make
    for served in reversed(opened):
        await stop_server(served)


@dataclass
class Keys:
    """A key of every kind for every environment, plus credential-scoped reader keys."""

    reader: dict[str, str] = field(default_factory=dict)
    admin: dict[str, str] = field(default_factory=dict)
    scoped: dict[tuple[str, str], str] = field(default_factory=dict)

    def all(self) -> list[str]:
        return [*self.reader.values(), *self.admin.values(), *self.scoped.values()]


def make_keys(served: Served, trap: LogTrap) -> Keys:
    """Keys in the journal, and loaded into ``served`` at once (replicas poll for them)."""
    runtime = served.runtime
    keys = Keys()
    for env, creds in ENVS.items():
        keys.reader[env] = create_key(runtime.journal, env, f"reader-{env}")[1]
        keys.admin[env] = create_key(runtime.journal, env, f"admin-{env}", admin=True)[1]
        for cred in creds:
            keys.scoped[(env, cred)] = create_key(
                runtime.journal, env, f"only-{env}-{cred}", credentials=[cred]
            )[1]
    trap.secrets.update(keys.all())
    served.app.state.keys.load(runtime.journal)
    return keys


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> float:
    """Poll ``check`` until true; returns the seconds it took (fails after ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)
    return loop.time() - start


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api_traffic(serve: Factory, log_trap: LogTrap, sim: SimServer) -> None:
    """A representative run of the API, logged into the trap: keys of every kind, each
    credential rotated three times, and its token read (or refused) with each kind of key."""
    api = await serve()
    keys = make_keys(api, log_trap)
    for _ in range(3):
        for env, creds in ENVS.items():
            for cred in creds:
                await api.rotate(env, cred)
                for key in (keys.reader[env], keys.scoped[(env, cred)], keys.admin[env]):
                    await api.http.get(f"/v1/tokens/{env}/{cred}", headers=bearer(key))
    log_trap.secrets.update(sim.state.tokens)
