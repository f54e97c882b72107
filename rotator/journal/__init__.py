"""The journal: every table (:mod:`.schema`), the domain API callers use (:class:`Journal`),
leases (:mod:`.leases`) and the migrations that own the schema (:mod:`.migrate`).

How SQLite is made fast and safe (the writer thread, compiled statements, pragmas) is private
to this package (``_sqlite``).
"""

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
    Step,
    TokenDrop,
    UnaccountedToken,
    UTCDateTime,
    WebhookEvent,
)
from rotator.journal.store import DriveStart, Journal, LeaseKey, redact_url

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
