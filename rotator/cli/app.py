"""The ``rotator`` Typer app: every command, assembled from the command modules. Each command
builds what it needs from the configuration and renders for a person (rich tables) or for a
script (``--json``).

Assembling the app imports the command modules and nothing heavy: each command imports the
journal, the engine, the server... when it runs (``tests/e2e/test_cli_startup.py`` holds
``--help``, ``keygen`` and ``get`` to that)."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

from rotator.cli import (
    bootstrap,
    discovering,
    journal,
    keys,
    ops,
    reading,
    revoke,
    rotating,
    services,
)
from rotator.cli.context import root


class _Command(TyperCommand):
    """typer's command, with arguments shown as click shows them: ``rotator rotate [OPTIONS]
    ENV NAME...`` and ``ENV  The environment.`` (typer writes ``{ENV} {NAME}...`` and adds the
    Python type, ``ENV <str>``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_usage(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_usage(param), record[1]))
            elif param.param_type_name == "option":
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _usage(param: Any) -> str:
    name = str(param.metavar or param.name.upper())
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


def _examples(*lines: str) -> str:
    """An epilog of example command lines, printed as written (``\\b``: not rewrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    name="rotator",
    help="Keeps Makini API tokens alive and safe: rotates, verifies, stores, revokes, serves.",
    epilog="`rotator COMMAND --help` describes a command, with examples.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, ...)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.callback()(root)
app.add_typer(bootstrap.config_app, name="config")

# rotating
app.command(
    "run-due",
    epilog=_examples(
        "rotator run-due                 # everything due now, every environment",
        "rotator run-due --env prod --json",
    ),
)(rotating.run_due)
app.command(
    epilog=_examples(
        "rotator rotate prod acme-sap",
        'rotator rotate prod acme-sap globex-fiix --reason "SAP upgrade"',
    )
)(rotating.rotate)
app.command()(rotating.verify)
app.command(
    epilog=_examples(
        "rotator discover prod --dry-run   # what would be enrolled and off-boarded",
        "rotator discover prod --json",
    )
)(discovering.discover)
# reading
app.command(
    epilog=_examples(
        "rotator status                  # exit 3 if a credential needs attention",
        "rotator status prod --json",
    )
)(reading.status)
app.command(
    epilog=_examples(
        'TOKEN="$(rotator get prod acme-sap)"',
        "rotator get prod acme-sap --field json",
        "rotator get dev acme-sap --previous   # during a grace period",
    )
)(reading.get)
app.command()(reading.plan)
app.command(
    epilog=_examples(
        "rotator audit --env prod --credential acme-sap",
        "rotator audit --action revoke.completed --limit 10 --json",
    )
)(reading.audit)
# setting up
app.command()(bootstrap.keygen)
app.command("import")(bootstrap.import_pair)
# the long-running processes
app.command(
    epilog=_examples(
        "rotator serve                   # API on 127.0.0.1:8080, docs at /docs",
        "rotator serve --host 0.0.0.0 --port 8443 --tls-cert tls.crt --tls-key tls.key",
    )
)(services.serve)
app.command("makini-sim")(services.makini_sim)
# keys, the emergency revoke, the journal, repairs
app.add_typer(keys.keys_app, name="keys")
app.command(
    "revoke",
    epilog=_examples(
        'rotator revoke prod acme-sap --reason "leaked in CI log" --dry-run',
        'rotator revoke prod acme-sap --reason "leaked in CI log"',
        'rotator revoke prod --all --reason "INC-1234" --yes',
        "rotator revoke prod --resume",
    ),
)(revoke.revoke_command)
app.add_typer(journal.db_app, name="db")
app.add_typer(journal.unaccounted_app, name="unaccounted")
app.command()(ops.sync)
app.command()(ops.doctor)

for _typer in (app, bootstrap.config_app, keys.keys_app, journal.db_app, journal.unaccounted_app):
    for _info in _typer.registered_commands:
        if _info.cls in (None, TyperCommand):
            _info.cls = _Command
