"""One credential's revoke, driven through its journaled steps.

``started → (issued) → killed → replaced → (purged) → done``. Like a rotation, every step first
looks at what is already done, and the journal records a step only once its effect is durable,
so a revoke that stops anywhere (crash, Makini down, a backend down) is finished by ``rotator
revoke --resume`` or by the scheduler. The steps are the methods below, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from backends.base import Backend
from rotator import faults
from rotator.errors import (
    BadRequest,
    ConfigError,
    LockBusy,
    MakiniError,
    MakiniRejected,
    RotationError,
    RotatorError,
)
from rotator.journal import Rotation, Step
from rotator.model import Stage, StoredVersion, new_version_id
from rotator.rotation.drops import record_drop

from . import kill
from .accounting import disconnected_attention
from .context import RevokeContext
from .model import (
    REVOKE_INCOMPLETE,
    REVOKED,
    REVOKED_NO_TOKEN,
    CredentialReport,
    RevokeStep,
)

log = structlog.get_logger("rotator.revoke")


class CredentialRevoke(RevokeContext):
    """Drives one revoke row. The caller holds the credential's lease."""

    async def run(self) -> CredentialReport:
        """Drive the revoke to its end, or to where it had to stop (recorded, resumable)."""
        steps: dict[str, Callable[[], Awaitable[Rotation]]] = {
            RevokeStep.STARTED: self._start_kill,
            RevokeStep.ISSUED: self._kill,
            RevokeStep.KILLED: self._replace,
            RevokeStep.REPLACED: self._purge,
            RevokeStep.PURGED: self._confirm,
        }
        started = time.monotonic()
        try:
            while self.row.step in steps:
                self.row = await steps[self.row.step]()
                faults.checkpoint(self.row.step, self.cred.name)
        except RotatorError as exc:
            await self._stopped(exc)
        finally:
            self.report.add_time("total_s", time.monotonic() - started)
            self.report.step = self.row.step
        return self.report

    # step 1a -----------------------------------------------------------------------------------

    async def _start_kill(self) -> Rotation:
        """Where the kill itself produces a token (issue, refresh), get it and seal it into the
        journal before anything else; other methods go straight to the kill.

        A pre-empted rotation's token is adopted instead when Makini already rejects the old
        token (that rotation's issue killed it) and accepts the pre-empted one: issuing again
        would only kill a good token.

        Raises MakiniError (the revoke stays at *started*; an ``ambiguous`` failure is noted:
        Makini may have issued a token that never arrived, and the next issue kills it).
        """
        self._kill_started = time.monotonic()
        await self._fence()
        if self.record.method not in ("issue", "refresh"):
            return await self._kill()
        if self.row.sealed is not None:
            return await self._commit({"step": RevokeStep.ISSUED})
        old = await self._target()
        candidates = await self._candidates()
        if candidates and await kill.rejected(
            self.makini, old.tokens.access, self.cred.connection_id
        ):
            for rotation_id, version in candidates:
                if await self._accepted(version):
                    return await self._adopt(rotation_id, version, RevokeStep.ISSUED)
        issued = await self._obtain(self.record.method, candidates)
        return await self._seal(issued, RevokeStep.ISSUED)

    # step 1b -----------------------------------------------------------------------------------

    async def _kill(self) -> Rotation:
        """Make Makini reject the old token, and probe it.

        issue/refresh have already happened (step 1a); ``revoke_path`` revokes the old pair;
        ``disconnect`` deletes the connection. Where the old token survives, ``revoke_path`` is
        tried when configured, and strategy ``auto`` then disconnects as the last resort.
        Explicit strategies never escalate: the revoke carries on (replace, purge) and reports
        the old token as alive, naming what a person can do.

        Raises MakiniError when Makini cannot be reached or refuses: the revoke stays at its
        step and a resume repeats the calls (each is idempotent).
        """
        self._kill_started = self._kill_started or time.monotonic()
        await self._fence()
        old = await self._target()
        method = self.record.method
        conn = self.cred.connection_id
        if method == "disconnect":
            dead = await self._disconnect(old)
        else:
            if method == "revoke_path" and not await self._revoke_at_path(old):
                raise ConfigError(
                    "the revoke chose makini.revoke_path, which is no longer configured",
                    where=f"environments.{self.rt.name}.makini.revoke_path",
                    hint="configure it again, or resume with another --strategy",
                )
            dead = await kill.rejected(self.makini, old.tokens.access, conn)
            if not dead and method != "revoke_path" and await self._revoke_at_path(old):
                self._note("the old token survived; it was revoked at makini.revoke_path")
                dead = await kill.rejected(self.makini, old.tokens.access, conn)
            if not dead and self.record.escalate:
                self._note(
                    f"Makini still accepted the old token after the {method}: the connection "
                    "was disconnected as the last resort (strategy auto)"
                )
                self.record.method = self.report.method = "disconnect"
                dead = await self._disconnect(old)
        faults.checkpoint("revoke-kill-effect", self.cred.name)
        values: dict[str, Any] = {"step": RevokeStep.KILLED, "invalidated_old": dead}
        state = None
        resolve = None
        if self.record.disconnected:
            values["sealed"] = None  # whatever the kill issued died with the connection
            state = {"attention": disconnected_attention(self.rt.name, self.cred)}
            resolve = self._resolve_disconnected()  # and every token nobody holds
        audit = {
            "action": "revoke.killed",
            "outcome": "success" if dead else "old_token_alive",
            "version_id": self.row.old_version_id,
            "fingerprint": self.row.old_fingerprint,
            "method": self.record.method,
            "old_token_dead": dead,
            "disconnected": self.record.disconnected,
            "at": self.engine.clock.now().isoformat(),
        }
        self.report.old_dead = dead
        self.report.disconnected = self.record.disconnected
        self.report.add_time("kill_s", time.monotonic() - self._kill_started)
        if dead and method == self.record.method and method != "disconnect":
            # the plain case: recorded with the next commit (one write less, before anything
            # is made unreadable); a crash before that resumes at the step before, whose probe
            # says the same again
            self._pending.append((values, state, audit))
            return await self._replace()
        return await self._commit(values, state=state, audit=audit, after=resolve)

    async def _disconnect(self, old: StoredVersion) -> bool:
        try:
            await self.makini.disconnect(self.cred.connection_id)
        except BadRequest as exc:
            if exc.status != 404:
                raise
            self._note("Makini answered 404 to the disconnect: the connection is already gone")
        else:
            self.record.disconnected = True
        dead = await kill.rejected(self.makini, old.tokens.access, self.cred.connection_id)
        self.record.disconnected = self.record.disconnected or dead
        return dead

    async def _revoke_at_path(self, version: StoredVersion) -> bool:
        return await kill.revoke_pair(self.makini, version.tokens)

    # step 2 ------------------------------------------------------------------------------------

    async def _replace(self) -> Rotation:
        """Verify the replacement and make it current in every backend, with no grace period.

        The replacement is the token the kill produced; else, when one is wanted (the current
        version is the target and --no-replace was not given), a pre-empted rotation's token
        Makini accepts; else a new one (issue, or refresh per the credential's method), sealed
        into the journal first. A token the kill produced is stored even with --no-replace: it
        may be the connection's only working token, and a token Makini issued is never dropped.
        Tokens of pre-empted rotations that are not adopted are killed where Makini allows,
        else reported.

        Raises MakiniError (Makini down: the revoke stays at *killed* with the replacement
        sealed) or BackendError (after trying every backend: where the replacement became
        current the old version is purged too; a resume finishes the others).
        """
        started = time.monotonic()
        await self._fence()
        version = self._held()
        if self.record.disconnected:
            version = None
        elif version is None and self.record.replace and self.record.target_stage == "current":
            version = await self._adopt_any()
            if version is None:
                issued = await self._obtain(self.cred.method, await self._candidates())
                await self._seal(issued, RevokeStep.KILLED)
                version = self._replacement
        await self._settle_candidates()
        if version is not None:
            version = await self._verified(version)
            await self._install(version)
        self._replaced_now(version)
        self.report.add_time("replace_s", time.monotonic() - started)
        return await self._purge()

    async def _verified(self, version: StoredVersion) -> StoredVersion:
        """The replacement, accepted by Makini for the right connection; a rejected one is
        dropped (it is dead) and replaced once."""
        try:
            info = await self.makini.verify(version.tokens.access, self.cred.connection_id)
        except MakiniRejected as exc:
            note = (
                f"the replacement {version.tokens.access.short} was rejected by Makini "
                f"({exc.code or exc.status}); it was dropped"
            )
            await self._commit(
                {"sealed": None, "version_id": new_version_id()},
                audit={
                    "action": "revoke.replacement_rejected",
                    "outcome": "rejected",
                    "version_id": version.version_id,
                    "fingerprint": version.tokens.access.fingerprint,
                    "error": exc.message,
                },
                note=note,
            )
            self._replacement = None
            if self.record.adopted is not None:  # its staged copy is purged like the others
                self.record.adopted = self.report.adopted_from = None
            if self._retried or self.record.method == "disconnect":
                raise RotationError(
                    f"Makini rejected the replacement token: {exc.message}",
                    where=self.where,
                    rotation_id=self.row.id,
                    hint="check the connection in Makini; a resume tries a new token",
                ) from exc
            self._retried = True
            issued = await self._obtain(self.cred.method, [])
            await self._seal(issued, self.row.step)
            assert self._replacement is not None
            return await self._verified(self._replacement)
        self.request_ids.append(info.request_id)
        self.report.replacement_accepted = True
        return version

    async def _install(self, version: StoredVersion) -> None:
        """Stage and promote ``version`` in every backend at once. Where a backend fails the
        others still get it, and the old version is purged there at once."""
        vid = version.version_id

        def install(b: Backend) -> str:
            b.stage_pending(version)
            b.promote(self.cred.name, vid)
            return f"stored {vid[-12:]} as current"

        failed = await self._on_backends(self.rt.backends, install)
        faults.checkpoint("revoke-install-effect", self.cred.name)
        if failed:
            done = [b for b in self.rt.backends if b.name not in failed]
            if done:
                await self._record_before_purge()
                await self._purge_on(done, best_effort=True)
            raise next(iter(failed.values()))

    def _replaced_now(self, version: StoredVersion | None) -> None:
        """The replacement is current everywhere: tell the readers, and keep the state and
        audit entry for the next commit (the purge follows at once; a crash before that commit
        resumes at *killed*, and every step from there is idempotent)."""
        now = self.engine.clock.now()
        state: dict[str, Any] = {"last_attempt_at": now}
        audit: dict[str, Any] = {"action": "revoke.replaced", "outcome": "success"}
        if version is not None:
            self.record.replaced = version.version_id
            state.update(
                current_version_id=version.version_id,
                current_fingerprint=version.tokens.access.fingerprint,
                expires_at=version.tokens.expires_at,
                rotated_at=now,
            )
            audit.update(
                version_id=version.version_id,
                fingerprint=version.tokens.access.fingerprint,
                adopted_from=self.record.adopted,
                backends=[b.name for b in self.rt.backends],
                expires_at=version.tokens.expires_at,
            )
        else:
            audit["outcome"] = "no_replacement"
            if self.record.target_stage == "current" or self.record.disconnected:
                state.update(current_version_id=None, current_fingerprint=None, expires_at=None)
        values = {"step": RevokeStep.REPLACED, "sealed": None}
        self._pending.append((values, state, audit))
        if version is not None:
            self.report.replacement_version = version.version_id
            self.report.replacement_fingerprint = version.tokens.access.short
            current = version.with_stage(Stage.CURRENT)
            self.engine.events.promoted.publish(self.rt.name, self.cred.name, current)

    # step 3 ------------------------------------------------------------------------------------

    async def _purge(self) -> Rotation:
        """Make the old version unreadable in every backend, with every version a pre-empted
        rotation left behind and the former current version where it was replaced; tell the
        readers' caches at once (the engine's ``revoked`` events); drop every sealed copy from
        the journal.

        The replacement is re-asserted as current afterwards: a pre-empted worker's last write
        may have labelled its own version current meanwhile. Raises BackendError after trying
        every backend; the revoke stays at *replaced* and a resume repeats (idempotent).
        """
        started = time.monotonic()
        await self._fence()
        await self._target_if_readable()  # the old token, held in memory for the confirmation
        await self._record_before_purge()
        await self._purge_on(self.rt.backends, best_effort=False)
        faults.checkpoint("revoke-purge-effect", self.cred.name)
        await self._settle_candidates()
        self.report.add_time("purge_s", time.monotonic() - started)
        return await self._confirm()

    async def _record_before_purge(self) -> None:
        """Record the steps done so far (the kill and its probe, the replacement) before
        anything is made unreadable: a resume after the purge can no longer read the old token,
        so it must never have to go back to a step that needs it."""
        if self._pending:
            await self._commit({})

    def _purge_list(self) -> list[str]:
        record, row = self.record, self.row
        vids = [row.old_version_id]
        if record.replaced and record.current_version not in (None, row.old_version_id):
            vids.append(record.current_version)
        for s in record.superseded:
            if s.step in (Step.PROMOTED, Step.RETIRING):
                vids.append(s.old_version_id)  # its previous, in its grace period
            elif s.id != record.adopted:
                vids.append(s.version_id)  # its pending version
        out: list[str] = []
        for vid in vids:
            if vid and vid != record.replaced and vid not in out:
                out.append(vid)
        return out

    async def _purge_on(self, backends: list[Backend], *, best_effort: bool) -> None:
        vids = self._purge_list()
        replaced = self.record.replaced

        def purge(b: Backend) -> str:
            for vid in vids:
                b.make_unreadable(self.cred.name, vid)
            if replaced is not None and self.record.superseded:
                b.promote(self.cred.name, replaced)  # a pre-empted worker's last write lost
            return "made unreadable: " + ", ".join(v[-12:] for v in vids)

        failed = await self._on_backends(backends, purge)
        for vid in vids:
            # every serving replica on this journal stops serving it, wherever this revoke runs
            await self.engine.worker.journal(
                record_drop, self.engine.journal, self.rt.name, self.cred.name, vid
            )
            self.engine.events.revoked.publish(self.rt.name, self.cred.name, vid)
        if failed and not best_effort:
            raise next(iter(failed.values()))

    # step 4 ------------------------------------------------------------------------------------

    async def _confirm(self) -> Rotation:
        """Ask Makini with the old token and expect a 401; check that the replacement works.

        A resume in another process no longer holds the old token (it was purged) and reports
        the probe made right after the kill instead. Raises MakiniError when Makini cannot
        answer: the revoke is recorded at *purged* and a resume asks again.
        """
        started = time.monotonic()
        old = self._old
        replacement = None
        if not self.report.replacement_accepted:  # not verified by this run yet
            replacement = await self._replacement_version()
        conn = self.cred.connection_id

        async def old_rejected() -> bool | None:
            return await kill.rejected(self.makini, old.tokens.access, conn) if old else None

        async def new_accepted() -> bool | None:
            return await self._accepts(replacement) if replacement else None

        try:
            old_dead, accepted = await asyncio.gather(old_rejected(), new_accepted())
        except MakiniError:
            if self.row.step != RevokeStep.PURGED:
                await self._commit(
                    {"step": RevokeStep.PURGED},
                    audit={"action": "revoke.purged", "outcome": "success"},
                )
            raise
        if old_dead is None:
            old_dead = self.row.invalidated_old
            self._note(
                "the old token was purged before this run: the confirmation is the probe "
                "made right after the kill"
            )
        self.report.old_dead = old_dead
        if accepted is not None:
            self.report.replacement_accepted = accepted
        accepted = self.report.replacement_accepted
        self.report.add_time("confirm_s", time.monotonic() - started)
        return await self._finish(bool(old_dead), accepted)

    async def _finish(self, old_dead: bool, accepted: bool | None) -> Rotation:
        env, name = self.rt.name, self.cred.name
        report = self.report
        no_token = self.record.replaced is None and (
            self.record.target_stage == "current" or self.record.disconnected
        )
        error = None
        attention = None
        if not old_dead:
            error = "Makini still accepts the old token: it could not be made invalid"
            attention = (
                f"the revoked token {report.old_fingerprint} still works at Makini; "
                f"`rotator revoke {env} {name} --strategy disconnect` kills it (the customer "
                "must reconnect), or configure makini.revoke_path"
            )
            report.next(attention)
        if accepted is False:
            error = error or "Makini rejects the replacement"
            report.next(f"the replacement does not work: `rotator rotate {env} {name}`")
        if self.record.disconnected:
            attention = disconnected_attention(env, self.cred)
            report.next(attention)
        elif no_token:
            attention = attention or (
                f"revoked with no replacement: {env}/{name} has no current token; "
                f"`rotator rotate {env} {name}` issues one"
            )
            report.next(f"`rotator rotate {env} {name}` issues a new token when wanted")
        report.outcome = "revoked" if old_dead else "unconfirmed"
        report.error = error
        report.step = RevokeStep.DONE
        now = self.engine.clock.now()
        return await self._commit(
            {
                "step": RevokeStep.DONE,
                "finished_at": now,
                "error": error,
                "invalidated_old": old_dead,
            },
            state={
                "last_attempt_at": now,
                "last_outcome": REVOKED_NO_TOKEN if no_token else REVOKED,
                "last_error": error,
                "attention": attention,
            },
            audit={
                "action": "revoke.completed",
                "outcome": report.outcome,
                "version_id": self.row.old_version_id,
                "fingerprint": self.row.old_fingerprint,
                "reason": self.row.reason,
                "report": report.as_dict(),
            },
            release=self._last,
        )

    # stopping ----------------------------------------------------------------------------------

    async def _stopped(self, exc: RotatorError) -> None:
        """Record why the revoke stopped, loudly, where ``rotator status`` shows it."""
        report = self.report
        report.error = exc.message
        env, name = self.rt.name, self.cred.name
        if isinstance(exc, LockBusy):
            report.outcome = "busy"
            report.next("another worker took this credential over; `rotator status` shows it")
            return
        report.outcome = "incomplete"
        step = self.row.step
        alive = step in (RevokeStep.STARTED, RevokeStep.ISSUED) and report.old_dead is not True
        attention = (
            f"emergency revoke {self.row.id[:8]} stopped at {step}: {exc.message}"
            + ("; the compromised token may still work at Makini" if alive else "")
            + f"; finish it: `rotator revoke {env} {name} --resume`"
        )
        cause = exc.hint or exc.message
        report.next(f"fix the cause ({cause}), then `rotator revoke {env} {name} --resume`")
        log.error("revoke.stopped", environment=env, credential=name, step=step, error=exc.message)
        try:
            await self._commit(
                {"error": exc.message},
                state={
                    "attention": attention,
                    "last_outcome": REVOKE_INCOMPLETE,
                    "last_error": exc.message,
                    "last_attempt_at": self.engine.clock.now(),
                },
                audit={
                    "action": "revoke.stopped",
                    "outcome": "incomplete",
                    "step": step,
                    "error": exc.message,
                    "report": report.as_dict(),
                },
            )
        except RotatorError as again:
            log.error("revoke.unrecorded", environment=env, credential=name, error=again.message)
