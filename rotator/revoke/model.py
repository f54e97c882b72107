"""What a revoke is asked to do (:class:`RevokeRequest`), what it will do (:class:`CredentialPlan`),
what it keeps in the journal while it runs (:class:`Record`) and what it reports
(:class:`CredentialReport`). Tokens appear only as short fingerprints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rotator.errors import ConfigError
from rotator.journal import Journal

Strategy = Literal["issue", "refresh", "disconnect", "auto"]
KillMethod = Literal["issue", "refresh", "revoke_path", "disconnect"]
STRATEGIES: tuple[Strategy, ...] = ("issue", "refresh", "disconnect", "auto")

KIND = "revoke"
"""``Rotation.kind`` of a revoke's journal row."""


class RevokeStep:
    """Where a revoke stands (``Rotation.step`` of a ``kind="revoke"`` row).

    The names differ from the rotation steps so that the rotation engine never mistakes a
    revoke for a rotation, and carry no ``:`` so that ``ROTATOR_FAULT_KILL_AFTER`` can name them.
    """

    STARTED = "revoke-started"  # row written, in-flight rotations superseded; Makini not asked
    ISSUED = "revoke-issued"  # the token the kill produced (issue/refresh) is sealed here
    KILLED = "revoke-killed"  # Makini was made to reject the old token (invalidated_old says)
    REPLACED = "revoke-replaced"  # the replacement is current everywhere; sealed copy dropped
    PURGED = "revoke-purged"  # old version(s) unreadable everywhere; confirmation pending
    DONE = "revoke-done"  # confirmed (or not: see error) and reported
    OPEN = (STARTED, ISSUED, KILLED, REPLACED, PURGED)


# credential_state.last_outcome after a revoke
REVOKED = "revoked"
REVOKED_NO_TOKEN = "revoked-no-token"  # noqa: S105 - finished with no current token: nothing may rotate it
REVOKE_INCOMPLETE = "revoke-incomplete"


@dataclass(frozen=True)
class RevokeRequest:
    """One ``rotator revoke`` command (or admin API call): always one environment."""

    environment: str
    names: tuple[str, ...] = ()
    all: bool = False
    version: str | None = None
    """``None`` or ``"current"``, ``"previous"``, or a version id."""
    replace: bool = True
    reason: str = ""
    actor: str = ""
    strategy: Strategy | None = None
    """Overrides every credential's ``revoke_strategy``."""
    resume: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a request that names no scope, two scopes or no
        reason (a resume keeps the reason it was started with)."""
        if self.all and self.names:
            raise ConfigError(
                "name credentials or pass --all, not both",
                hint=f"rotator revoke {self.environment} --all, or rotator revoke "
                f"{self.environment} NAME [NAME ...]",
            )
        if not self.all and not self.names and not self.resume:
            raise ConfigError(
                "nothing to revoke: name the credentials or pass --all",
                hint=f"rotator revoke {self.environment} NAME --reason TEXT",
            )
        if not self.resume and not self.reason.strip():
            raise ConfigError(
                "a revoke needs a reason (it is written to the audit log)",
                hint='add --reason "token leaked in build log #1234"',
            )
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown revoke strategy {self.strategy!r}", hint=f"use {', '.join(STRATEGIES)}"
            )


@dataclass
class Superseded:
    """A rotation the revoke pre-empted, as it stood when it was superseded."""

    id: str
    step: str
    version_id: str
    old_version_id: str | None


@dataclass(frozen=True)
class Preempted:
    """A rotation superseded by this run, with what decides whether a worker may still be
    waiting for Makini to answer its issue request."""

    info: Superseded
    attempts: int
    holds_token: bool


@dataclass
class Record:
    """The revoke's own decisions, kept in the journal (``revoke_records``, updated with each
    step that changes them) so a resume in another process continues with the same."""

    strategy: str
    method: str
    escalate: bool
    replace: bool
    target_stage: str | None
    current_version: str | None
    superseded: list[Superseded] = field(default_factory=list)
    adopted: str | None = None
    disconnected: bool = False
    replaced: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as the journal's ``revoke_records`` table takes it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        fields = dict(data)
        fields["superseded"] = [Superseded(**s) for s in fields.get("superseded") or []]
        return cls(**fields)

    @classmethod
    def latest(cls, journal: Journal, revoke_id: str) -> Record:
        """The revoke's decisions as last recorded (blocking; journal work only)."""
        recorded = journal.revoke_record(revoke_id)
        if recorded is None:
            raise ValueError(f"revoke {revoke_id} carries no record")
        return cls.from_dict(recorded)


@dataclass
class CredentialPlan:
    """What a revoke of one credential will do; printed before asking, and by ``--dry-run``."""

    environment: str
    credential: str
    connection_id: str
    action: str
    """revoke | resume | skip"""
    why: str = ""
    target_version: str | None = None
    target_stage: str | None = None
    target_fingerprint: str | None = None
    current_version: str | None = None
    strategy: str = "auto"
    method: str = "issue"
    escalate: bool = False
    replace: bool = True
    replacement: str = ""
    preempts: str | None = None
    purge: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    open_revoke: str | None = None

    @property
    def may_disconnect(self) -> bool:
        return self.action != "skip" and (self.method == "disconnect" or self.escalate)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["may_disconnect"] = self.may_disconnect
        return data


@dataclass
class BackendReport:
    """What one backend was made to do, and how long it took."""

    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "actions": self.actions,
            "errors": self.errors,
            "duration_s": round(self.duration_s, 3),
        }


OUTCOMES = ("revoked", "unconfirmed", "incomplete", "busy", "skipped", "failed")


@dataclass
class CredentialReport:
    """The result of revoking one credential, per part and per backend."""

    environment: str
    credential: str
    outcome: str = "incomplete"
    """revoked | unconfirmed | incomplete | busy | skipped | failed"""
    revoke_id: str | None = None
    step: str | None = None
    method: str | None = None
    old_version: str | None = None
    old_fingerprint: str | None = None
    replacement_version: str | None = None
    replacement_fingerprint: str | None = None
    adopted_from: str | None = None
    old_dead: bool | None = None
    """Makini rejects the old token (None: could not be checked)."""
    replacement_accepted: bool | None = None
    disconnected: bool = False
    superseded: list[str] = field(default_factory=list)
    backends: dict[str, BackendReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    error: str | None = None
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome in ("revoked", "skipped")

    def backend(self, name: str) -> BackendReport:
        return self.backends.setdefault(name, BackendReport())

    def add_time(self, part: str, seconds: float) -> None:
        self.timings[part] = self.timings.get(part, 0.0) + seconds

    def next(self, step: str) -> None:
        if step not in self.next_steps:
            self.next_steps.append(step)

    def as_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "credential": self.credential,
            "outcome": self.outcome,
            "ok": self.ok,
            "revoke_id": self.revoke_id,
            "step": self.step,
            "method": self.method,
            "old_version": self.old_version,
            "old_fingerprint": self.old_fingerprint,
            "old_token_dead": self.old_dead,
            "replacement_version": self.replacement_version,
            "replacement_fingerprint": self.replacement_fingerprint,
            "replacement_accepted": self.replacement_accepted,
            "adopted_from": self.adopted_from,
            "disconnected": self.disconnected,
            "superseded": self.superseded,
            "backends": {k: v.as_dict() for k, v in self.backends.items()},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
            "next_steps": self.next_steps,
            "error": self.error,
            "resumed": self.resumed,
        }
