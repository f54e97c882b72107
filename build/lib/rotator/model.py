"""Value types shared by the engine, the backends and the Makini client.

A token only ever lives inside a :class:`Secret`, which prints as a masked fingerprint. The one
way to the plain value is :meth:`Secret.reveal`, called where a token must leave the process: an
``Authorization`` header, a backend write, a reader's response.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

MANAGED_BY = "makini-rotator"
DOCUMENT_SCHEMA = 1


def fingerprint(value: str | bytes) -> str:
    """sha256 hex of a token: the same fingerprint the Makini simulator shows under ``/_sim/``."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


class Secret:
    """A token. ``repr``/``str`` show ``sha256:<first 12 hex>``, never the value."""

    __slots__ = ("_fingerprint", "_value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value
        self._fingerprint = fingerprint(value)

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def short(self) -> str:
        return f"sha256:{self._fingerprint[:12]}"

    def __repr__(self) -> str:
        return f"Secret({self.short})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._fingerprint, other._fingerprint)

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class TokenPair:
    """What Makini hands out for a connection: an access token, maybe a refresh token."""

    access: Secret
    refresh: Secret | None = None
    expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None


class Stage(enum.StrEnum):
    PENDING = "pending"
    CURRENT = "current"
    PREVIOUS = "previous"


def new_version_id() -> str:
    """A time-ordered unique id (UUIDv7 layout): sorts by creation, unique across replicas."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _parse_iso(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("timestamp is not a string")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoredVersion:
    """One version of a credential as a backend stores it.

    ``stage`` is the backend's label for the version (``None`` for a version that lost its
    label but is still readable); it is metadata, not part of the stored document.
    """

    environment: str
    credential: str
    version_id: str
    tokens: TokenPair
    created_at: datetime = field(default_factory=utcnow)
    stage: Stage | None = None

    def with_stage(self, stage: Stage | None) -> StoredVersion:
        return replace(self, stage=stage)

    def to_document(self) -> dict[str, Any]:
        """The JSON document a backend writes. This reveals the tokens: backends only."""
        return {
            "schema": DOCUMENT_SCHEMA,
            "managed_by": MANAGED_BY,
            "environment": self.environment,
            "credential": self.credential,
            "version": self.version_id,
            "access_token": self.tokens.access.reveal(),
            "refresh_token": self.tokens.refresh.reveal() if self.tokens.refresh else None,
            "expires_at": _iso(self.tokens.expires_at),
            "refresh_expires_at": _iso(self.tokens.refresh_expires_at),
            "created_at": _iso(self.created_at),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_document(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_document(cls, doc: object, stage: Stage | None = None) -> StoredVersion:
        """Parse a stored document; raises ``ValueError`` (never with the token in it)."""
        if not isinstance(doc, dict):
            raise ValueError("stored document is not a JSON object")
        if doc.get("managed_by") != MANAGED_BY:
            raise ValueError("stored document was not written by the rotator")
        try:
            refresh = doc.get("refresh_token")
            created = _parse_iso(doc.get("created_at")) or utcnow()
            return cls(
                environment=str(doc["environment"]),
                credential=str(doc["credential"]),
                version_id=str(doc["version"]),
                tokens=TokenPair(
                    access=Secret(str(doc["access_token"])),
                    refresh=Secret(str(refresh)) if refresh else None,
                    expires_at=_parse_iso(doc.get("expires_at")),
                    refresh_expires_at=_parse_iso(doc.get("refresh_expires_at")),
                ),
                created_at=created,
                stage=stage,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"stored document lacks a field: {exc.args[0]!s:.40}") from None

    @classmethod
    def from_json(cls, text: str | bytes, stage: Stage | None = None) -> StoredVersion:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("stored document is not valid JSON") from None
        return cls.from_document(doc, stage)


@dataclass(frozen=True)
class VersionInfo:
    """What a backend knows of a version without reading its value."""

    version_id: str
    stage: Stage | None
    readable: bool = True
