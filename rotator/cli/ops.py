"""``rotator sync`` and ``rotator doctor``: backends against the journal, and access probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli import render
from rotator.cli.context import (
    EnvArg,
    JsonOpt,
    OneEnvArg,
    actor,
    command_config,
    run_command,
    with_runtime,
)
from rotator.cli.render import escape

if TYPE_CHECKING:
    from rotator.rotation.repair import ProbeResult, SyncChange
    from rotator.rotation.runtime import Runtime


def sync(
    environment: EnvArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would change.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Repair backends that drifted from the journal: each backend of ENV is made to hold the
    journal's current version as current (copied from a backend that holds it). Deletes nothing."""
    cfg = command_config()
    cfg.environment(environment)

    async def work(rt: Runtime) -> list[SyncChange]:
        from rotator.rotation.repair import sync as run_sync

        return await run_sync(rt, environment, dry_run=dry_run, actor=actor())

    changes = run_command(with_runtime(cfg, work, [environment]))
    if json_out:
        render.print_json([c.as_dict() for c in changes])
    else:
        short = render.short_versions(v for c in changes for v in (c.version, c.held))
        rows = []
        for c in changes:
            style = {"in-sync": "green", "failed": "bold red", "busy": "yellow"}.get(c.action, "")
            rows.append(
                [
                    escape(c.credential),
                    escape(c.backend),
                    f"[{style}]{c.action}[/]" if style else c.action,
                    short(c.version),
                    short(c.held),
                    escape(c.detail),
                ]
            )
        columns = [
            render.Column("credential", whole=True),
            render.Column("backend", whole=True),
            render.Column("action", whole=True),
            render.Column("journal", whole=True),
            render.Column("held", whole=True),
            render.Column("detail"),
        ]
        title = f"sync {environment}" + (" (dry run: nothing changed)" if dry_run else "")
        render.console.print(render.table(title, columns, rows))
        if dry_run and any(c.action == "failed" for c in changes):
            failing = sum(c.action == "failed" for c in changes)
            render.err.print(
                f"[bold red]sync would fail for {failing} backend(s)[/]: the detail column says "
                "why; fix that first (a credential no backend holds needs a rotation)"
            )
    if any(c.action in ("failed", "busy") for c in changes):
        raise typer.Exit(1)


def doctor(
    environment: OneEnvArg = None,
    json_out: JsonOpt = False,
) -> None:
    """Check each backend online: reachable, and the identity in use may write, read, make
    unreadable and delete in its own environment's location (with a throwaway credential).
    Then Makini: the admin client gets a token, and each configured connection exists."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)

    async def work(rt: Runtime) -> list[ProbeResult]:
        from rotator.rotation.repair import probe

        results = await probe(rt, environment)
        for name in rt.environments:
            if environment is None or name == environment:
                results.append(await probe_makini(rt, name))
        return results

    results = run_command(with_runtime(cfg, work, [environment] if environment else None))
    if json_out:
        render.print_json([r.as_dict() for r in results])
    else:
        for r in results:
            mark = "[green]ok[/]" if r.ok else "[bold red]FAILED[/]"
            render.console.print(f"{mark} {r.environment}/{r.backend} at {escape(r.location)}")
            for step, outcome in r.steps.items():
                render.console.print(f"    {step}: {escape(outcome)}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


async def probe_makini(rt: Runtime, environment: str) -> ProbeResult:
    """One environment's Makini: its admin client gets a token, and every configured
    credential's connection is among those the client lists. Each failure is one step that
    says what is wrong and what to do; nothing is issued or changed at Makini."""
    from rotator.errors import RotatorError
    from rotator.rotation.repair import ProbeResult

    env_rt = rt.environments[environment]
    settings = env_rt.settings
    result = ProbeResult(environment, "makini", settings.makini.base_url, ok=True)

    def failed(step: str, exc: RotatorError) -> None:
        result.ok = False
        result.steps[step] = "FAILED: " + exc.message + (f"; next: {exc.hint}" if exc.hint else "")

    admin = f"admin token (client {settings.makini.client_id})"
    try:
        client = env_rt.makini
        await client.check_admin()
    except RotatorError as exc:
        failed(admin, exc)
        return result
    result.steps[admin] = "ok"
    try:
        known = await client.connection_ids()
    except RotatorError as exc:
        failed("list connections", exc)
        return result
    for index, cred in enumerate(settings.credentials):
        step = f"connection {cred.connection_id} ({cred.name})"
        if cred.connection_id in known:
            result.steps[step] = "exists"
        else:
            result.ok = False
            result.steps[step] = (
                f"FAILED: Makini has no connection {cred.connection_id} for client "
                f"{settings.makini.client_id}; next: check "
                f"environments.{environment}.credentials[{index}].connection_id against the "
                "Makini dashboard (a disconnected customer must reconnect)"
            )
    return result
