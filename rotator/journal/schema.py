"""Every table of the journal, in one place.

The migrations (``rotator/journal/migrations``) create and change these tables; nothing else
does. A test checks that a journal brought to the latest revision has every table declared
here.

Token material appears only sealed (``Rotation.sealed``, AES-GCM with the environment's sealing
key) and only between *issue* and *promote*; everything else names tokens by fingerprint.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from rotator.journal.rows import Step


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the journal")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Rotation(Base):
    __tablename__ = "rotations"
    # a drive reads its credential's latest open rotation: without this index SQLite searches
    # by environment and reads every rotation of it, the whole history, on every drive
    __table_args__ = (
        Index("ix_rotations_credential_started", "environment", "credential", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), index=True)
    credential: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="rotate")
    step: Mapped[str] = mapped_column(String(16), index=True)
    version_id: Mapped[str] = mapped_column(String(36))
    old_version_id: Mapped[str | None] = mapped_column(String(36))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    old_fingerprint: Mapped[str | None] = mapped_column(String(64))
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retire_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    invalidated_old: Mapped[bool | None] = mapped_column()
    reason: Mapped[str] = mapped_column(String(500), default="")
    actor: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    """Set once the rotation or revoke finishes (what retention measures age by)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str] = mapped_column(Text, default="[]")
    asked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Set before Makini is asked for a token, cleared once its answer is recorded: a resume
    that finds it set knows the last request's answer was lost (see
    ``rotator.rotation.unaccounted``)."""

    @property
    def is_open(self) -> bool:
        return self.step in Step.OPEN

    def note_list(self) -> list[str]:
        return list(json.loads(self.notes or "[]"))


class CredentialState(Base):
    """What the journal knows of a credential's current token (never the token)."""

    __tablename__ = "credential_state"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(String(64), primary_key=True)
    current_version_id: Mapped[str | None] = mapped_column(String(36))
    current_fingerprint: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_outcome: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    attention: Mapped[str | None] = mapped_column(Text)
    unaccounted: Mapped[int] = mapped_column(Integer, server_default="0")
    """Open entries in ``unaccounted_tokens`` (tokens Makini may have issued that no backend
    holds)."""
    change_seq: Mapped[int | None] = mapped_column(BigInteger, index=True)
    """Set by a trigger whenever ``current_version_id`` changes (migration 0007): readers ask
    only for the rows above the highest number they have seen (``rotator.api.feed``)."""


class AuditEntry(Base):
    """Append-only: who did what, when, with what outcome. Fingerprints, never tokens."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    environment: Mapped[str | None] = mapped_column(String(64), index=True)
    credential: Mapped[str | None] = mapped_column(String(64))
    version_id: Mapped[str | None] = mapped_column(String(36))
    outcome: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    request_ids: Mapped[str] = mapped_column(Text, default="[]")
    detail: Mapped[str] = mapped_column(Text, default="{}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "environment": self.environment,
            "credential": self.credential,
            "version_id": self.version_id,
            "outcome": self.outcome,
            "fingerprint": self.fingerprint,
            "request_ids": json.loads(self.request_ids or "[]"),
            "detail": json.loads(self.detail or "{}"),
        }


class Lock(Base):
    """A lease (see :mod:`rotator.journal.leases`)."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RevokeRecord(Base):
    """An emergency revoke's decisions (``rotator.revoke``), one row per revoke, updated as they
    change: a resume, in this process or another, continues with the same decisions."""

    __tablename__ = "revoke_records"

    rotation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    """The revoke's row in ``rotations`` (``kind="revoke"``)."""
    environment: Mapped[str] = mapped_column(String(64))
    credential: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(32))
    escalate: Mapped[bool] = mapped_column()
    replace: Mapped[bool] = mapped_column()
    target_stage: Mapped[str | None] = mapped_column(String(16))
    current_version: Mapped[str | None] = mapped_column(String(36))
    superseded: Mapped[str] = mapped_column(Text, default="[]")
    """JSON list of the rotations the revoke superseded, each ``{id, step, version_id,
    old_version_id}``."""
    adopted: Mapped[str | None] = mapped_column(String(36))
    disconnected: Mapped[bool] = mapped_column(default=False)
    replaced: Mapped[str | None] = mapped_column(String(36))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- the serving side's tables -----------------------------------------------------------------


