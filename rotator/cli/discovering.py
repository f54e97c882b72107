"""``rotator discover``: list an environment's Makini connections, show what changes, apply it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli.context import EnvArg, JsonOpt, command_config, run_command, with_runtime

if TYPE_CHECKING:
    from rotator.rotation.discovery import Change
    from rotator.rotation.runtime import Runtime


def discover(
    environment: EnvArg,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show what would change; change nothing."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Enrol the Makini connections ENV's admin client lists ([environments.ENV.discover]):
    new ones get their first token at once; ones gone at Makini are off-boarded (no more
    rotations; unreadable after offboard_grace). Exits 1 if a first token failed."""
    from rotator.cli.preflight import require_secrets
    from rotator.rotation import discovery

    cfg = command_config()
    cfg.environment(environment)
    require_secrets(cfg, [environment], what=f"discover in {environment}")

    async def work(rt: Runtime) -> Change:
        return await discovery.discover(rt, environment, dry_run=dry_run)

    change = run_command(with_runtime(cfg, work, [environment]))
    if change.changed and not dry_run:
        from rotator.service import flush_notifications, notifies

        if notifies(cfg):  # an off-boarding (and its end) is notified at once
            run_command(with_runtime(cfg, flush_notifications, [environment]))
    show(change, json_out)
    if any(not r.ok for r in change.results):
        raise typer.Exit(1)


def show(change: Change, as_json: bool) -> None:
    from rotator.cli import render

    if as_json:
        render.print_json(change.as_dict())
        return
    if change.busy:
        render.console.print(
            f"another process is discovering {change.environment} right now: nothing done "
            "here; `rotator audit --action discovery` shows what it did"
        )
        return
    rows: list[list[str]] = []
    verb = "would " if change.dry_run else ""
    for what, items in (
        (f"{verb}enrol", change.new),
        (f"{verb}enrol again", change.returned),
        (f"{verb}off-board", change.gone),
        (f"{verb}make unreadable", change.purge),
    ):
        rows += [
            [what, render.escape(c.credential), render.escape(c.connection_id),
             render.escape(c.platform or "-"), render.escape(c.company or "-")]
            for c in items
        ]
    rows += [
        ["skipped", "-", render.escape(conn), "-", render.escape(why)]
        for conn, why in change.skipped
    ]
    columns = [
        render.Column("change", whole=True),
        render.Column("credential", whole=True),
        render.Column("connection", whole=True),
        render.Column("platform", drop=2),
        render.Column("company / why", drop=1),
    ]
    title = f"discover {change.environment}{' (dry run)' if change.dry_run else ''}"
    if rows:
        render.console.print(render.table(title, columns, rows))
    summary = (
        f"{change.listed} listed: {len(change.new)} new, {len(change.returned)} back, "
        f"{len(change.gone)} gone, {len(change.kept)} kept, {len(change.configured)} in the "
        f"configuration, {change.filtered} filtered out, {len(change.skipped)} skipped"
    )
    render.console.print(f"{title}: {summary}" if not rows else summary)
    if not change.complete:
        render.err.print(
            "[yellow]the listing may be incomplete (a page elsewhere, or fewer connections "
            "than Makini counts): nothing was off-boarded; run it again[/]"
        )
    failed = [r for r in change.results if not r.ok]
    if change.results:
        render.results(change.results, False)
    if failed:
        render.err.print(
            f"[red]{len(failed)} first token(s) failed[/]: `rotator status "
            f"{change.environment}` shows them; `rotator run-due` tries again"
        )
