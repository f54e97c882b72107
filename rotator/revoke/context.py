"""What one credential's revoke works with: its journal row and record, the tokens of the
rotations it pre-empted, and the plumbing of its steps (Makini, sealing, backends, the journal
and the lease). The steps themselves are in :mod:`rotator.revoke.driver`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog

from backends.base import Backend
from rotator import faults
from rotator.errors import (
    BackendError,
    MakiniError,
    MakiniRejected,
    RotationError,
)
from rotator.journal import Lease, Rotation
from rotator.makini import MakiniClient
from rotator.makini.client import Issued
from rotator.model import Secret, StoredVersion
from rotator.rotation import unaccounted
from rotator.rotation.engine import RotationEngine
from rotator.rotation.environment import EnvironmentRuntime
from rotator.rotation.sealing import seal, unseal
from rotator.settings import CredentialSettings

from . import custody, kill
from .accounting import account_for, short
from .model import (
    CredentialReport,
    Record,
)
from .reads import read_by_id

log = structlog.get_logger("rotator.revoke")


class RevokeContext:
    """The state of one revoke row being driven. The caller holds ``lease`` (kept alive by
    the engine's heartbeat)."""

    def __init__(
        self,
        engine: RotationEngine,
        rt: EnvironmentRuntime,
        cred: CredentialSettings,
        row: Rotation,
        record: Record,
        lease: Lease,
        report: CredentialReport,
        *,
        old: StoredVersion | None = None,
        fresh: bool = False,
        last: bool = False,
    ) -> None:
        """``old``: the revoked version's tokens when the caller has read them; ``fresh``: the
        row was just written with its first attempt to get a token counted; ``last``: nothing
        follows the revoke under the lease, so its last record gives the lease back with it
        (a crash right after that record leaves no stalled lease behind)."""
        self.engine = engine
        self.journal = engine.journal
        self.rt = rt
        self.cred = cred
        self.row = row
        self.record = record
        self._recorded = record.to_dict()
        self.lease = lease
        self.report = report
        self.request_ids: list[str | None] = []
        self._old = old
        self._fresh = fresh
        self._last = last
        self._replacement: StoredVersion | None = None
        self._retried = False
        self._kill_started: float | None = None
        self._pending_notes: list[str] = []
        self._asked_at: Any = row.asked_at
        self._unaccounted = 0
        """Unaccounted tokens this revoke recorded (the issue that follows may resolve them)."""
        self._pending: list[tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]] = []
        """Step values, state and audit entry recorded with the next commit (one write)."""
        report.revoke_id = row.id
        report.old_version = row.old_version_id
        report.old_fingerprint = short(row.old_fingerprint)
        report.method = self.record.method
        report.superseded = [s.id for s in self.record.superseded]

    @property
    def makini(self) -> MakiniClient:
        return self.rt.makini

    @property
    def where(self) -> str:
        return f"{self.rt.name}/{self.cred.name}"

    # pre-empted rotations' tokens --------------------------------------------------------------

    async def _candidates(self) -> list[tuple[str, StoredVersion]]:
        """Tokens that pre-empted rotations hold (sealed), not adopted: newest first."""
        out = []
        for s in reversed(self.record.superseded):
            if s.id == self.record.adopted:
                continue
            rot = await self.engine.worker.journal(self.journal.rotation, s.id)
            if rot is not None and rot.sealed is not None:
                out.append((rot.id, self._unseal(rot)))
        return out

    async def _adopt_any(self) -> StoredVersion | None:
        for rotation_id, version in await self._candidates():
            if await self._accepted(version):
                await self._adopt(rotation_id, version, self.row.step)
                return version
        return None

    async def _adopt(self, rotation_id: str, version: StoredVersion, step: str) -> Rotation:
        note = (
            f"adopted the token {version.tokens.access.short} of pre-empted rotation "
            f"{rotation_id[:8]} as the replacement"
        )
        self.row = await self.engine.worker.journal(
            custody.adopt,
            self.journal,
            self.lease.key,
            self.row.id,
            rotation_id,
            self.record,
            step,
            note,
        )
        await self.engine.worker.journal(
            self.journal.audit,
            actor=self.row.actor,
            action="revoke.adopted",
            outcome="success",
            environment=self.rt.name,
            credential=self.cred.name,
            version_id=version.version_id,
            fingerprint=version.tokens.access.fingerprint,
            rotation_id=rotation_id,
        )
        self._replacement = version
        self.report.adopted_from = rotation_id
        self.report.notes.append(note)
        return self.row

    async def _settle_candidates(self) -> None:
        """Account for every token a pre-empted rotation holds that the revoke did not adopt."""
        rows = []
        for s in self.record.superseded:
            if s.id != self.record.adopted:
                rot = await self.engine.worker.journal(self.journal.rotation, s.id)
                if rot is not None and rot.sealed is not None:
                    rows.append(rot)
        await account_for(
            self.engine,
            self.rt,
            self.cred,
            rows,
            actor=self.row.actor,
            disconnected=self.record.disconnected,
            report=self.report,
        )

    # plumbing ----------------------------------------------------------------------------------

    async def _obtain(self, method: str, candidates: list[tuple[str, StoredVersion]]) -> Issued:
        """A new token pair from Makini (refresh sources: a pre-empted rotation's pair, the
        current one, the old one)."""
        if self._fresh:
            self._fresh = False  # the row was written with this first attempt counted
        else:
            if self.row.asked_at is not None:
                self._note(
                    "an earlier attempt to get a new token got no answer; if Makini issued one "
                    "then, it was never received (issuing again kills it where issuing "
                    "invalidates)"
                )
                unanswered = self._lost(
                    self.row.asked_at,
                    "the rotator stopped after it asked Makini for a token (for an emergency "
                    "revoke) and before it recorded the answer: if the request reached Makini, "
                    "a token was issued that no backend holds",
                )
                self.row = await self._commit({"asked_at": None}, lost=unanswered)
                await unaccounted.outlast(
                    self.rt.settings.makini, unanswered.asked_at, clock=self.engine.clock
                )
                await self._fence()
            self.row = await self._commit(
                {"attempts": self.row.attempts + 1, "asked_at": self.engine.clock.now()}
            )
        # stamped after every unaccounted entry recorded so far: the request goes out after
        # them all (where Makini kills older tokens on issue, a token it brings kills theirs)
        self._asked_at = self.engine.clock.now()
        sources: list[Secret] = []
        if method == "refresh":
            current = None
            if self.record.current_version is not None:
                current = await self.engine.worker.call(
                    read_by_id, self.rt.backends, self.cred.name, self.record.current_version
                )
            for v in [*(c for _, c in candidates), current, self._old]:
                if (
                    v is not None
                    and v.tokens.refresh is not None
                    and v.tokens.refresh not in sources
                ):
                    sources.append(v.tokens.refresh)
        try:
            issued, notes = await kill.obtain(self.makini, self.cred, method, sources)
        except MakiniError as exc:
            lost = None
            if exc.ambiguous:
                self._note(
                    f"Makini may have issued a token that was not received ({exc.message}; "
                    f"request id {exc.request_id or 'unknown'})"
                )
                lost = self._lost(
                    self._asked_at or self.engine.clock.now(),
                    f"Makini may have issued a token that was not received ({exc.message})",
                    request_id=exc.request_id,
                )
            await self._commit({"asked_at": None}, lost=lost)
            raise
        for note in notes:
            self._note(note)
        self.request_ids.append(issued.request_id)
        return issued

    async def _seal(self, issued: Issued, step: str) -> Rotation:
        vid = self.row.version_id
        version = StoredVersion(
            self.rt.name, self.cred.name, vid, issued.tokens, created_at=self.engine.clock.now()
        )
        row = await self._commit(
            {
                "step": step,
                "sealed": seal(self.rt, version),
                "fingerprint": issued.tokens.access.fingerprint,
                "expires_at": issued.tokens.expires_at,
                "asked_at": None,
            },
            after=self._settle_unaccounted(issued),
            audit={
                "action": "revoke.token_issued",
                "outcome": "success",
                "version_id": vid,
                "fingerprint": issued.tokens.access.fingerprint,
                "method": self.record.method,
            },
        )
        self._replacement = version
        return row

    def _held(self) -> StoredVersion | None:
        if self._replacement is None and self.row.sealed is not None:
            self._replacement = self._unseal(self.row)
        return self._replacement if self.row.sealed is not None else None

    def _unseal(self, row: Rotation) -> StoredVersion:
        return unseal(self.rt, row)

    async def _replacement_version(self) -> StoredVersion | None:
        if self.record.replaced is None:
            return None
        if self._replacement is not None and self._replacement.version_id == self.record.replaced:
            return self._replacement
        return await self.engine.worker.call(
            read_by_id, self.rt.backends, self.cred.name, self.record.replaced
        )

    async def _target_if_readable(self) -> StoredVersion | None:
        """The old (revoked) version's tokens, from whichever backend still has them."""
        if self._old is None:
            vid = self.row.old_version_id or ""
            self._old = await self.engine.worker.call(
                read_by_id, self.rt.backends, self.cred.name, vid
            )
        return self._old

    async def _target(self) -> StoredVersion:
        old = await self._target_if_readable()
        if old is None:
            raise RotationError(
                f"the version to revoke ({self.row.old_version_id}) is no longer readable in any "
                "backend, so Makini cannot be asked about its token",
                where=self.where,
                rotation_id=self.row.id,
                hint=f"`rotator revoke {self.rt.name} {self.cred.name} --strategy disconnect` "
                "kills every token of the connection",
            )
        return old

    async def _accepted(self, version: StoredVersion) -> bool:
        try:
            return await self._accepts(version)
        except MakiniRejected:
            return False

    async def _accepts(self, version: StoredVersion) -> bool:
        return not await kill.rejected(self.makini, version.tokens.access, self.cred.connection_id)

    async def _on_backends(
        self, backends: list[Backend], fn: Callable[[Backend], str]
    ) -> dict[str, BackendError]:
        """Run ``fn`` on every backend at once, recording each one's action, error and time."""

        async def one(b: Backend) -> BackendError | None:
            entry = self.report.backend(b.name)
            started = time.monotonic()
            try:
                entry.actions.append(await self.engine.worker.call(fn, b))
            except BackendError as exc:
                entry.errors.append(exc.message)
                return exc
            finally:
                entry.duration_s += time.monotonic() - started
            return None

        results = await asyncio.gather(*(one(b) for b in backends))
        return {b.name: r for b, r in zip(backends, results, strict=True) if r is not None}

    async def _fence(self) -> None:
        await self.engine.fence(self.lease, self.where)

    def _lost(
        self, asked_at: Any, cause: str, *, request_id: str | None = None
    ) -> unaccounted.Lost:
        self._unaccounted += 1
        return unaccounted.Lost(
            environment=self.rt.name,
            credential=self.cred.name,
            connection_id=self.cred.connection_id,
            rotation_id=self.row.id,
            asked_at=asked_at,
            cause=cause,
            request_id=request_id,
        )

    def _settle_unaccounted(self, issued: Issued) -> Callable[[Any, Rotation], None] | None:
        """Where Makini kills older tokens on issue, the token just issued for the kill or the
        replacement resolves the credential's earlier unaccounted tokens."""
        invalidates = self.rt.settings.makini.issue_invalidates_previous
        if (self._unaccounted <= 0 and invalidates is not True) or self._asked_at is None:
            return None
        return unaccounted.settle_hook(
            self.journal,
            asked_at=self._asked_at,
            expires_at=issued.tokens.expires_at,
            late=timedelta(seconds=self.rt.settings.makini.timeout_s),
            invalidates=invalidates is True,
            clock=self.engine.clock,
        )

    def _resolve_disconnected(self) -> Callable[[Any, Rotation], None]:
        """Where the revoke disconnected the connection, every token of it died: the
        credential's unaccounted tokens too (resolved in the kill's transaction)."""
        why = (
            f"the connection {self.cred.connection_id} was disconnected at Makini by emergency "
            f"revoke {self.row.id[:8]}: every token of it died"
        )

        def resolve(conn: Any, row: Rotation) -> None:
            unaccounted.resolve_all(
                self.journal,
                conn,
                row.environment,
                row.credential,
                why,
                row.actor,
                clock=self.engine.clock,
            )

        return resolve

    def _note(self, note: str) -> None:
        self.report.notes.append(note)
        self._pending_notes.append(note)

    async def _commit(
        self,
        values: dict[str, Any],
        *,
        state: dict[str, Any] | None = None,
        audit: dict[str, Any] | None = None,
        note: str | None = None,
        lost: unaccounted.Lost | None = None,
        after: Callable[[Any, Rotation], None] | None = None,
        release: bool = False,
    ) -> Rotation:
        """Record a step (with the record, pending notes and a pending replacement) atomically
        with the credential's state and the audit entries, under the revoke's lease (with an
        unaccounted token to report, and more work of the same transaction); ``release``: the
        lease is given back with it."""
        if note:
            self._note(note)
        audits = []
        pending_values: dict[str, Any] = {}
        pending_state: dict[str, Any] = {}
        for p_values, p_state, p_audit in self._pending:
            pending_values.update(p_values)
            pending_state.update(p_state or {})
            audits.append(p_audit)
        self._pending = []
        values = {**pending_values, **values}
        if pending_state or state:
            state = {**pending_state, **(state or {})}
        if audit is not None:
            audits.append(audit)
        base = {"actor": self.row.actor, "request_ids": list(self.request_ids)}
        notes = self._flush_notes()
        if notes:
            values = {**values, "notes": json.dumps([*self.row.note_list(), *notes])}
        record = self.record.to_dict()
        self.row = await self.engine.worker.journal(
            custody.commit,
            self.journal,
            self.row,
            values,
            state=state,
            audits=[{**base, **a} for a in audits],
            lease=self.lease.key,
            release=release,
            after=unaccounted.recording(
                self.journal,
                lost,
                custody.with_record(self.journal, record, self._recorded, after),
                clock=self.engine.clock,
            ),
        )
        self._recorded = record
        if release:
            self.engine.leases.drop(self.lease)  # no heartbeat for a lease given back
        faults.checkpoint(self.row.step, self.cred.name)
        return self.row

    def _flush_notes(self) -> list[str]:
        notes, self._pending_notes = self._pending_notes, []
        return notes
