"""The commands. Each builds what it needs from the configuration and renders for a person
(rich tables) or for a script (``--json``)."""

from __future__ import annotations

import asyncio
import gc
import getpass
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from rotator import logs
from rotator.cli import render
from rotator.errors import ConfigError, NotFound, RotatorError
from rotator.model import Secret, Stage, TokenPair, utcnow
from rotator.settings import Config, load_config

T = TypeVar("T")

app = typer.Typer(
    name="rotator",
    help="Keeps Makini API tokens alive and safe: rotates, verifies, stores, revokes, serves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Validate the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="ROTATOR_CONFIG",
        help="The TOML configuration file.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class _State:
    config_path: Path | None = None
    log_level: str | None = None
    log_format: str | None = None


state = _State()


@app.callback()
def _root(
    config: ConfigOpt = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="console or json.")] = None,
) -> None:
    state.config_path = config
    state.log_level = log_level
    state.log_format = log_format


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def command_config(path: Path | None = None, *, service: bool = False) -> Config:
    """Load the configuration and set up logs. One-shot commands a person types log warnings
    and errors only (their tables say the rest) unless --log-level asks for more."""
    cfg = load_config(path or state.config_path)
    level = state.log_level or cfg.logging.level
    if not service and not state.log_level and level in ("debug", "info"):
        level = "warning"
    logs.configure(level, state.log_format or cfg.logging.format)
    return cfg


