"""What every command shares: the root options, the configuration and logs a command runs with,
the actor it records, and the runtime (or journal) it works on.

Every command module imports this one; none imports another command module or the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from backends.base import Backend
    from rotator.apart import Environments
    from rotator.configfile import LoggingSettings
    from rotator.journal import Journal, Lease, Rotation
    from rotator.rotation.engine import RotationEngine
    from rotator.rotation.runtime import Runtime
    from rotator.rotation.work import RotationResult
    from rotator.settings import Config

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="ROTATOR_CONFIG",
        metavar="FILE",
        help="The TOML configuration file.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
EnvArg = Annotated[str, typer.Argument(metavar="ENV", help="The environment.", show_default=False)]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The credential.", show_default=False)]
OneEnvArg = Annotated[
    str | None,
    typer.Argument(metavar="ENV", help="One environment (default: all).", show_default=False),
]
ReasonOpt = Annotated[str, typer.Option(metavar="TEXT", help="Recorded in the audit log.")]


class _State:
    config_path: Path | None = None
    log_level: str | None = None
    log_format: str | None = None


state = _State()
"""The root options of the command line being run (set by :func:`root`)."""


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("makini-rotator")
    except PackageNotFoundError:  # run from a checkout that is not installed
        from rotator import __version__ as number
    typer.echo(f"rotator {number}")
    raise typer.Exit()


def root(
    config: ConfigOpt = None,
    log_level: Annotated[
        str | None,
        typer.Option(metavar="LEVEL", help="debug, info, warning or error.", show_default=False),
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(metavar="FORMAT", help="console or json.", show_default=False)
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the rotator's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """The options before the command (the app's callback)."""
    state.config_path = config
    state.log_level = log_level
    state.log_format = log_format


def actor() -> str:
    """Who runs this command, as the audit log records it: ``user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def command_config(path: Path | None = None, *, service: bool = False) -> Config:
    """Load the configuration and set up logs. One-shot commands a person types log warnings
    and errors only (their tables say the rest) unless --log-level asks for more."""
    from rotator.settings import load_config

    cfg = load_config(path or state.config_path)
    _configure_logs(cfg.logging, service=service)
    return cfg


def reading_config(environment: str, name: str) -> Environments:
    """What reading ``name``'s tokens needs of the configuration (:mod:`rotator.readconfig`),
    logs set up as :func:`command_config` sets them. The whole configuration is loaded when that
    cannot do: for a credential discovery enrolled, or a configuration with a problem to say."""
    from rotator.readconfig import read_config

    read = read_config(state.config_path, environment)
    if read is not None and name in read.credentials:
        _configure_logs(read.logging, service=False)
        return read
    cfg = command_config()
    if name not in {c.name for c in cfg.environment(environment).credentials}:
        from rotator.rotation.discovery import require_credential  # enrolled by discovery?

        require_credential(cfg, environment, name)
    return cfg


def _configure_logs(settings: LoggingSettings, *, service: bool) -> None:
    from rotator import logs

    level = state.log_level or settings.level
    if not service and not state.log_level and level in ("debug", "info"):
        level = "warning"
    logs.configure(level, state.log_format or settings.format)


def run_command(work: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine to its end (``asyncio.run``)."""
    import asyncio
    import gc

    # What is loaded by now (modules, settings) lives as long as the command: keep the
    # collector's full passes from walking it again and again (0.2 s of a 1,000-credential run)
    gc.freeze()
    return asyncio.run(work)


async def with_runtime(
    cfg: Config, work: Callable[[Runtime], Awaitable[T]], only: list[str] | None = None
) -> T:
    """Open the runtime of every environment (or ``only`` those), run ``work`` on it, close it."""
    from rotator.rotation.runtime import Runtime

    runtime = Runtime.open(cfg, only=only, resume_revoke=_resume_held)
    try:
        return await work(runtime)
    finally:
        await runtime.aclose()


async def _resume_held(
    engine: RotationEngine, env: str, name: str, row: Rotation, lease: Lease
) -> RotationResult:
    """:func:`rotator.revoke.resume_held`, imported by the first drive that finds a revoke to
    finish: a command that only reads (``status``) never imports the revoke package."""
    from rotator.revoke import resume_held

    return await resume_held(engine, env, name, row, lease)


@contextmanager
def open_journal(cfg: Config) -> Iterator[Journal]:
    """The journal of ``cfg``, migrated as configured, closed on the way out."""
    from rotator.journal import Journal

    journal = Journal.open(cfg.journal)
    try:
        yield journal
    finally:
        journal.close()


@contextmanager
def primary_backend(cfg: Environments, environment: str) -> Iterator[Backend]:
    """The primary backend of ``environment`` (a name ``cfg`` holds) alone, closed on the way
    out: for a command that only reads it (``get``), which then starts without the journal, the
    Makini client and the event loop. Keys shared across environments are refused first, as a
    runtime refuses them."""
    import backends
    from rotator.apart import refuse_shared_keys

    refuse_shared_keys(cfg)  # before a key is generated
    backend = backends.build(cfg.environments[environment].backend_settings[0], environment)
    try:
        yield backend
    finally:
        backend.close()
