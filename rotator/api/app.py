"""The app factory: the lean token router in front of a FastAPI app, and the background work
(replica feed, read-record flushes, webhook worker) tied to the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from fastapi import FastAPI

from rotator.aio import woken
from rotator.api import admin, docs, errors, ops, status, status_board, swagger, webhooks
from rotator.api.feed import ReplicaFeed
from rotator.api.gate import KeyGate
from rotator.api.limits import BodyLimit
from rotator.api.state import ApiState
from rotator.api.tokens import PREFIX, TokenRoutes
from rotator.observe import Observer
from rotator.readers import write_batch
from rotator.webhooks.queue import WebhookWorker

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from rotator.rotation.runtime import Runtime

log = structlog.get_logger("rotator.api")

DESCRIPTION = """Serves Makini connection tokens to other services, receives Makini webhooks,
and exposes admin actions, health and metrics.

Authenticate with `Authorization: Bearer <key>` (keys from `rotator keys create`). A reader key
reads tokens of one environment (optionally some credentials of it); an admin key calls the
admin endpoints of one environment and reads no tokens. Every error answers
`{"error": {"code", "message", "request_id"}}`.
"""
ADMIN_BODY_LIMIT = 16 * 1024


class ApiApp(TokenRoutes):
    """The ASGI app ``rotator serve`` runs. ``state`` is shared with tests and benchmarks."""

    feed: ReplicaFeed
    worker: WebhookWorker
    status: status_board.StatusBoard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every HTTP request, timed into ``rotator_http_request_duration_seconds``."""
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        started = time.perf_counter()
        status = 500  # a request that raised before it answered

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await super().__call__(scope, receive, sending)
        finally:
            self.state.metrics.http_request(
                scope["method"], _route(scope), status, time.perf_counter() - started
            )

    async def flush_reads(self) -> int:
        """Write the reads recorded in memory to the journal now; returns how many rows."""
        state = self.state
        batch = state.reads.take()
        if not batch:
            return 0
        try:
            await asyncio.to_thread(write_batch, state.runtime.journal, batch)
        except Exception:
            state.reads.put_back(batch)
            raise
        return len(batch)


def _route(scope: Scope) -> str:
    """The route's template as a metric label (bounded: never the raw path)."""
    path: str = scope["path"]
    if path.startswith(PREFIX):  # the lean token router has no route object
        return PREFIX + ("{env}/{name}" if "/" in path[len(PREFIX) :] else "{env}")
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "unmatched"


async def _every(
    interval_s: float, wake: asyncio.Event | None, work: Callable[[], Awaitable[object]], what: str
) -> None:
    while True:
        if wake is None:
            await asyncio.sleep(interval_s)
        else:
            await woken(wake, interval_s)
            wake.clear()
        try:
            await work()
        except Exception as exc:  # noqa: BLE001 - the journal may come back; try again next time
            log.warning(f"{what}.failed", error=type(exc).__name__)


def build_app(runtime: Runtime) -> ApiApp:
    state = ApiState.build(runtime)
    runtime.credentials_changed.append(  # discovery changed an environment's credentials
        lambda env: state.credentials.__setitem__(
            env, frozenset(c.name for c in runtime.environments[env].settings.credentials)
        )
    )
    state.metrics.probes = Observer.of(runtime).probes()
    settings = state.settings
    feed = ReplicaFeed(
        runtime.journal, state.cache, state.keys, poll_s=settings.replica_poll.total_seconds()
    )
    worker = WebhookWorker(
        runtime.config,
        runtime.journal,
        runtime.engine,
        on_event=lambda env, outcome: state.metrics.webhook_events.labels(
            state.env_label(env), outcome
        ).inc(),
        runtime=runtime,  # webhooks about connections run discovery
    )

    board = status_board.StatusBoard(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.cache.bind(asyncio.get_running_loop())
        board.start()
        await asyncio.to_thread(feed.start)
        engine = runtime.engine
        engine.events.promoted.subscribe(state.cache.on_promoted)
        engine.events.revoked.subscribe(state.cache.on_revoked)
        engine.events.result.subscribe(state.metrics.rotation)
        engine.events.revoked.subscribe(state.metrics.revoked_version)
        for rt in runtime.environments.values():
            if rt.makini_client is not None:
                rt.makini_client.on_call = state.metrics.makini_call

        async def drain_webhooks() -> None:
            while await worker.run_once():
                pass

        tasks = [
            asyncio.ensure_future(feed.run()),
            # token bodies after start, not before ready (reads load what is not warm yet)
            asyncio.ensure_future(state.cache.warm(feed.versions(), state.credentials)),
            asyncio.ensure_future(
                _every(
                    settings.readers.flush_interval.total_seconds(),
                    None,
                    app.flush_reads,
                    "reads.flush",
                )
            ),
            asyncio.ensure_future(
                _every(
                    settings.webhook_poll.total_seconds(),
                    state.webhook_wake,
                    drain_webhooks,
                    "webhooks.worker",
                )
            ),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            engine.events.promoted.unsubscribe(state.cache.on_promoted)
            engine.events.revoked.unsubscribe(state.cache.on_revoked)
            engine.events.result.unsubscribe(state.metrics.rotation)
            await board.stop()
            engine.events.revoked.unsubscribe(state.metrics.revoked_version)
            with contextlib.suppress(Exception):
                await app.flush_reads()

    fastapi = FastAPI(
        title="Makini token rotator",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    errors.install(fastapi)
    swagger.install(fastapi)
    webhook_limit = max(
        (rt.settings.webhook.max_body_bytes for rt in runtime.environments.values()),
        default=ADMIN_BODY_LIMIT,
    )
    # token reads (the lean router), then the key (routes that need one), then the body limit
    gate = KeyGate(
        BodyLimit(
            fastapi,
            lambda path: webhook_limit if path.startswith("/v1/webhooks/") else ADMIN_BODY_LIMIT,
        )
    )
    app = ApiApp(state, gate)
    long_poll_max_s = int(settings.long_poll_max.total_seconds())
    for router in (
        docs.router(app, long_poll_max_s),
        admin.router(state),
        webhooks.router(state),
        ops.router(state),
        status.router(board),
    ):
        gate.include(fastapi, router)
    app.feed, app.worker, app.status = feed, worker, board
    return app
