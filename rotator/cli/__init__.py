"""The ``rotator`` command line. See ``rotator --help``.

``app`` assembles the commands; each command module takes what it shares with the others
(options, configuration, runtime) from ``context``; ``guard`` runs a command as the CLI runs
every command (a user-facing error printed, a bug reported in one line); ``render`` prints.
"""

from __future__ import annotations


def main() -> None:
    """The ``rotator`` console script. SIGUSR1 prints where every thread and every asyncio task
    waits (function and line, never a value) to stderr: how to see what a process that does not
    stop is waiting for."""
    from rotator import signals

    signals.dump_on_usr1()
    from rotator.cli.app import app
    from rotator.cli.command import click_app
    from rotator.cli.guard import guarded

    guarded(lambda: click_app(app)(standalone_mode=True, prog_name="rotator"))
