"""How every command runs.

Every user-facing error is a :class:`~rotator.errors.RotatorError`: printed as what, where and
what to do next, with a non-zero exit code. Anything else is a bug: it is reported in one line
and the traceback is logged at debug level (``--log-level debug``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from rotator.errors import RotatorError
from rotator.scrub import mask

if TYPE_CHECKING:
    from rich.console import Console


@cache
def err_console() -> Console:
    """stderr for errors, made when the first one is printed (a command that succeeds never
    imports rich.console for it)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def guarded(command: Callable[[], object]) -> None:
    """Run ``command`` as the CLI runs every command: a user-facing error is printed (what,
    where, what to do) and exits non-zero; anything else is a bug, reported in one line."""
    try:
        command()
    except RotatorError as exc:
        _print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console().print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug: one clear line, the traceback only when asked for
        if "--log-level=debug" in sys.argv or "debug" in sys.argv:
            raise
        from rich.markup import escape

        err_console().print(
            f"[bold red]internal error:[/] {escape(type(exc).__name__)}: "
            f"{escape(mask(str(exc))[:300])}\n  this is a bug in the rotator; run again with "
            "--log-level debug for the traceback and report it",
        )
        sys.exit(70)


def _print_error(exc: RotatorError) -> None:
    from rich.markup import escape

    lines = exc.describe().splitlines()
    err_console().print(f"[bold red]error:[/] {escape(lines[0])}")
    for line in lines[1:]:
        err_console().print(f"  {line}", markup=False)
