"""``rotator run-due``, ``rotator rotate`` and ``rotator verify``: driving rotations and
checking the current tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli import render
from rotator.cli.context import (
    EnvArg,
    JsonOpt,
    ReasonOpt,
    actor,
    command_config,
    open_journal,
    run_command,
    with_runtime,
)
from rotator.cli.guard import guarded
from rotator.cli.preflight import require_secrets
from rotator.rotation.work import RotationResult, Work

if TYPE_CHECKING:
    from rotator.rotation.runtime import Runtime
    from rotator.rotation.workers import Rotate
    from rotator.settings import Config


def run_due(
    env: Annotated[
        list[str] | None,
        typer.Option("--env", metavar="ENV", help="Only this environment (repeatable)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Rotate, resume and retire whatever is due now, then exit (non-zero if anything failed).
    Made for a Kubernetes CronJob with concurrencyPolicy Forbid. A large run forks workers to
    use more than one core (scheduler.processes)."""
    from rotator.pushing import RunDuePush
    from rotator.rotation import workers
    from rotator.service import flush_notifications, notifies

    cfg = command_config(service=True)
    for name in env or []:
        cfg.environment(name)
    push = RunDuePush.start(cfg, env)  # to metrics.pushgateway, however the run ends

    async def plan_or_rotate(rt: Runtime) -> tuple[list[Work], int, list[RotationResult]]:
        from rotator.service import Stopper, discover_all, due_work, rotate_work

        async with Stopper(rt, cfg.scheduler.drain.total_seconds()) as stopper:
            await discover_all(rt, env)  # enrolled connections are due: they have no token
            work = await due_work(rt, env)
            processes = workers.process_count(
                cfg.scheduler.processes, len(work), workers.smallest_limit(cfg)
            )
            if processes > 1 and stopper.signalled is None:
                return work, processes, []  # forked once this runtime is closed
            with render.progress(json_out, total=len(work)) as tick:
                return work, 1, await rotate_work(rt, work, tick, wait_busy=True)

    work, processes, results = run_command(with_runtime(cfg, push.watching(plan_or_rotate), env))
    if processes > 1:
        with (
            workers.Shares(cfg, work, processes, rotate_share(env)) as shares,
            render.progress(json_out, total=len(work)) as tick,
        ):
            results = shares.gather(tick)
    if cfg.journal.retention.enabled:  # the journal's history, for at most retention.budget
        from rotator.service import prune_journal

        with open_journal(cfg) as journal:
            prune_journal(cfg, journal, push.metrics)
    push.finished(results)
    if notifies(cfg):  # after the forked workers too: the journal has every result
        run_command(with_runtime(cfg, flush_notifications, env))
    render.results(results, json_out)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def rotate_share(env: list[str] | None) -> Rotate:
    """What a forked ``run-due`` worker runs: its share of the work, each result reported."""

    def rotate(
        cfg: Config, share: Sequence[Work], report: Callable[[RotationResult], None]
    ) -> None:
        from rotator.service import Stopper, rotate_work

        async def work(rt: Runtime) -> list[RotationResult]:
            async with Stopper(rt, cfg.scheduler.drain.total_seconds()):
                return await rotate_work(rt, share, report, wait_busy=True)

        guarded(lambda: run_command(with_runtime(cfg, work, env)))

    return rotate


def rotate(
    environment: EnvArg,
    name: Annotated[
        list[str], typer.Argument(metavar="NAME", help="Credential name(s).", show_default=False)
    ],
    reason: ReasonOpt = "manual",
    json_out: JsonOpt = False,
) -> None:
    """Rotate credentials now, whatever the schedule says."""
    from rotator.rotation.discovery import require_credential

    cfg = command_config()
    for n in name:  # configured, or enrolled by discovery and not off-boarded
        require_credential(cfg, environment, n, issuing=True)
    require_secrets(cfg, [environment], what=f"rotate in {environment}")

    async def work(rt: Runtime) -> list[RotationResult]:
        with render.progress(json_out or len(name) < 3, total=len(name)) as tick:
            return list(
                await rt.engine.rotate_many(
                    [Work(environment, n, reason, forced=True) for n in name],
                    actor=actor(),
                    progress=tick,
                )
            )

    results = run_command(with_runtime(cfg, work, [environment]))
    render.results(results, json_out)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def verify(
    environment: EnvArg,
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help="One credential (default: all).", show_default=False),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the current tokens with Makini (accepted, and for the right connection)."""
    import asyncio

    cfg = command_config()
    cfg.environment(environment)
    if name is not None:
        from rotator.rotation.discovery import require_credential

        # configured, or enrolled by discovery: an off-boarded one's connection is gone at
        # Makini, which can only reject its token
        require_credential(cfg, environment, name, issuing=True)
    require_secrets(cfg, [environment], what=f"verify in {environment}")

    async def work(rt: Runtime) -> list[tuple[str, bool, str]]:
        from rotator.rotation.queries import verify_current

        settings = rt.environments[environment].settings  # with the discovered credentials
        names = [name] if name else [
            c.name for c in settings.credentials if c.name not in settings.offboarded
        ]

        async def one(n: str) -> tuple[str, bool, str]:
            ok, detail = await verify_current(rt.engine, environment, n)
            return n, ok, detail

        return list(await asyncio.gather(*(one(n) for n in names)))

    rows = run_command(with_runtime(cfg, work, [environment]))
    render.verify(environment, rows, json_out)
    if not all(ok for _, ok, _ in rows):
        raise typer.Exit(1)
