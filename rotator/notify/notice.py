"""What one notification says: a condition, where, whether it starts or resolves, and a
human sentence. Names, version ids and fingerprints at most: never a token."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class Condition(StrEnum):
    ROTATION_FAILED = "rotation_failed"
    ATTENTION = "attention"
    NEAR_EXPIRY = "near_expiry"
    REVOKE = "revoke"
    REVOKE_UNCONFIRMED = "revoke_unconfirmed"
    DRIFT = "drift"
    OFFBOARDED = "offboarded"


_TITLES: dict[Condition, tuple[str, str]] = {
    Condition.ROTATION_FAILED: (
        "rotation of {where} failed",
        "rotation of {where} succeeded again",
    ),
    Condition.ATTENTION: ("{where} needs a person", "{where} no longer needs a person"),
    Condition.NEAR_EXPIRY: (
        "the token of {where} expires soon and has not been rotated",
        "the token of {where} is no longer near expiry",
    ),
    Condition.REVOKE: (
        "emergency revoke of {where} started",
        "emergency revoke of {where} finished",
    ),
    Condition.REVOKE_UNCONFIRMED: (
        "emergency revoke of {where} unconfirmed: Makini may still accept the old token",
        "emergency revoke of {where} no longer unconfirmed",
    ),
    Condition.DRIFT: (
        "the backends of {where} disagree on the current version",
        "the backends of {where} agree again",
    ),
    Condition.OFFBOARDED: (
        "{where} is off-boarded: its Makini connection is gone",
        "the off-boarding of {where} is over",
    ),
}

SEVERITY = {
    Condition.ROTATION_FAILED: "warning",
    Condition.ATTENTION: "critical",
    Condition.NEAR_EXPIRY: "critical",
    Condition.REVOKE: "info",
    Condition.REVOKE_UNCONFIRMED: "critical",
    Condition.DRIFT: "warning",
    Condition.OFFBOARDED: "warning",
}


@dataclass(frozen=True)
class Notice:
    """One notification, as stored in the outbox and rendered by each sink."""

    condition: str
    environment: str
    credential: str
    firing: bool
    detail: str
    started_at: datetime
    resolved_at: datetime | None = None

    @property
    def where(self) -> str:
        return f"{self.environment}/{self.credential}"

    @property
    def state(self) -> str:
        return "firing" if self.firing else "resolved"

    @property
    def summary(self) -> str:
        start, end = _TITLES[Condition(self.condition)]
        return (start if self.firing else end).format(where=self.where)

    @property
    def severity(self) -> str:
        return SEVERITY[Condition(self.condition)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "state": self.state,
            "environment": self.environment,
            "credential": self.credential,
            "severity": self.severity,
            "summary": self.summary,
            "detail": self.detail,
            "started_at": self.started_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["resolved_at"] = self.resolved_at.isoformat() if self.resolved_at else None
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Notice:
        data = json.loads(text)
        data["started_at"] = datetime.fromisoformat(data["started_at"])
        if data.get("resolved_at"):
            data["resolved_at"] = datetime.fromisoformat(data["resolved_at"])
        return cls(**data)
