"""The ``rotator`` Typer app: every command, assembled from the command modules. Each command
builds what it needs from the configuration and renders for a person (rich tables) or for a
script (``--json``)."""

from __future__ import annotations

import typer

from rotator.cli import bootstrap, journal, keys, ops, reading, revoke, rotating, services
from rotator.cli.context import root

app = typer.Typer(
    name="rotator",
    help="Keeps Makini API tokens alive and safe: rotates, verifies, stores, revokes, serves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.callback()(root)
app.add_typer(bootstrap.config_app, name="config")

# rotating
app.command("run-due")(rotating.run_due)
app.command()(rotating.rotate)
app.command()(rotating.verify)
# reading
app.command()(reading.status)
app.command()(reading.get)
app.command()(reading.plan)
app.command()(reading.audit)
# setting up
app.command()(bootstrap.keygen)
app.command("import")(bootstrap.import_pair)
# the long-running processes
app.command()(services.serve)
app.command("makini-sim")(services.makini_sim)
# keys, the emergency revoke, the journal, repairs
app.add_typer(keys.keys_app, name="keys")
app.command("revoke")(revoke.revoke_command)
app.add_typer(journal.db_app, name="db")
app.add_typer(journal.unaccounted_app, name="unaccounted")
app.command()(ops.sync)
app.command()(ops.doctor)
