"""The ``rotator`` command line. See ``rotator --help``.

``app`` assembles the commands; each command module takes what it shares with the others
(options, configuration, runtime) from ``context``; ``guard`` runs a command as the CLI runs
every command (a user-facing error printed, a bug reported in one line); ``render`` prints.
"""

from __future__ import annotations


def main() -> None:
    """The ``rotator`` console script."""
    from rotator.cli.app import app
    from rotator.cli.guard import guarded

    guarded(lambda: app(standalone_mode=True))
