"""Versions no serving process may serve any more (emergency revoke), recorded in the journal:
every replica's feed reads them (``rotator.api.feed``), wherever the revoke ran."""

from __future__ import annotations

from sqlalchemy import column, insert, table

from rotator.journal import Journal, UTCDateTime
from rotator.model import utcnow

# lead: use TokenDrop from rotator.journal.schema once the tables have moved there (the table
# is declared in rotator.api.feed today, which the core may not import)
_TOKEN_DROPS = table(
    "token_drops",
    column("environment"),
    column("credential"),
    column("version_id"),
    column("at", UTCDateTime()),
)


def record_drop(journal: Journal, env: str, cred: str, version_id: str) -> None:
    """Record a dropped version in the journal, for every replica's feed (blocking; journal
    work only)."""
    row = {"environment": env, "credential": cred, "version_id": version_id, "at": utcnow()}
    journal.execute("record a revoked version", insert(_TOKEN_DROPS), row)
