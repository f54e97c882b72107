"""The journal: every table (:mod:`.schema`), the domain API callers use (:class:`Journal`),
leases (:mod:`.leases`) and the migrations that own the schema (:mod:`.migrate`).

How SQLite is made fast and safe (the writer thread, compiled statements, pragmas) is private
to this package (``_sqlite``).

The names below are imported when first used: a command that only reads the journal
(``rotator status``) imports :mod:`.rows` and :mod:`.snapshot`, and SQLAlchemy only where it
needs it (a PostgreSQL journal, one to create or migrate).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rotator.journal.rows import Step

if TYPE_CHECKING:
    from rotator.journal.leases import Lease, LeaseKeeper
    from rotator.journal.schema import (
        AuditEntry,
        Base,
        CredentialState,
        Lock,
        ReaderKey,
        ReaderRead,
        RevokeRecord,
        Rotation,
        TokenDrop,
        UnaccountedToken,
        UTCDateTime,
        WebhookEvent,
    )
    from rotator.journal.store import DriveStart, Journal, LeaseKey, redact_url

_WHERE = {
    "Lease": "leases",
    "LeaseKeeper": "leases",
    "AuditEntry": "schema",
    "Base": "schema",
    "CredentialState": "schema",
    "Lock": "schema",
    "ReaderKey": "schema",
    "ReaderRead": "schema",
    "RevokeRecord": "schema",
    "Rotation": "schema",
    "TokenDrop": "schema",
    "UnaccountedToken": "schema",
    "UTCDateTime": "schema",
    "WebhookEvent": "schema",
    "DriveStart": "store",
    "Journal": "store",
    "LeaseKey": "store",
    "redact_url": "store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AuditEntry",
    "Base",
    "CredentialState",
    "DriveStart",
    "Journal",
    "Lease",
    "LeaseKeeper",
    "LeaseKey",
    "Lock",
    "ReaderKey",
    "ReaderRead",
    "RevokeRecord",
    "Rotation",
    "Step",
    "TokenDrop",
    "UTCDateTime",
    "UnaccountedToken",
    "WebhookEvent",
    "redact_url",
]
