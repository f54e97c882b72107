"""What discovery enrolled, as credentials: :func:`effective` and the rows it reads.

Apart from :mod:`rotator.rotation.discovery` (which re-exports every name here) because
``rotator status`` needs only this: discovery's module imports SQLAlchemy, the journal's schema
and the Makini client, which the status command otherwise never loads (it reads a SQLite
journal with ``sqlite3``): at 10,000 discovered credentials that import was about a sixth of
the command.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from rotator.settings import CredentialSettings, EnvironmentSettings

ENROLLED, OFFBOARDED, PURGED = "enrolled", "offboarded", "purged"


@dataclass(frozen=True, slots=True)
class Known:
    """A row of ``discovered_connections``, as discovery reads it."""

    connection_id: str
    credential: str
    status: str
    platform: str | None = None
    company: str | None = None
    name: str | None = None
    gone_at: datetime | None = None


def enrolled_settings(env: EnvironmentSettings, row: Known) -> CredentialSettings:
    described = " ".join(p for p in (row.platform, row.company) if p)
    return CredentialSettings.model_construct(
        name=row.credential,
        connection_id=row.connection_id,
        method="issue",
        schedule=env.discover.schedule,
        description=f"discovered at Makini{': ' + described if described else ''}",
        revoke_strategy="auto",
    )


def effective(env: EnvironmentSettings, discovered: Iterable[Known]) -> EnvironmentSettings:
    """The environment's credentials: the configured ones, then each enrolled or off-boarded
    (still readable) discovered one whose name and connection the configuration does not
    already hold. Off-boarded ones are named in ``offboarded`` (the schedule skips them)."""
    configured = env.configured_credentials
    names = {c.name for c in configured}
    connections = {c.connection_id for c in configured}
    extra: list[CredentialSettings] = []
    offboarded: set[str] = set()
    for row in discovered:
        if row.status == PURGED or row.credential in names:
            continue
        if row.connection_id in connections:
            continue
        names.add(row.credential)
        extra.append(enrolled_settings(env, row))
        if row.status == OFFBOARDED:
            offboarded.add(row.credential)
    return env.with_discovered(extra, offboarded)
