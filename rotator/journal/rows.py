"""What the journal's rows mean, without SQLAlchemy: the steps of a rotation, the schema
revision this release writes, and the read-only views of the rows a reader of the whole
journal needs (``rotator status``, the schedule).

A table's declaration (:mod:`.schema`) satisfies these views; so do the plain rows that
:mod:`.snapshot` reads with the database's own driver. Importing this module costs nothing
a command that only reads would not pay anyway.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum, nonmember
from typing import Protocol

REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006", "0007")
"""Every revision of the schema this release knows, oldest first (a test checks them against
the migration scripts)."""
HEAD = REVISIONS[-1]


class Step(StrEnum):
    """Where a rotation stands. Open steps are resumed; terminal ones are history.

    The journal stores the value (``rotations.step``), so a member compares equal to what a
    row holds."""

    STARTED = "started"  # row written, Makini not yet asked (or asked and crashed)
    ISSUED = "issued"  # new token sealed in the journal
    STAGED = "staged"  # pending in every backend
    VERIFIED = "verified"  # Makini accepted it for the right connection
    PROMOTED = "promoted"  # current everywhere; sealed copy dropped; waiting to retire the old
    RETIRING = "retiring"  # the old pair sealed here, to revoke it at Makini once unreadable
    DONE = "done"  # old version retired
    ROLLED_BACK = "rolled_back"  # verify rejected the new token; pending removed
    FAILED = "failed"  # stopped; needs a person (see error)
    SUPERSEDED = "superseded"  # pre-empted by a revoke

    OPEN = nonmember((STARTED, ISSUED, STAGED, VERIFIED, PROMOTED, RETIRING))
    IN_FLIGHT = nonmember((STARTED, ISSUED, STAGED, VERIFIED, PROMOTED))
    """What an emergency revoke supersedes: a *retiring* rotation only concerns the old
    version, and finishes after the revoke (its sealed pair is the old one, to revoke)."""
    TERMINAL = nonmember((DONE, ROLLED_BACK, FAILED, SUPERSEDED))


class StateView(Protocol):
    """A ``credential_state`` row: what the journal knows of a credential's current token."""

    @property
    def environment(self) -> str: ...
    @property
    def credential(self) -> str: ...
    @property
    def current_version_id(self) -> str | None: ...
    @property
    def current_fingerprint(self) -> str | None: ...
    @property
    def expires_at(self) -> datetime | None: ...
    @property
    def rotated_at(self) -> datetime | None: ...
    @property
    def last_attempt_at(self) -> datetime | None: ...
    @property
    def last_outcome(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def attention(self) -> str | None: ...
    @property
    def unaccounted(self) -> int: ...


class RotationView(Protocol):
    """A ``rotations`` row as the schedule and ``status`` read it (a rotation or a revoke)."""

    @property
    def id(self) -> str: ...
    @property
    def environment(self) -> str: ...
    @property
    def credential(self) -> str: ...
    @property
    def step(self) -> str: ...
    @property
    def retire_after(self) -> datetime | None: ...


class LockView(Protocol):
    """A ``locks`` row: a lease, its holder and when it expires."""

    @property
    def name(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def expires_at(self) -> datetime: ...
