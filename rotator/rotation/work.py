"""What the engine is asked to do (:class:`Work`) and what it answers (:class:`RotationResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """How a drive of one credential ended (the values are what JSON output, metrics and the
    audit log show)."""

    ROTATED = "rotated"
    RETIRED = "retired"
    WAITING = "waiting"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    BUSY = "busy"
    DEFERRED = "deferred"
    PARKED = "parked"
    NOTHING = "nothing"
    REVOKED = "revoked"


OK_OUTCOMES = frozenset(
    {
        Outcome.ROTATED,
        Outcome.RETIRED,
        Outcome.WAITING,
        Outcome.NOTHING,
        Outcome.BUSY,
        Outcome.REVOKED,
        Outcome.PARKED,
    }
)


@dataclass
class RotationResult:
    environment: str
    credential: str
    outcome: Outcome
    rotation_id: str | None = None
    version_id: str | None = None
    step: str | None = None
    error: str | None = None
    duration_s: float = 0.0
    detail: str | None = None
    """Why nothing was done (``nothing``), or where a parked drive stopped."""

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "credential": self.credential,
            "outcome": str(self.outcome),
            "rotation_id": self.rotation_id,
            "version_id": self.version_id,
            "step": self.step,
            "error": self.error,
            "detail": self.detail,
            "duration_s": round(self.duration_s, 3),
        }


@dataclass(frozen=True)
class Work:
    """One credential to drive."""

    environment: str
    credential: str
    reason: str
    forced: bool = False
    """Rotate now, whatever the schedule says (a person or the admin API asked). Otherwise the
    schedule decides, again, once the lease is held."""
    seen_version: str | None = None
    seen: bool = False
    """Forced work: ``seen_version`` is the current version the requester saw (``None``: no
    token). A new rotation starts only if it is still current under the lease; a rotation
    another worker made since is not repeated. Unseen forced work is pinned to the current
    version when the engine receives it."""
