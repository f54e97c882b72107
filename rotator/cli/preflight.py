"""What a command checks before it changes anything: every secret it will need is here.

A command that would fail half-way for a secret it cannot read (the Makini client secret, a
sealing key, a backend's key) fails here instead, before it opens a rotation, takes a lease or
writes a byte, naming each missing secret by its key path, where it was looked for and what to
do. The read-only commands (``status``, ``get``, ``plan``, ``audit``) need no Makini secret and
check nothing here; the runtime reports a key they do need.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rotator.errors import ConfigError, RotatorError

if TYPE_CHECKING:  # light to import: the commands that call it have loaded it already
    from rotator.settings import Config


def require_secrets(cfg: Config, environments: Iterable[str], *, what: str) -> None:
    """Raise one :class:`ConfigError` listing every secret of ``environments`` that cannot be
    read here: the Makini client secret and each key (a key file that ``generate`` will create
    counts as here). ``what`` names the command's action for the message (``rotate``)."""
    from rotator.apart import named_keys
    from rotator.crypto import load_keys

    problems: list[str] = []
    for name in dict.fromkeys(environments):
        env = cfg.environment(name)
        try:
            env.makini.client_secret(f"environments.{name}.makini.client_secret_env")
        except RotatorError as exc:
            problems.append(_line(exc))
        for _, source in named_keys({name: env}):
            try:
                load_keys(source, create=False)
            except RotatorError as exc:
                problems.append(_line(exc))
    if problems:
        count = f"{len(problems)} secret{'s' if len(problems) != 1 else ''}"
        raise ConfigError(
            f"cannot {what}: {count} it needs cannot be read here, nothing was started:\n"
            + "\n".join(f"  {line}" for line in problems),
            where=str(cfg.source or "configuration"),
            hint="provide each secret named above, then run the command again "
            "(`rotator config check` lists them all)",
        )


def _line(exc: RotatorError) -> str:
    text = f"{exc.where}: {exc.message}" if exc.where else exc.message
    return text + (f"; next: {exc.hint}" if exc.hint else "")
