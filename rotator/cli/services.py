"""``rotator serve`` and ``rotator makini-sim``: the long-running processes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rotator.cli.context import command_config, state
from rotator.errors import ConfigError


def serve(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address for the HTTP API.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(metavar="PORT", help="Port for the HTTP API.")] = 8080,
    tls_cert: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="PEM certificate (chain): serve HTTPS."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PEM private key of --tls-cert.")
    ] = None,
) -> None:
    """Run the scheduler (rotate on schedule, resume, retire) until stopped."""
    cfg = command_config(service=True)
    import asyncio

    from rotator.service import serve as run_service

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", hint="give both, or neither")
    asyncio.run(run_service(cfg, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key))


def makini_sim(
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8765,
    issue_invalidates: Annotated[
        bool,
        typer.Option(
            "--issue-invalidates/--issue-keeps-old",
            help="Does issuing a token kill the previous one at once?",
        ),
    ] = True,
    latency_ms: Annotated[
        float, typer.Option(metavar="MS", help="Milliseconds added to every API call.")
    ] = 0.0,
    error_rate: Annotated[
        float, typer.Option(metavar="SHARE", help="Share of API calls answered 5xx (0-1).")
    ] = 0.0,
    token_lifetime_s: Annotated[
        int | None,
        typer.Option(metavar="SECONDS", help="Access token lifetime.", show_default=False),
    ] = None,
    client: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ID:SECRET",
            help="An admin client (repeatable); ID:@FILE reads the secret from FILE (kept out "
            "of the process list).",
        ),
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state",
            metavar="FILE",
            help="Keep connections and tokens in this file across restarts.",
        ),
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
            if secret.startswith("@"):
                secret = _secret_file(cid, Path(secret[1:]))
            pairs[cid] = secret
        options["clients"] = pairs
    from rotator import logs

    logs.configure(state.log_level or "info", state.log_format or "console")
    try:
        serve_simulator(SimOptions(**options), host, port, state_path=state_file)
    except ValueError as exc:  # a state file that does not parse: the message says what to do
        raise ConfigError(str(exc), where=str(state_file)) from None


def _secret_file(client_id: str, path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the secret of client {client_id} from {path}: "
            f"{exc.strerror or type(exc).__name__}",
            hint="give --client ID:@FILE a readable file holding the secret",
        ) from None
    if not secret:
        raise ConfigError(f"the secret file {path} of client {client_id} is empty")
    return secret
