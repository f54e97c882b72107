"""``rotator revoke``: the emergency revoke command, its plan, its questions and its report."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated

import typer

from rotator.cli import render
from rotator.cli.context import JsonOpt, actor, command_config, run_command, with_runtime
from rotator.cli.preflight import require_secrets
from rotator.cli.render import console, err, escape
from rotator.errors import ConfigError
from rotator.scrub import mask

if TYPE_CHECKING:
    from rotator.revoke import CredentialPlan, CredentialReport, RevokeRequest
    from rotator.rotation.runtime import Runtime

EXIT_REFUSED = 2
EXIT_INCOMPLETE = 1


def revoke_command(
    environment: Annotated[
        str,
        typer.Argument(
            metavar="ENV", help="The environment (one per command).", show_default=False
        ),
    ],
    names: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="NAME", help="Credential name(s); or --all.", show_default=False
        ),
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Every credential of the environment.")
    ] = False,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            help="current (default), previous, or a version id.",
            show_default=False,
        ),
    ] = None,
    no_replace: Annotated[
        bool,
        typer.Option(
            "--no-replace",
            help="Do not get a replacement (a token the kill itself produces is still stored).",
        ),
    ] = False,
    reason: Annotated[
        str | None,
        typer.Option(
            "--reason", metavar="TEXT", help="Why (required; audit log).", show_default=False
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish revokes that stopped halfway.")
    ] = False,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            metavar="STRATEGY",
            help="Override revoke_strategy: issue, refresh, disconnect or auto.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """EMERGENCY: make a compromised token invalid at Makini, replace it everywhere with no
    grace period, purge it from every backend, and confirm Makini rejects it.

    Pre-empts any rotation in flight. Prints the plan and asks first (--all: type the
    environment's name); --dry-run changes nothing. Exits 1 if anything could not be done or
    confirmed, naming what to do next."""
    from rotator.revoke import STRATEGIES, RevokeRequest

    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"unknown --strategy {strategy!r}", hint=f"use {', '.join(STRATEGIES)}")
    req = RevokeRequest(
        environment=environment,
        names=tuple(names or ()),
        all=all_,
        version=version,
        replace=not no_replace,
        reason=(reason or "").strip(),
        actor=actor(),
        strategy=strategy,
        resume=resume,
    )
    req.validate()
    cfg = command_config()
    env = cfg.environment(environment)
    for n in req.names:
        env.credential(n, environment)
    require_secrets(cfg, [environment], what=f"revoke in {environment}")

    async def work(runtime: Runtime) -> tuple[list[CredentialPlan], list[CredentialReport] | None]:
        from rotator.revoke import Revoker

        revoker = Revoker(runtime.engine)
        request = await full_version(runtime, req)
        plans = await revoker.plan(request)
        if not dry_run:
            show_plan(plans, req, json_out=json_out, quiet=json_out)
            if not resume:
                confirm(req, plans, yes=yes)
        if dry_run or not any(p.action != "skip" for p in plans):
            return plans, None
        with progress(len(plans), quiet=json_out) as tick:
            return plans, await revoker.run(request, plans, tick)

    plans, reports = run_command(with_runtime(cfg, work, [environment]))
    if reports is None:
        if json_out:
            render.print_json(
                {
                    "environment": environment,
                    "dry_run": dry_run,
                    "plan": [p.as_dict() for p in plans],
                }
            )
        elif dry_run:
            show_plan(plans, req, json_out=False, quiet=False)
            console.print("[dim]dry run: nothing was changed[/]")
        else:
            console.print("nothing to revoke")
        return
    if json_out:
        render.print_json(
            {
                "environment": environment,
                "dry_run": False,
                "plan": [p.as_dict() for p in plans],
                "results": [r.as_dict() for r in reports],
                "ok": all(r.ok for r in reports),
            }
        )
    else:
        show_report(reports)
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_INCOMPLETE)


async def full_version(runtime: Runtime, req: RevokeRequest) -> RevokeRequest:
    """``req`` with ``--version`` as the full id of the version it names: the tables show a
    version by the end of its id (``render.short_versions``), which is accepted here."""
    given = req.version
    if given is None or given in ("current", "previous"):
        return req
    import asyncio
    import dataclasses

    from rotator.errors import BackendError

    backends = runtime.environments[req.environment].backends

    def known() -> set[str]:
        ids: set[str] = set()
        for name in req.names:
            for backend in backends:
                try:
                    ids.update(v.version_id for v in backend.versions(name))
                except BackendError:
                    continue  # the revoke itself says what it cannot read
        return ids

    try:
        full = render.expand_version(given, await asyncio.to_thread(known))
    except ValueError as exc:
        raise ConfigError(
            f"--version {given!r} names more than one version: {exc}",
            where=f"rotator revoke {req.environment}",
            hint="give more of the id (the full id is in `rotator status --json`)",
        ) from None
    return dataclasses.replace(req, version=full) if full else req


# --- asking ------------------------------------------------------------------------------------


def confirm(req: RevokeRequest, plans: Sequence[CredentialPlan], *, yes: bool) -> None:
    """Ask before revoking: y/N, or typing the environment's name for --all. Without a
    terminal, refuse unless --yes was given."""
    if yes or not any(p.action == "revoke" for p in plans):
        return
    if not interactive():
        err.print(
            "[bold red]refusing to revoke without confirmation:[/] stdin is not a terminal. "
            "Check the plan (--dry-run), then run again with --yes."
        )
        raise typer.Exit(EXIT_REFUSED)
    count = sum(p.action == "revoke" for p in plans)
    if req.all:
        typed = typer.prompt(
            f"This revokes {count} credential(s) of environment {req.environment!r}. "
            "Type the environment's name to go on",
            err=True,  # stdout is the report (--json): questions go to the terminal's stderr
        )
        if typed.strip() != req.environment:
            err.print("[red]the name does not match: nothing was changed[/]")
            raise typer.Exit(EXIT_REFUSED)
        return
    if not typer.confirm(f"Revoke {count} credential(s) in {req.environment!r} now?", err=True):
        err.print("nothing was changed")
        raise typer.Exit(EXIT_REFUSED)


def interactive() -> bool:
    return sys.stdin.isatty()


def progress(total: int, *, quiet: bool) -> AbstractContextManager[Callable[[object], None] | None]:
    """A progress bar on stderr for several credentials, when a person is watching."""
    return render.progress(quiet or total < 2, label="revoking", total=total)


# --- showing -----------------------------------------------------------------------------------


def show_plan(
    plans: Sequence[CredentialPlan], req: RevokeRequest, *, json_out: bool, quiet: bool
) -> None:
    if quiet:
        return
    title = f"EMERGENCY REVOKE plan: {req.environment}" + (" (resume)" if req.resume else "")
    short = render.short_versions(v for p in plans for v in (p.target_version, *p.purge))
    rows = []
    for p in plans:
        action = {"revoke": "[bold red]revoke[/]", "resume": "[yellow]resume[/]"}.get(
            p.action, "[dim]skip[/]"
        )
        target = (
            f"{short(p.target_version)}\n({escape(p.target_stage or '-')})"
            if p.target_version
            else "-"
        )
        kill = p.method + (" → disconnect" if p.escalate else "") if p.action == "revoke" else ""
        rows.append(
            [
                escape(p.credential),
                action,
                target,
                escape(kill),
                escape(p.replacement or p.why),
                escape(p.preempts or "-"),
                "\n".join(short(v) for v in p.purge) or "-",
            ]
        )
    columns = [
        render.Column("credential", whole=True),
        render.Column("action", whole=True),
        render.Column("target", whole=True),
        render.Column("kill"),
        render.Column("replacement"),
        render.Column("pre-empts", drop=1),
        render.Column("purge", whole=True),
    ]
    console.print(render.table(title, columns, rows, title_style="bold red"))
    console.print(f"backends: {', '.join(plans[0].backends) if plans else '-'}")
    if req.reason:
        # masked as in the logs: an operator may have pasted the leaked token into it
        console.print(f"reason: {escape(mask(req.reason))}    actor: {escape(req.actor)}")
    for p in plans:
        for note in p.notes:
            console.print(f"  {p.credential}: {escape(note)}", style="dim")
        for warning in p.warnings:
            err.print(f"[bold red]WARNING[/] {p.credential}: {escape(warning)}")
    disconnects = [p for p in plans if p.may_disconnect]
    if disconnects:
        err.print(
            f"[bold red]{len(disconnects)} connection(s) may be DISCONNECTED at Makini: each "
            "customer must then reconnect before the credential works again[/]"
        )


_OUTCOME_STYLE = {
    "revoked": "bold green",
    "skipped": "dim",
    "unconfirmed": "bold red",
    "incomplete": "bold red",
    "busy": "yellow",
    "failed": "bold red",
}


def _yes_no(value: bool | None, yes: str = "yes", no: str = "NO") -> str:
    if value is None:
        return "[yellow]unknown[/]"
    return f"[green]{yes}[/]" if value else f"[bold red]{no}[/]"


def show_report(reports: Sequence[CredentialReport]) -> None:
    short = render.short_versions(
        v for r in reports for v in (r.old_version, r.replacement_version)
    )
    rows = []
    for r in reports:
        t = r.timings
        style = _OUTCOME_STYLE.get(r.outcome, "")
        rows.append(
            [
                escape(r.credential),
                f"[{style}]{r.outcome}[/]" if style else r.outcome,
                short(r.old_version),
                r.old_fingerprint or "-",
                _yes_no(r.old_dead) if r.outcome != "skipped" else "-",
                short(r.replacement_version) + ("\n(adopted)" if r.adopted_from else ""),
                *(
                    f"{t[k]:.2f}s" if k in t else "-"
                    for k in ("kill_s", "replace_s", "purge_s", "confirm_s", "total_s")
                ),
            ]
        )
    columns = [
        render.Column("credential", whole=True),
        render.Column("outcome", whole=True),
        render.Column("old", whole=True),
        render.Column("old token", whole=True, drop=6),
        render.Column("dead at Makini"),
        render.Column("replacement", whole=True),
        render.Column("kill", whole=True, drop=5),
        render.Column("replace", whole=True, drop=4),
        render.Column("purge", whole=True, drop=3),
        render.Column("confirm", whole=True, drop=2),
        render.Column("total", whole=True, drop=1),
    ]
    console.print(render.table("emergency revoke: report", columns, rows))
    many = len(reports) > 20
    for r in reports:
        if r.backends and not (many and r.ok):
            cells = [
                [
                    escape(name),
                    _yes_no(b.ok),
                    escape("; ".join(b.actions) or "-"),
                    escape("; ".join(b.errors)),
                    f"{b.duration_s:.2f}s",
                ]
                for name, b in r.backends.items()
            ]
            columns = [
                render.Column("backend", whole=True),
                render.Column("ok", whole=True),
                render.Column("done"),
                render.Column("error"),
                render.Column("time", whole=True, drop=1),
            ]
            title = f"{r.environment}/{r.credential}: backends"
            console.print(render.table(title, columns, cells))
        if r.disconnected:
            err.print(
                f"[bold red]DISCONNECTED[/] {r.environment}/{r.credential}: the connection was "
                "deleted at Makini; the customer must reconnect"
            )
        if r.error:
            err.print(f"[bold red]{r.outcome}[/] {r.environment}/{r.credential}: {escape(r.error)}")
        for step in r.next_steps:
            err.print(f"[bold]next[/] {r.environment}/{r.credential}: {escape(step)}")
    done = sum(r.outcome == "revoked" for r in reports)
    bad = [r for r in reports if not r.ok]
    summary = f"{done} revoked and confirmed dead at Makini"
    if bad:
        err.print(f"[bold red]{summary}; {len(bad)} NOT complete: see above[/]")
    else:
        console.print(f"[green]{summary}[/]")
