"""The ``rotator`` Typer app: every command, assembled from the command modules. Each command
builds what it needs from the configuration and renders for a person (rich tables) or for a
script (``--json``).

Assembling the app imports the command modules and nothing heavy: each command imports the
journal, the engine, the server... when it runs (``tests/e2e/test_cli_startup.py`` holds
``--help``, ``keygen`` and ``get`` to that)."""

from __future__ import annotations

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
from rotator.cli.command import Command, Group
from rotator.cli.context import root


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
    cls=Group,
)
app.callback()(root)
app.add_typer(bootstrap.config_app, name="config", cls=Group)

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
app.add_typer(keys.keys_app, name="keys", cls=Group)
app.command(
    "revoke",
    epilog=_examples(
        'rotator revoke prod acme-sap --reason "leaked in CI log" --dry-run',
        'rotator revoke prod acme-sap --reason "leaked in CI log"',
        'rotator revoke prod --all --reason "INC-1234" --yes',
        "rotator revoke prod --resume",
    ),
)(revoke.revoke_command)
app.add_typer(journal.db_app, name="db", cls=Group)
app.add_typer(journal.unaccounted_app, name="unaccounted", cls=Group)
app.command()(ops.sync)
app.command()(ops.doctor)

for _typer in (app, bootstrap.config_app, keys.keys_app, journal.db_app, journal.unaccounted_app):
    for _info in _typer.registered_commands:
        if _info.cls in (None, TyperCommand):
            _info.cls = Command