def run_command(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    # What is loaded by now (modules, settings) lives as long as the command: keep the
    # collector's full passes from walking it again and again (0.2 s of a 1,000-credential run)
    gc.freeze()
    return asyncio.run(fn(*args))


async def with_runtime(
    cfg: Config, work: Callable[[Any], Awaitable[T]], only: list[str] | None = None
) -> T:
    from rotator.revoke import resume_held
    from rotator.rotation.runtime import Runtime

    runtime = Runtime.open(cfg, only=only, resume_revoke=resume_held)
    try:
        return await work(runtime)
    finally:
        await runtime.aclose()


# --- rotating --------------------------------------------------------------------------------


@app.command("run-due")
def run_due(
    env: Annotated[list[str] | None, typer.Option("--env", help="Only this environment.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Rotate, resume and retire whatever is due now, then exit (non-zero if anything failed).
    Made for a Kubernetes CronJob with concurrencyPolicy Forbid. A large run forks workers to
    use more than one core (scheduler.processes)."""
    from rotator.rotation import workers

    cfg = command_config(service=True)
    for name in env or []:
        cfg.environment(name)

    async def plan_or_rotate(rt: Any) -> tuple[list[Any], int, list[Any]]:
        from rotator.service import Stopper, due_work, rotate_work

        async with Stopper(rt, cfg.scheduler.drain.total_seconds()) as stopper:
            work = await due_work(rt, env)
            processes = workers.process_count(
                cfg.scheduler.processes, len(work), workers.smallest_limit(cfg)
            )
            if processes > 1 and stopper.signalled is None:
                return work, processes, []  # forked once this runtime is closed
            with render.progress(json_out) as tick:
                return work, 1, await rotate_work(rt, work, tick, wait_busy=True)

    work, processes, results = run_command(with_runtime, cfg, plan_or_rotate, env)
    if processes > 1:
        with (
            workers.Shares(cfg, work, processes, _rotate_share(env)) as shares,
            render.progress(json_out, total=len(work)) as tick,
        ):
            results = shares.gather(tick)
    render.results(results, json_out)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def _rotate_share(env: list[str] | None) -> Callable[..., None]:
    """What a forked ``run-due`` worker runs: its share of the work, each result reported."""

    def rotate(cfg: Config, share: Any, report: Callable[[Any], None]) -> None:
        from rotator.cli import guarded
        from rotator.service import Stopper, rotate_work

        async def work(rt: Any) -> list[Any]:
            async with Stopper(rt, cfg.scheduler.drain.total_seconds()):
                return await rotate_work(rt, share, report, wait_busy=True)

        guarded(lambda: run_command(with_runtime, cfg, work, env))

    return rotate


@app.command()
def rotate(
    environment: str,
    name: Annotated[list[str], typer.Argument(help="Credential name(s).")],
    reason: Annotated[str, typer.Option(help="Recorded in the audit log.")] = "manual",
    json_out: JsonOpt = False,
) -> None:
    """Rotate credentials now, whatever the schedule says."""
    cfg = command_config()
    env = cfg.environment(environment)
    for n in name:
        env.credential(n, environment)

    async def work(rt: Any) -> list[Any]:
        from rotator.rotation.work import Work

        with render.progress(json_out or len(name) < 3) as tick:
            return list(
                await rt.engine.rotate_many(
                    [Work(environment, n, reason, forced=True) for n in name],
                    actor=actor(),
                    progress=tick,
                )
            )

    results = run_command(with_runtime, cfg, work, [environment])
    render.results(results, json_out)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


@app.command()
def verify(
    environment: str,
    name: Annotated[str | None, typer.Argument(help="One credential (default: all).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the current tokens with Makini (accepted, and for the right connection)."""
    cfg = command_config()
    env = cfg.environment(environment)
    names = [env.credential(name, environment).name] if name else [c.name for c in env.credentials]
    from rotator.rotation.queries import verify_current

    async def work(rt: Any) -> list[tuple[str, bool, str]]:
        async def one(n: str) -> tuple[str, bool, str]:
            ok, detail = await verify_current(rt.engine, environment, n)
            return n, ok, detail

        return list(await asyncio.gather(*(one(n) for n in names)))

    rows = run_command(with_runtime, cfg, work, [environment])
    render.verify(environment, rows, json_out)
    if not all(ok for _, ok, _ in rows):
        raise typer.Exit(1)


# --- reading ---------------------------------------------------------------------------------


@app.command()
def status(
    environment: Annotated[str | None, typer.Argument(help="One environment.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Each credential: current version, token age, expiry, next rotation, last outcome, and
    whether every backend holds the same current version."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)

    async def work(rt: Any) -> list[Any]:
        from rotator.rotation.status import collect

        return await collect(rt, environment)

    rows = run_command(with_runtime, cfg, work, [environment] if environment else None)
    render.status(rows, json_out)
    if any(not r.healthy for r in rows):
        raise typer.Exit(3)


@app.command()
def get(
    environment: str,
    name: str,
    previous: Annotated[bool, typer.Option("--previous", help="The previous version.")] = False,
    field: Annotated[
        str, typer.Option(help="access_token, refresh_token or json.")
    ] = "access_token",
) -> None:
    """Print the current access token of a credential (for scripts). Reads the primary backend."""
    cfg = command_config()
    cfg.environment(environment).credential(name, environment)
    if field not in ("access_token", "refresh_token", "json"):
        raise ConfigError(
            f"unknown --field {field!r}", hint="use access_token, refresh_token or json"
        )

    async def work(rt: Any) -> Any:
        primary = rt.environments[environment].primary
        stage = Stage.PREVIOUS if previous else Stage.CURRENT
        return await asyncio.to_thread(primary.read, name, stage)

    version = run_command(with_runtime, cfg, work, [environment])
    if version is None:
        raise NotFound(
            f"{environment}/{name} has no {'previous' if previous else 'current'} token",
            where=f"primary backend of {environment}",
            hint=f"rotate it first: rotator rotate {environment} {name}",
        )
    if field == "access_token":
        typer.echo(version.tokens.access.reveal())
    elif field == "refresh_token":
        if version.tokens.refresh is None:
            raise NotFound(f"{environment}/{name} has no refresh token")
        typer.echo(version.tokens.refresh.reveal())
    else:
        typer.echo(version.to_json())


@app.command()
def plan(
    environment: Annotated[str | None, typer.Argument(help="One environment.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """What is due and what would happen, changing nothing."""
    cfg = command_config()
    if environment:
        cfg.environment(environment)
    from rotator.journal import Journal
    from rotator.rotation.schedule import plan as make_plan

    journal = Journal.open(cfg.journal)
    try:
        items = make_plan(
            cfg, journal, utcnow(), environments=[environment] if environment else None
        )
    finally:
        journal.close()
    render.plan(items, json_out)


@app.command()
def audit(
    environment: Annotated[str | None, typer.Option("--env")] = None,
    credential: Annotated[str | None, typer.Option("--credential")] = None,
    action: Annotated[str | None, typer.Option("--action")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """The audit log, newest first."""
    cfg = command_config()
    from rotator.journal import Journal

    journal = Journal.open(cfg.journal)
    try:
        entries = journal.audit_entries(
            environment=environment, credential=credential, action=action, limit=limit
        )
    finally:
        journal.close()
    render.audit([e.as_dict() for e in entries], json_out)


# --- setup -----------------------------------------------------------------------------------


@config_app.command("check")
def config_check(
    path: Annotated[Path | None, typer.Argument(help="Default: --config / ROTATOR_CONFIG.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate the configuration and say what is wrong, key by key."""
    from rotator.apart import inspect_keys

    cfg = load_config(path or state.config_path)
    problems: list[str] = []
    for name, env in cfg.environments.items():
        try:
            env.makini.client_secret(f"environments.{name}.makini.client_secret_env")
        except RotatorError as exc:
            problems.append(f"{name}: {exc.message}")
    # every key that is here is loaded (none is created) and compared across environments;
    # one that is not here (a variable not set, no file) is a warning: the check may run
    # where the secrets are not
    keys = inspect_keys(cfg)
    problems += keys.absent + keys.loose
    errors = keys.shared + keys.broken
    summary = {
        "file": str(cfg.source),
        "journal": cfg.journal.url.split("://", 1)[0],
        "environments": {
            name: {
                "credentials": len(env.credentials),
                "backends": [b.display_name() + f" ({b.type})" for b in env.backend_settings],
            }
            for name, env in cfg.environments.items()
        },
        "warnings": problems,
        "errors": errors,
    }
    render.config_summary(summary, json_out)
    if errors:
        raise ConfigError(
            f"the configuration has {len(errors)} problem{'s' if len(errors) != 1 else ''} "
            "with its keys:\n" + "\n".join(f"  {line}" for line in errors),
            where=str(cfg.source),
            hint="fix the keys named above; `rotator config check` re-validates",
        )


@app.command()
def keygen() -> None:
    """Print a new random key (for a sealing key or a file backend key variable)."""
    from rotator.crypto import generate_key

    typer.echo(generate_key())


@app.command("import")
def import_pair(
    environment: str,
    name: str,
    reason: Annotated[str, typer.Option(help="Recorded in the audit log.")] = "bootstrap",
) -> None:
    """Store a token pair obtained outside the rotator (Makini Link) as the current version.
    Reads JSON {"access_token", "refresh_token", "expires_in"|"expires_at"} from stdin; the
    token is verified with Makini first."""
    cfg = command_config()
    cfg.environment(environment).credential(name, environment)
    raw = sys.stdin.read()
    tokens = _parse_pair(raw)
    from rotator.rotation.importing import import_pair as store_pair

    async def work(rt: Any) -> str:
        return str(
            await store_pair(rt.engine, environment, name, tokens, actor=actor(), reason=reason)
        )

    version = run_command(with_runtime, cfg, work, [environment])
    render.console.print(f"imported {environment}/{name} as version {version}")


def _parse_pair(raw: str) -> TokenPair:
    from datetime import UTC, datetime

    try:
        doc = json.loads(raw)
        access = Secret(str(doc["access_token"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(
            "stdin is not a JSON object with an access_token",
            hint='pipe e.g. {"access_token": "...", "refresh_token": "...", "expires_in": 2592000}',
        ) from None
    refresh = doc.get("refresh_token")
    expires: datetime | None = None
    if isinstance(doc.get("expires_at"), str):
        expires = datetime.fromisoformat(doc["expires_at"])
    elif isinstance(doc.get("expires_in"), int | float):
        value = float(doc["expires_in"])
        expires = (
            datetime.fromtimestamp(value, UTC)
            if value > 1e9
            else utcnow() + timedelta(seconds=value)
        )
    return TokenPair(
        access=access, refresh=Secret(str(refresh)) if refresh else None, expires_at=expires
    )


# --- services --------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address for the HTTP API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the HTTP API.")] = 8080,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate (chain): serve HTTPS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
) -> None:
    """Run the scheduler (rotate on schedule, resume, retire) until stopped."""
    cfg = command_config(service=True)
    from rotator.service import serve as run_service

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", hint="give both, or neither")
    asyncio.run(run_service(cfg, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key))


@app.command("makini-sim")
def makini_sim(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8765,
    issue_invalidates: Annotated[
        bool,
        typer.Option(
            "--issue-invalidates/--issue-keeps-old",
            help="Does issuing a token kill the previous one at once?",
        ),
    ] = True,
    latency_ms: Annotated[float, typer.Option(help="Added to every API call.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of API calls answered 5xx.")] = 0.0,
    token_lifetime_s: Annotated[int | None, typer.Option(help="Access token lifetime.")] = None,
    client: Annotated[
        list[str] | None, typer.Option(help="ID:SECRET of an admin client (repeatable).")
    ] = None,
) -> None:
    """Run the bundled Makini simulator (for local runs, tests and benchmarks)."""
    from rotator.makini.sim import SimOptions, serve_simulator

    options: dict[str, Any] = {
        "issue_invalidates_previous": issue_invalidates,
        "latency_ms": latency_ms,
        "error_rate": error_rate,
    }
    if token_lifetime_s is not None:
        options["token_lifetime_s"] = token_lifetime_s
    if client:
        pairs = {}
        for item in client:
            cid, sep, secret = item.partition(":")
            if not sep or not cid or not secret:
                raise ConfigError(f"--client {item.split(':', 1)[0]}:... is not ID:SECRET")
            pairs[cid] = secret
        options["clients"] = pairs
    logs.configure(state.log_level or "info", state.log_format or "console")
    serve_simulator(SimOptions(**options), host, port)


from rotator.cli.keys import keys_app  # noqa: E402 - registered after the root commands

app.add_typer(keys_app, name="keys")

from rotator.cli.revoke import revoke_command  # noqa: E402 - registered after the app exists

app.command("revoke")(revoke_command)


from rotator.cli import journal, ops  # noqa: E402 - register db, unaccounted, sync and doctor

COMMAND_MODULES = (journal, ops)
