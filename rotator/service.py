"""Long-running and one-shot modes: ``rotator serve`` and ``rotator run-due``.

Both ask :func:`rotator.rotation.schedule.plan` what is due and hand it to the engine, which
decides again under each credential's lease; ``serve`` does so on every scheduler tick
(APScheduler, one job, never two ticks at once) while it serves the HTTP API. On SIGTERM or
Ctrl-C both drain (:class:`Stopper`): no new work, what is in flight finishes or parks within
``scheduler.drain``, every lease goes back at once, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from rotator import signals
from rotator.clock import SYSTEM, Clock
from rotator.errors import ConfigError, RotatorError
from rotator.notify.notifier import Notifier
from rotator.revoke import resume_held
from rotator.rotation.runtime import Runtime
from rotator.rotation.schedule import PlanItem, Planner, plan
from rotator.rotation.work import RotationResult, Work
from rotator.settings import Config

if TYPE_CHECKING:
    from rotator.journal import Journal
    from rotator.journal.retention import Pruned
    from rotator.metrics import Metrics
    from rotator.rotation.discovery import Change

log = structlog.get_logger("rotator.service")


async def run_due_once(
    runtime: Runtime,
    *,
    environments: list[str] | None = None,
    progress: Callable[[RotationResult], None] | None = None,
    clock: Clock = SYSTEM,
    planner: Planner | None = None,
) -> list[RotationResult]:
    """Resume open rotations, retire what is past its grace period, rotate what is due."""
    work = await due_work(runtime, environments, clock=clock, planner=planner)
    return await rotate_work(runtime, work, progress)


async def discover_all(
    runtime: Runtime, environments: Sequence[str] | None = None, *, first_tokens: bool = False
) -> list[Change]:
    """Run discovery for each served environment that has it enabled (``run-due`` at its
    start, ``serve`` at start and every ``discover.interval``). A failure (Makini down) is
    logged and leaves that environment's credentials as they were: it never stops the run.
    Without ``first_tokens`` the new credentials' first tokens come from the work that
    follows (they are due: they have none)."""
    from rotator.rotation import discovery

    changes = []
    for env in discovery.enabled(runtime):
        if environments and env not in environments:
            continue
        try:
            changes.append(await discovery.discover(runtime, env, first_tokens=first_tokens))
        except RotatorError as exc:
            log.warning("discovery.failed", environment=env, error=exc.message)
    return changes


async def due_work(
    runtime: Runtime,
    environments: list[str] | None = None,
    *,
    clock: Clock = SYSTEM,
    planner: Planner | None = None,
) -> list[Work]:
    """What is due at ``clock.now()``: each credential to resume, retire or rotate. With a
    ``planner`` (``serve``'s ticks), a tick whose plan cannot have changed costs one raw read
    of the plan's inputs instead of a plan of every credential."""
    from rotator.readers import end_grace_early

    # where configured, a grace period ends once every recent reader has the new version
    await asyncio.to_thread(end_grace_early, runtime.config, runtime.journal)
    # on a worker thread: at 10,000 credentials a plan takes most of a second of CPU, which
    # would stall every API request of `serve` meanwhile (its first tick comes as it starts)
    ask: Callable[..., list[PlanItem]] = plan
    if planner is not None:
        ask = planner.due
        # the served environments alone: another's due work must not make every tick plan
        environments = environments or list(runtime.environments)
    items = await asyncio.to_thread(
        ask, runtime.config, runtime.journal, clock.now(), environments=environments
    )
    return [
        Work(i.environment, i.credential, i.reason)
        for i in items
        if i.is_due and i.environment in runtime.environments
    ]


async def rotate_work(
    runtime: Runtime,
    work: Sequence[Work],
    progress: Callable[[RotationResult], None] | None = None,
    *,
    wait_busy: bool = False,
) -> list[RotationResult]:
    """Drive ``work``. ``wait_busy`` (``run-due``): a credential found busy is driven again
    once its lease is given back or expires (at most ``journal.lock_ttl``), so that a run right
    after a crash (a Job's retry pod) resumes the crashed run's rotations instead of leaving
    them to the next scheduled run; one a live holder keeps renewing stays busy."""
    if not work:
        return []
    log.info("run_due.start", due=len(work))
    engine = runtime.engine
    first = progress
    if wait_busy and progress is not None:
        first = lambda r: None if r.outcome == "busy" else progress(r)  # noqa: E731
    results = await engine.rotate_many(work, actor="scheduler", progress=first)
    busy = [i for i, r in enumerate(results) if r.outcome == "busy"]
    if wait_busy and busy and not engine.stopping:
        freed = await _until_free(runtime, [work[i] for i in busy])
        retry = [work[i] for i in busy if work[i] in freed]
        again = iter(await engine.rotate_many(retry, actor="scheduler", progress=progress))
        for i in busy:
            if work[i] in freed:
                results[i] = next(again)
            elif progress is not None:
                progress(results[i])
    failed = [r for r in results if not r.ok]
    log.info("run_due.done", due=len(work), failed=len(failed))
    return results


async def _until_free(runtime: Runtime, work: Sequence[Work]) -> set[Work]:
    """Wait until each credential's lease is given back or has expired, for at most a little
    over ``journal.lock_ttl``: the work whose lease is free by then."""
    journal = runtime.journal
    loop = asyncio.get_running_loop()
    deadline = loop.time() + journal.lock_ttl.total_seconds() * 1.1 + 0.5
    waiting = set(work)
    free: set[Work] = set()
    log.info("run_due.waiting_for_leases", credentials=len(waiting))
    while waiting and loop.time() < deadline and not runtime.engine.stopping:
        for w in list(waiting):
            holder = await asyncio.to_thread(
                journal.lock_holder, f"{w.environment}/{w.credential}"
            )
            if holder is None:
                waiting.discard(w)
                free.add(w)
        if waiting:
            await asyncio.sleep(0.25)
    return free


def notifies(config: Config) -> bool:
    """Whether any environment has notification sinks."""
    return any(env.notify.sinks for env in config.environments.values())


async def flush_notifications(runtime: Runtime, timeout_s: float = 15.0) -> None:
    """``run-due``'s end: evaluate the states someone must act on and deliver what is queued,
    for at most ``timeout_s``; what is left stays in the journal for the next run or ``serve``.
    A failure here is logged and does not change the run's outcome."""
    notifier = Notifier(runtime)
    try:
        await notifier.flush(timeout_s)
    except RotatorError as exc:
        log.warning("notify.flush_failed", error=exc.message)
    except Exception as exc:  # noqa: BLE001 - notifying must not turn a run into a traceback
        log.warning("notify.flush_failed", error=type(exc).__name__)
    finally:
        await notifier.aclose()


def prune_journal(
    config: Config,
    journal: Journal,
    metrics: Metrics | None,
    stopping: Callable[[], bool] = lambda: False,
) -> Pruned | None:
    """One retention pass (``serve`` every ``journal.retention.interval``, ``run-due`` at its
    end) for at most ``journal.retention.budget``, or until ``stopping()`` (a drain); what is
    left waits for the next pass. None when another process prunes now or the journal failed
    (logged: never stops the caller)."""
    from rotator.journal import retention

    keep = config.journal.retention
    if not keep.enabled:
        return None
    try:
        result = retention.prune(
            journal,
            keep,
            active_window=config.api.readers.active_window,
            owner=retention.owner(),
            actor="scheduler",
            budget_s=keep.budget.total_seconds(),
            on_batch=metrics.pruned if metrics is not None else None,
            stopping=stopping,
        )
    except retention.Busy as busy:
        log.info("journal.prune_busy", holder=busy.holder)
        return None
    except RotatorError as exc:
        log.warning("journal.prune_failed", error=exc.message)
        return None
    if result.total or not result.complete:
        log.info(
            "journal.pruned",
            **result.counts,
            complete=result.complete,
            seconds=round(result.seconds, 3),
            longest_batch_s=round(result.longest_batch_s, 4),
        )
    return result


class Stopper:
    """SIGTERM and SIGINT, handled as every rollout and every Ctrl-C needs: the first one stops
    new work (``engine.stop``; ``on_stop`` for the mode's own part) and starts the drain (drives
    in flight get ``drain_s`` to finish, then park at their last journaled step; every lease
    goes back at once); a second one cuts the drain short. Used as an async context manager on
    the running loop (main thread only); the drain is awaited on the way out."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self, runtime: Runtime, drain_s: float, on_stop: Callable[[], None] | None = None
    ) -> None:
        self.runtime = runtime
        self.drain_s = drain_s
        self.on_stop = on_stop
        self.signalled: int | None = None
        self._drain: asyncio.Task[int] | None = None
        self._installed: list[int] = []

    async def __aenter__(self) -> Stopper:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
            held = signals.take()  # a signal that came before these handlers: drain at once
            if held is not None:
                self._on_signal(held)
        return self

    def _on_signal(self, sig: int) -> None:
        if self.signalled is not None:  # the second signal: no more waiting
            log.warning("stopping.now", signal=signal.Signals(sig).name)
            self.drain_s = 0
            self.runtime.engine.stop()
            for task in self.runtime.engine.driving:
                task.cancel()
            return
        self.signalled = sig
        if self.on_stop is not None:
            self.on_stop()
        self._start_drain()  # before anything that could fail, such as a log line
        log.info(
            "stopping",
            signal=signal.Signals(sig).name,
            drain_s=self.drain_s,
            in_flight=self.runtime.engine.active,
        )

    def _start_drain(self) -> asyncio.Task[int]:
        if self._drain is None:
            self.runtime.engine.stop()
            self._drain = asyncio.get_running_loop().create_task(self._drained())
        return self._drain

    async def drain(self) -> int:
        """Drain now, or wait for the drain a signal started (also without a signal: the end
        of ``serve``). Returns how many drives the deadline cancelled."""
        return await self._start_drain()

    async def _drained(self) -> int:
        cancelled = await self.runtime.engine.drain(self.drain_s)
        if cancelled:
            log.warning(
                "stopping.parked",
                drives=cancelled,
                detail="the drain timed out: these stopped mid-step and resume from their "
                "last journaled step",
            )
        return cancelled

    async def __aexit__(self, *exc: object) -> None:
        if self._drain is not None:
            await self._drain  # a second signal still cuts it short meanwhile
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed = []


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: it would re-raise SIGTERM once it stops serving and
    kill the process before the drain. :class:`Stopper` handles the signals instead.
    ``on_started`` runs once it listens."""

    on_started: Callable[[], None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


async def serve(
    config: Config,
    *,
    host: str,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    clock: Clock = SYSTEM,
) -> None:
    """Serve the HTTP API and, once it listens, run the scheduler: a tick every
    ``scheduler.tick`` (the first at once) rotates what is due at ``clock.now()``."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    from rotator.api import build_app

    runtime = Runtime.open(config, resume_revoke=resume_held)
    notifier = Notifier(runtime)
    notifier.listen()
    notifying: list[asyncio.Task[None]] = []
    scheduler = AsyncIOScheduler(timezone=UTC)
    ticking: set[asyncio.Task[None]] = set()
    planner = Planner()  # plans again only when something the plan reads changed, or in time

    async def tick() -> None:
        task = asyncio.current_task()
        assert task is not None
        ticking.add(task)
        try:
            results = await run_due_once(runtime, clock=clock, planner=planner)
            app.state.metrics.run_due_done(runtime.environments, results, time.time())
        except Exception:  # a tick must never kill the scheduler; the journal keeps the work
            log.exception("tick.failed")
        finally:
            ticking.discard(task)

    scheduler.add_job(
        tick,
        IntervalTrigger(seconds=max(1.0, config.scheduler.tick.total_seconds())),
        id="run-due",
        next_run_time=clock.now(),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    app = build_app(runtime)
    _schedule_discovery(scheduler, runtime, clock)
    _schedule_pruning(scheduler, runtime, app.state.metrics, clock)
    drain_s = config.scheduler.drain.total_seconds()
    server = _Server(
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
            timeout_graceful_shutdown=max(1, int(drain_s)),
        )
    )

    def stop_serving() -> None:
        if scheduler.running:
            scheduler.pause()  # no new tick; the one running parks its drives
        server.should_exit = True  # uvicorn stops accepting, finishes the requests in flight
        app.status.close()  # status pages' event streams end now, not after the drain

    def start_rotating() -> None:
        # rotate only once the API listens: a port in use must stop serve before any work
        if not server.should_exit:
            scheduler.start()
            notifying.append(asyncio.ensure_future(notifier.run()))
        log.info(
            "serve.started",
            host=host,
            port=port,
            environments=list(runtime.environments),
            tick_s=config.scheduler.tick.total_seconds(),
            rotating=scheduler.running,
        )

    server.on_started = start_rotating
    async with Stopper(runtime, drain_s, stop_serving) as stopper:
        try:
            with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: below
                await server.serve()
            log.info("serve.stopping", signal=_signal_name(stopper.signalled))
            stop_serving()
        finally:
            await stopper.drain()  # also without a signal (uvicorn stopped by itself)
            if ticking:
                await asyncio.wait(ticking, timeout=5)
            if scheduler.running:
                scheduler.shutdown(wait=False)
            for task in notifying:  # what is queued stays in the journal for the next start
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            notifier.unlisten()
            await notifier.aclose()
            await runtime.aclose()
            log.info("serve.stopped")
    if not server.started:
        raise ConfigError(
            f"cannot listen on {host}:{port}",
            where="rotator serve",
            hint="the port is in use or not allowed here: stop what holds it, or choose "
            "another with --port",
        )


def _schedule_discovery(scheduler: Any, runtime: Runtime, clock: Clock) -> None:
    """One job per environment with discovery enabled: at start, then every
    ``discover.interval``; its new credentials get their first tokens at once."""
    from apscheduler.triggers.interval import IntervalTrigger

    from rotator.rotation import discovery

    for env in discovery.enabled(runtime):
        every = runtime.environments[env].settings.discover.interval.total_seconds()

        async def run(env: str = env) -> None:
            try:
                await discover_all(runtime, [env], first_tokens=True)
            except Exception:  # a run must never kill the scheduler
                log.exception("discovery.failed", environment=env)

        scheduler.add_job(
            run,
            IntervalTrigger(seconds=every),
            id=f"discover-{env}",
            next_run_time=clock.now(),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )


def _schedule_pruning(scheduler: Any, runtime: Runtime, metrics: Metrics, clock: Clock) -> None:
    """The journal's retention: a pass every ``journal.retention.interval`` (the first a minute
    after start, or sooner with a shorter interval), by one replica at a time."""
    from apscheduler.triggers.interval import IntervalTrigger

    keep = runtime.config.journal.retention
    if not keep.enabled:
        return
    every = keep.interval.total_seconds()

    async def run() -> None:
        try:
            stopping = lambda: runtime.engine.stopping  # noqa: E731 - a drain ends the pass
            await asyncio.to_thread(
                prune_journal, runtime.config, runtime.journal, metrics, stopping
            )
        except Exception:  # a pass must never kill the scheduler
            log.exception("journal.prune_failed")

    scheduler.add_job(
        run,
        IntervalTrigger(seconds=every),
        id="prune-journal",
        next_run_time=clock.now() + timedelta(seconds=min(every, 60.0)),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )


def _signal_name(sig: int | None) -> str | None:
    return signal.Signals(sig).name if sig is not None else None
