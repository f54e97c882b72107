"""Versions no serving process may serve any more (emergency revoke), recorded in the journal:
every replica's feed reads them (``rotator.api.feed``), wherever the revoke ran."""

from __future__ import annotations

from sqlalchemy import insert

from rotator.journal import Journal
from rotator.journal.schema import TokenDrop


def record_drop(journal: Journal, env: str, cred: str, version_id: str) -> None:
    """Record a dropped version in the journal, for every replica's feed (blocking; journal
    work only)."""
    row = {
        "environment": env,
        "credential": cred,
        "version_id": version_id,
        "at": journal.clock.now(),
    }
    journal.execute("record a revoked version", insert(TokenDrop), row)
