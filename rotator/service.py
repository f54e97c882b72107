"""Long-running and one-shot modes: ``rotator serve`` and ``rotator run-due``.

Both ask :func:`rotator.schedule.plan` what is due and hand it to the engine; ``serve`` does so
on every scheduler tick (APScheduler, one job, never two ticks at once) while it serves the HTTP
API, and finishes the rotations in flight before it exits on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import UTC
from pathlib import Path

import structlog

from rotator.engine import RotationResult, Work
from rotator.errors import ConfigError
from rotator.model import utcnow
from rotator.runtime import Runtime
from rotator.schedule import ROTATE, plan
from rotator.settings import Config

log = structlog.get_logger("rotator.service")


async def run_due_once(
    runtime: Runtime,
    *,
    environments: list[str] | None = None,
    progress: Callable[[RotationResult], None] | None = None,
) -> list[RotationResult]:
    """Resume open rotations, retire what is past its grace period, rotate what is due."""
    return await rotate_work(runtime, await due_work(runtime, environments), progress)


async def due_work(runtime: Runtime, environments: list[str] | None = None) -> list[Work]:
    """What is due now: each credential to resume, retire or rotate."""
    from rotator.readers import end_grace_early

    # where configured, a grace period ends once every recent reader has the new version
    await asyncio.to_thread(end_grace_early, runtime.config, runtime.journal)
    return [
        (i.environment, i.credential, i.action == ROTATE, i.reason)
        for i in plan(runtime.config, runtime.journal, utcnow(), environments=environments)
        if i.is_due and i.environment in runtime.environments
    ]


async def rotate_work(
    runtime: Runtime,
    work: Sequence[Work],
    progress: Callable[[RotationResult], None] | None = None,
) -> list[RotationResult]:
    if not work:
        return []
    log.info("run_due.start", due=len(work))
    results = await runtime.engine.rotate_many(work, actor="scheduler", progress=progress)
    failed = [r for r in results if not r.ok]
    log.info("run_due.done", due=len(work), failed=len(failed))
    return results


async def serve(
    config: Config,
    *,
    host: str,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    import uvicorn
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from rotator.api import build_app

    runtime = Runtime.open(config)
    scheduler = AsyncIOScheduler(timezone=UTC)

    async def tick() -> None:
        try:
            await run_due_once(runtime)
        except Exception:  # a tick must never kill the scheduler; the journal keeps the work
            log.exception("tick.failed")

    scheduler.add_job(
        tick,
        IntervalTrigger(seconds=max(1.0, config.scheduler.tick.total_seconds())),
        id="run-due",
        next_run_time=utcnow(),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    app = build_app(runtime)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # uvicorn logs through rotator.logs (structlog, masked)
            access_log=False,
            lifespan="on",
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
        )
    )
    async def start_when_listening() -> None:
        # rotate only once the API listens: a port in use must stop serve before any work
        while not server.started and not server.should_exit:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.05)
        if server.started:
            scheduler.start()
            log.info(
                "serve.started",
                host=host,
                port=port,
                environments=list(runtime.environments),
                tick_s=config.scheduler.tick.total_seconds(),
            )

    starter = asyncio.create_task(start_when_listening())
    try:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: said below
            await server.serve()
    finally:
        log.info("serve.stopping")
        starter.cancel()
        if scheduler.running:
            scheduler.shutdown(wait=False)
        await _drain(runtime)
        await runtime.aclose()
        log.info("serve.stopped")
    if not server.started:
        raise ConfigError(
            f"cannot listen on {host}:{port}",
            where="rotator serve",
            hint="the port is in use or not allowed here: stop what holds it, or choose "
            "another with --port",
        )


async def _drain(runtime: Runtime) -> None:
    """Wait for rotations in flight (each holds its credential's lease) to finish a step."""
    import asyncio

    for _ in range(300):
        if runtime.engine.active == 0:
            return
        await asyncio.sleep(0.1)