class ReaderKey(Base):
    """A key of the HTTP API (``rotator.keys``): its id, scope and hash, never the key."""

    __tablename__ = "reader_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    environment: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    credentials: Mapped[str | None] = mapped_column(Text)
    """JSON list of credential names, or NULL for every credential of the environment."""
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ReaderRead(Base):
    """Who read which version (``rotator.readers``)."""

    __tablename__ = "reader_reads"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_name: Mapped[str] = mapped_column(String(100))
    first_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class WebhookEvent(Base):
    """A Makini webhook, queued once per id (``rotator.webhooks``)."""

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("environment", "webhook_id", name="uq_webhook_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64), index=True)
    webhook_id: Mapped[str] = mapped_column(String(200))
    event_type: Mapped[str] = mapped_column(String(200), default="")
    connection_id: Mapped[str | None] = mapped_column(String(200))
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(Text)


class TokenDrop(Base):
    """A version that must not be served any more (emergency revoke; ``rotator.api.feed``)."""

    __tablename__ = "token_drops"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64))
    credential: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(String(36))
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class UnaccountedToken(Base):
    """A token Makini may have issued that no backend holds (``rotator.rotation.unaccounted``)."""

    __tablename__ = "unaccounted_tokens"
    __table_args__ = (
        Index("ix_unaccounted_tokens_open", "environment", "credential", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64))
    credential: Mapped[str] = mapped_column(String(64))
    connection_id: Mapped[str] = mapped_column(String(200))
    rotation_id: Mapped[str | None] = mapped_column(String(36))
    asked_at: Mapped[datetime] = mapped_column(UTCDateTime)
    """When the request was sent (at the latest)."""
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cause: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    """The token's fingerprint, where it was received (too late to be recorded)."""
    live_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """By when the token has expired at the latest, where known."""
    status: Mapped[str] = mapped_column(String(16))
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_by: Mapped[str | None] = mapped_column(String(200))
    resolution: Mapped[str | None] = mapped_column(Text)

    def as_dict(self) -> dict[str, Any]:
        def iso(at: datetime | None) -> str | None:
            return at.isoformat() if at else None

        return {
            "id": self.id,
            "environment": self.environment,
            "credential": self.credential,
            "connection_id": self.connection_id,
            "rotation_id": self.rotation_id,
            "asked_at": iso(self.asked_at),
            "recorded_at": iso(self.recorded_at),
            "cause": self.cause,
            "request_id": self.request_id,
            "fingerprint": self.fingerprint,
            "live_until": iso(self.live_until),
            "status": self.status,
            "closed_at": iso(self.closed_at),
            "closed_by": self.closed_by,
            "resolution": self.resolution,
        }


# --- notifications (``rotator.notify``) --------------------------------------------------------


class NotifyCondition(Base):
    """Whether a condition someone must act on is on, per environment and credential: a
    notification goes out when it turns on and when it turns off, never while it stays."""

    __tablename__ = "notify_conditions"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(String(64), primary_key=True)
    condition: Mapped[str] = mapped_column(String(32), primary_key=True)
    active: Mapped[bool] = mapped_column()
    detail: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NotifyOutbox(Base):
    """One notification for one sink, until it is delivered (or given up): a restart loses
    none. A sender claims a row until ``claimed_until`` (one attempt's window), so replicas
    sharing the journal never send it twice at once. Names and version ids, never a token."""

    __tablename__ = "notify_outbox"
    __table_args__ = (Index("ix_notify_outbox_due", "status", "next_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64))
    credential: Mapped[str] = mapped_column(String(64))
    condition: Mapped[str] = mapped_column(String(32))
    sink: Mapped[str] = mapped_column(String(32))
    firing: Mapped[bool] = mapped_column()
    notice: Mapped[str] = mapped_column(Text)
    """The notification as JSON (``rotator.notify.notice.Notice``), rendered per sink."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))
    """pending | delivered | dead"""
    next_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)


# --- discovery (``rotator.rotation.discovery``) -------------------------------------------------


class DiscoveredConnection(Base):
    """A Makini connection discovery enrolled as a credential of its environment. ``status``:
    ``enrolled`` (rotates like a configured credential), ``offboarded`` (gone at Makini since
    ``gone_at``: no more rotations; its tokens stay readable for the grace), ``purged`` (its
    tokens made unreadable). Names and ids, never a token."""

    __tablename__ = "discovered_connections"
    __table_args__ = (
        UniqueConstraint(
            "environment", "credential", name="uq_discovered_connections_credential"
        ),
    )

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    connection_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    credential: Mapped[str] = mapped_column(String(64))
    platform: Mapped[str | None] = mapped_column(String(200))
    company: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    gone_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
