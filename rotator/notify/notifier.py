"""The notifier: finds conditions someone must act on, records them in the journal, and
delivers their notifications.

* **Events** (a rotation failed or rolled back, or rotated again) come from the engine's
  ``result`` channel and are recorded right after the drive ends.
* **States** (attention, near expiry, drift, an emergency revoke open, finished or
  unconfirmed; and a failed last rotation, again, from the journal, in case an event was lost)
  are evaluated by :meth:`Notifier.evaluate`: every ``notify.evaluate_every`` in ``serve`` and
  once at the end of ``run-due``.

A condition is notified once when it starts and once when it resolves
(:func:`rotator.notify.outbox.apply`). :meth:`Notifier.deliver` sends what the outbox holds,
each sink within its rate limit, and puts a failed delivery back with a backoff; a notification
nothing delivered for ``notify.give_up_after`` is dropped, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from rotator.aio import woken
from rotator.errors import ConfigError, JournalError
from rotator.journal.schema import NotifyCondition, NotifyOutbox, Rotation
from rotator.notify import outbox
from rotator.notify.notice import Condition, Notice
from rotator.notify.outbox import Change, Key
from rotator.notify.settings import AlertmanagerSink, NotifySettings
from rotator.notify.sinks import AlertmanagerSender, DeliveryError, Sender, build
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from rotator.rotation.schedule import human
from rotator.rotation.status import CredentialStatus, collect
from rotator.rotation.work import Outcome, RotationResult
from rotator.scrub import scrub

log = structlog.get_logger("rotator.notify")

FAILING = frozenset({"error", "failed", "rolled_back"})
"""``credential_state.last_outcome`` values of a last rotation that failed"""
SUCCEEDED = frozenset({"rotated", "imported", "revoked"})
"""... and of one after which the credential has a fresh working token"""
RATE_WINDOW = timedelta(minutes=1)
BACKOFF_FIRST = timedelta(seconds=2)
BACKOFF_MAX = timedelta(minutes=5)


def backoff(attempts: int) -> timedelta:
    """How long a notification waits after its ``attempts``-th failed attempt (exponential,
    capped, with up to a quarter of jitter)."""
    wait: timedelta = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** min(attempts - 1, 20)))
    return wait * (1 + random.uniform(0, 0.25))


class Notifier:
    """Notifications of the environments a runtime serves, delivered through their sinks."""

    def __init__(self, runtime: Runtime, *, poll_s: float = 1.0) -> None:
        self.runtime = runtime
        self.journal = runtime.journal
        self.clock = runtime.engine.clock
        self.poll_s = poll_s
        self._senders: dict[tuple[str, str], Sender] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resent: dict[tuple[str, str], datetime] = {}
        self._evaluate_now = False
        self._drift_at: float | None = None

    def settings(self, environment: str) -> NotifySettings | None:
        """The environment's notify table, where this runtime serves it and it has sinks."""
        if environment not in self.runtime.environments:
            return None
        env = self.runtime.config.environments.get(environment)
        return env.notify if env is not None and env.notify.sinks else None

    # recording -----------------------------------------------------------------------------

    def listen(self) -> None:
        """Subscribe to the engine: drive results, and revokes (which ``run`` then evaluates
        at once)."""
        self.runtime.engine.events.result.subscribe(self.on_result)
        self.runtime.engine.events.revoked.subscribe(self.on_revoked)

    def unlisten(self) -> None:
        events = self.runtime.engine.events
        with contextlib.suppress(ValueError):
            events.result.unsubscribe(self.on_result)
        with contextlib.suppress(ValueError):
            events.revoked.unsubscribe(self.on_revoked)

    def on_revoked(self, environment: str, credential: str, version_id: str) -> None:
        self._evaluate_now = True
        self._wake_up()

    def _wake_up(self) -> None:
        """Wake ``run`` (from its loop or from a worker thread)."""
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def on_result(self, result: RotationResult) -> None:
        """A drive ended: a failure or a rollback starts ``rotation_failed``, a rotation ends it.
        Recorded on a worker thread right away (the engine's loop does not wait for it)."""
        change = _from_result(result)
        if change is None or self.settings(change.environment) is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.record(change)
            return
        task = loop.create_task(self._record_soon(change))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record_soon(self, change: Change) -> None:
        try:
            await asyncio.to_thread(self.record, change)
        except JournalError as exc:  # the periodic evaluation finds it again from the journal
            log.warning("notify.unrecorded", condition=change.condition, error=exc.message)

    def record(self, change: Change) -> bool:
        """Turn a condition on or off and queue its notifications; False if it already was."""
        settings = self.settings(change.environment)
        if settings is None:
            return False
        sinks = [s.name for s in settings.sinks if s.wants(change.condition)]
        done = outbox.apply(self.journal, change, sinks, self.clock.now())
        if done:
            log.info(
                "notify.condition",
                environment=change.environment,
                credential=change.credential,
                condition=change.condition,
                state="firing" if change.firing else "resolved",
                sinks=sinks,
            )
            self._wake_up()
        return done

    async def evaluate(self, *, drift: bool = True) -> int:
        """Look at every credential's state now; record what started or resolved. ``drift``:
        read every backend too, to find ones that disagree (otherwise the journal alone is
        read, and drift is left as it was). Returns how many conditions changed."""
        envs = [name for name in self.runtime.environments if self.settings(name) is not None]
        if not envs:
            return 0
        # the conditions first, the states after: a state that changes meanwhile (a drive
        # resolving its failure) is then newer than what is compared with it, never older
        known = await asyncio.to_thread(outbox.conditions, self.journal)
        views: list[View] = []
        if drift:
            for env in envs:
                views.extend(View.of(s) for s in await collect(self.runtime, env))
        else:
            views = await asyncio.to_thread(_journal_views, self.runtime, envs)
        revokes = await asyncio.to_thread(outbox.latest_revokes, self.journal)
        on = {key for key, row in known.items() if row.active}
        now = self.clock.now()
        changed = 0
        for view in views:
            settings = self.settings(view.environment)
            assert settings is not None
            where = (view.environment, view.credential)
            revoke = revokes.get(where)
            seen = known.get((*where, Condition.REVOKE))
            revoke_seen = (
                seen is not None and revoke is not None and (seen.started_at >= revoke.started_at)
            )
            offboarded = view.credential in self.runtime.environments[
                view.environment].settings.offboarded
            for change in _changes(view, revoke, revoke_seen, settings, now):
                if offboarded and change.firing and change.condition in _NOT_ROTATED:
                    # never rotated again: its expiry is the off-boarding's business
                    change = replace(change, firing=False,
                                     detail="off-boarded: it is rotated no more")
                if change.firing == (change.key in on):
                    continue  # already so: nothing to write
                changed += await asyncio.to_thread(self.record, change)
                (on.add if change.firing else on.discard)(change.key)
        for env in envs:
            changed += await self._offboarding(env, on)
        await asyncio.to_thread(outbox.purge, self.journal, now - outbox.KEEP)
        return changed

    async def _offboarding(self, environment: str, on: set[Key]) -> int:
        """An off-boarding (discovery found the connection gone at Makini) is a condition: it
        starts when discovery off-boards the credential and is over once the credential is
        purged (its tokens made unreadable after ``discover.offboard_grace``) or enrolled
        again (Makini lists the connection again)."""
        env = self.runtime.environments[environment].settings
        changed = 0
        for row in await asyncio.to_thread(discovery.rows, self.journal, environment):
            change = _offboarding(environment, env.discover.offboard_grace, row)
            if change.firing == (change.key in on):
                continue
            changed += await asyncio.to_thread(self.record, change)
            (on.add if change.firing else on.discard)(change.key)
        return changed

    # delivering ----------------------------------------------------------------------------

    def _sender(self, environment: str, sink_name: str) -> Sender | None:
        """The sink's sender, built once (its secret read then); None: no such sink now."""
        key = (environment, sink_name)
        if key not in self._senders:
            settings = self.settings(environment)
            for index, sink in enumerate(settings.sinks if settings else []):
                if sink.name == sink_name:
                    where = f"environments.{environment}.notify.sinks[{index}]"
                    self._senders[key] = build(sink, where)
                    break
            else:
                return None
        return self._senders[key]

    async def deliver(self) -> int:
        """One round: claim what is due, send it within each sink's rate limit. Returns how
        many rows were attempted (deferred by a rate limit: not counted)."""
        now = self.clock.now()
        rows = await asyncio.to_thread(outbox.claim, self.journal, now, self._window())
        if not rows:
            return 0
        sent: dict[tuple[str, str], list[datetime]] = {}
        down: dict[tuple[str, str], datetime] = {}
        attempted = 0
        for row in rows:
            key = (row.environment, row.sink)
            if key in down:  # failed just now: the rest of its rows wait with it
                await asyncio.to_thread(outbox.finish, self.journal, row, next_at=down[key])
                continue
            if key not in sent:
                sent[key] = await asyncio.to_thread(
                    outbox.delivered_since,
                    self.journal,
                    row.environment,
                    row.sink,
                    now - RATE_WINDOW,
                )
            wait = self._over_limit(row, sent[key], now)
            if wait is not None:
                await asyncio.to_thread(outbox.finish, self.journal, row, next_at=wait)
                continue
            attempted += 1
            delivered, retry_at = await self._attempt(row, now)
            if delivered:
                sent[key].append(self.clock.now())
            elif retry_at is not None:
                down[key] = retry_at
        return attempted

    def _window(self) -> timedelta:
        longest = max(
            (sink.timeout_s for s in self._all_settings() for sink in s.sinks), default=10.0
        )
        return timedelta(seconds=max(60.0, 4 * longest))

    def _over_limit(
        self, row: NotifyOutbox, sent: list[datetime], now: datetime
    ) -> datetime | None:
        settings = self.settings(row.environment)
        sink = next((s for s in settings.sinks if s.name == row.sink), None) if settings else None
        if sink is None or len(sent) < sink.rate_limit:
            return None
        log.info("notify.rate_limited", environment=row.environment, sink=row.sink)
        return sent[-sink.rate_limit] + RATE_WINDOW

    async def _attempt(self, row: NotifyOutbox, now: datetime) -> tuple[bool, datetime | None]:
        """Send one row: (delivered, when to try again if it failed and is not dropped)."""
        bound = log.bind(
            environment=row.environment,
            credential=row.credential,
            condition=row.condition,
            sink=row.sink,
            state="firing" if row.firing else "resolved",
            id=row.id,
        )
        attempts = row.attempts + 1
        try:
            sender = self._sender(row.environment, row.sink)
            if sender is None:
                await asyncio.to_thread(
                    outbox.finish,
                    self.journal,
                    row,
                    status=outbox.DEAD,
                    attempts=attempts,
                    last_error="the sink is no longer configured",
                )
                bound.warning("notify.dropped", reason="the sink is no longer configured")
                return False, None
            await sender.send(Notice.from_json(row.notice), f"rotator-{row.id}", now)
        except (DeliveryError, ConfigError) as exc:
            error = scrub(exc.message, limit=500)
            settings = self.settings(row.environment)
            give_up = settings.give_up_after if settings else timedelta(0)
            if now - row.created_at >= give_up:
                await asyncio.to_thread(
                    outbox.finish,
                    self.journal,
                    row,
                    status=outbox.DEAD,
                    attempts=attempts,
                    last_error=error,
                )
                bound.error("notify.dropped", error=error, attempts=attempts)
                return False, None
            retry_at = self.clock.now() + backoff(attempts)
            await asyncio.to_thread(
                outbox.finish,
                self.journal,
                row,
                attempts=attempts,
                last_error=error,
                next_at=retry_at,
            )
            bound.warning(
                "notify.failed", error=error, attempts=attempts, retry_at=retry_at.isoformat()
            )
            return False, retry_at
        await asyncio.to_thread(
            outbox.finish,
            self.journal,
            row,
            status=outbox.DELIVERED,
            attempts=attempts,
            delivered_at=self.clock.now(),
            last_error=None,
        )
        bound.info("notify.delivered", attempts=attempts)
        return True, None

    async def resend_firing(self, *, force: bool = False) -> None:
        """Send Alertmanager sinks the alerts that still fire, every ``resend`` (Alertmanager
        ends an alert at its ``endsAt`` unless it hears of it again)."""
        now = self.clock.now()
        on: dict[Key, NotifyCondition] | None = None
        for env in self.runtime.environments:
            settings = self.settings(env)
            for sink in settings.sinks if settings else []:
                if not isinstance(sink, AlertmanagerSink):
                    continue
                last = self._resent.get((env, sink.name))
                if not force and last is not None and now - last < sink.resend:
                    continue
                self._resent[(env, sink.name)] = now
                if on is None:
                    on = await asyncio.to_thread(
                        lambda: outbox.conditions(self.journal, active_only=True)
                    )
                notices = [
                    _notice(row)
                    for (e, _, cond), row in on.items()
                    if e == env and sink.wants(cond)
                ]
                sender = self._sender(env, sink.name)
                if not notices or not isinstance(sender, AlertmanagerSender):
                    continue
                try:
                    await sender.resend(notices, now)
                except DeliveryError as exc:
                    log.warning(
                        "notify.resend_failed", environment=env, sink=sink.name, error=exc.message
                    )

    # running -------------------------------------------------------------------------------

    async def flush(self, timeout_s: float = 30.0) -> int:
        """``run-due``'s end: record what the drives reported, evaluate the states, deliver
        what is due (for at most ``timeout_s``); what is left stays queued for the next run or
        ``serve``. Returns how many rows were attempted."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        attempted = 0
        try:
            async with asyncio.timeout(timeout_s):
                await self.evaluate()
                while n := await self.deliver():
                    attempted += n
                await self.resend_firing(force=True)
        except TimeoutError:
            log.warning("notify.flush_timeout", timeout_s=timeout_s)
        return attempted

    async def run(self) -> None:
        """``serve``'s loop: deliver as soon as something is queued (at least every
        ``poll_s``), evaluate the states every ``notify.evaluate_every``. Runs until cancelled."""
        if not any(self._all_settings()):
            return  # no sink anywhere: nothing to look at
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        next_eval = loop.time()
        every = min((s.evaluate_every.total_seconds() for s in self._all_settings()), default=60.0)
        while True:
            if self._evaluate_now or loop.time() >= next_eval:
                self._evaluate_now = False
                next_eval = loop.time() + every
                await self._guarded("evaluate", self._evaluate_due)
            await self._guarded("deliver", self._deliver_all)
            await woken(self._wake, self.poll_s)
            self._wake.clear()

    async def _guarded(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the journal or a peer may come back
            log.warning(
                f"notify.{what}_failed",
                error=type(exc).__name__,
                detail=scrub(getattr(exc, "message", ""), limit=300),
            )

    async def _evaluate_due(self) -> None:
        loop = asyncio.get_running_loop()
        every = min((s.drift_every.total_seconds() for s in self._all_settings()), default=900.0)
        drift = self._drift_at is None or loop.time() >= self._drift_at
        if drift:
            self._drift_at = loop.time() + every
        await self.evaluate(drift=drift)
        await self.resend_firing()

    async def _deliver_all(self) -> None:
        while await self.deliver():
            pass

    def _all_settings(self) -> Iterator[NotifySettings]:
        for name in self.runtime.environments:
            settings = self.settings(name)
            if settings is not None:
                yield settings

    async def aclose(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        for sender in self._senders.values():
            await sender.aclose()
        self._senders.clear()


# --- what a state or an event means ----------------------------------------------------------


def _from_result(result: RotationResult) -> Change | None:
    env, cred = result.environment, result.credential
    if result.outcome in (Outcome.FAILED, Outcome.ROLLED_BACK):
        what = "rolled back" if result.outcome == Outcome.ROLLED_BACK else "failed"
        step = f" at step {result.step}" if result.step else ""
        detail = f"the rotation {what}{step}: {scrub(result.error or 'no error recorded')}"
        return Change(env, cred, Condition.ROTATION_FAILED, True, detail)
    if result.outcome == Outcome.ROTATED:
        version = f" to version {result.version_id}" if result.version_id else ""
        return Change(env, cred, Condition.ROTATION_FAILED, False, f"rotated{version}")
    return None


@dataclass(frozen=True)
class View:
    """What the conditions are decided from, for one credential."""

    environment: str
    credential: str
    current_version: str | None
    expires_at: datetime | None
    last_outcome: str | None
    last_error: str | None
    attention: str | None
    busy: bool
    """a rotation or a revoke is open: the backends may disagree on purpose for a moment"""
    backends: dict[str, str | None] | None
    """the current version id in each backend; None: not read this time"""
    backends_agree: bool = True

    @classmethod
    def of(cls, s: CredentialStatus) -> View:
        return cls(
            s.environment,
            s.credential,
            s.current_version,
            s.expires_at,
            s.last_outcome,
            s.last_error,
            s.attention,
            s.open_step is not None or s.open_revoke is not None,
            s.backends,
            s.backends_agree,
        )


def _journal_views(runtime: Runtime, environments: list[str]) -> list[View]:
    """Views from the journal alone (no backend read)."""
    journal = runtime.journal
    states = journal.states()
    busy = {(r.environment, r.credential) for r in journal.open_rotations()}
    busy |= {(r.environment, r.credential) for r in journal.open_revokes()}
    views = []
    for env in environments:
        for cred in runtime.environments[env].settings.credentials:
            key = (env, cred.name)
            state = states.get(key)
            views.append(
                View(
                    env,
                    cred.name,
                    state.current_version_id if state else None,
                    state.expires_at if state else None,
                    state.last_outcome if state else None,
                    state.last_error if state else None,
                    state.attention if state else None,
                    key in busy,
                    None,
                )
            )
    return views


def _changes(
    s: View,
    revoke: Rotation | None,
    revoke_seen: bool,
    settings: NotifySettings,
    now: datetime,
) -> Iterator[Change]:
    """What the state of one credential says about each condition (firing or not); a condition
    whose state cannot be told now (a rotation in flight for drift) is left out. A revoke that
    started and finished between two looks (``revoke_seen`` false) is notified as started,
    then as finished."""
    env, cred = s.environment, s.credential

    def change(condition: Condition, firing: bool, detail: str) -> Change:
        return Change(env, cred, condition, firing, scrub(detail, limit=1000))

    yield change(Condition.ATTENTION, bool(s.attention), s.attention or "attention cleared")

    if s.expires_at is not None and s.current_version is not None:
        left = s.expires_at - now
        if left <= settings.near_expiry:
            when = f"in {human(left)}" if left.total_seconds() > 0 else f"{human(-left)} ago"
            last = f"; the last attempt: {s.last_outcome}" if s.last_outcome else ""
            error = f" ({s.last_error})" if s.last_error else ""
            yield change(
                Condition.NEAR_EXPIRY,
                True,
                f"version {s.current_version} expires at {s.expires_at.isoformat()} ({when}) "
                f"and no rotation has replaced it{last}{error}; `rotator status` says why",
            )
        else:
            yield change(
                Condition.NEAR_EXPIRY,
                False,
                f"version {s.current_version} expires at {s.expires_at.isoformat()}",
            )

    if s.last_outcome in FAILING:
        yield change(
            Condition.ROTATION_FAILED,
            True,
            f"the last rotation ended {s.last_outcome}: {s.last_error or 'no error recorded'}",
        )
    elif s.last_outcome in SUCCEEDED:
        yield change(Condition.ROTATION_FAILED, False, f"last outcome: {s.last_outcome}")

    if s.backends is not None and not s.busy:
        held = ", ".join(f"{b}: {v or 'none'}" for b, v in sorted(s.backends.items()))
        if s.backends_agree:
            yield change(Condition.DRIFT, False, f"every backend holds {s.current_version}")
        else:
            yield change(
                Condition.DRIFT,
                True,
                f"the journal's current version is {s.current_version}; the backends hold "
                f"{held}; `rotator sync {env} {cred}` repairs it",
            )

    if revoke is not None:
        reason = f" (reason: {revoke.reason})" if revoke.reason else ""
        started = (
            f"emergency revoke {revoke.id[:8]} of version {revoke.old_version_id} by "
            f"{revoke.actor or 'unknown'}{reason}"
        )
        if revoke.finished_at is None:
            yield change(Condition.REVOKE, True, f"{started}, at step {revoke.step}")
        else:
            if not revoke_seen:
                yield change(Condition.REVOKE, True, started)
            confirmed = bool(revoke.invalidated_old)
            outcome = (
                "the old token is confirmed invalid at Makini"
                if confirmed
                else f"UNCONFIRMED: {revoke.error or 'Makini may still accept the old token'}"
            )
            yield change(
                Condition.REVOKE,
                False,
                f"emergency revoke {revoke.id[:8]} of version {revoke.old_version_id} finished "
                f"({revoke.step}): {outcome}",
            )
            unconfirmed = not confirmed and bool(s.attention)
            yield change(
                Condition.REVOKE_UNCONFIRMED,
                unconfirmed,
                (s.attention or "") if unconfirmed else "the attention on it was cleared",
            )


_NOT_ROTATED = frozenset({Condition.NEAR_EXPIRY, Condition.ROTATION_FAILED})
"""Conditions of a credential's rotations, which an off-boarded credential no longer has."""


def _offboarding(environment: str, grace: timedelta, row: discovery.Known) -> Change:
    """The off-boarding condition of one discovered connection, as its row says."""
    where = f"connection {row.connection_id}"
    described = " ".join(dict.fromkeys(p for p in (row.platform, row.company, row.name) if p))
    if described:
        where += f" ({described})"
    if row.status == discovery.OFFBOARDED:
        since = row.gone_at.isoformat(timespec="seconds") if row.gone_at else "unknown"
        until = (
            (row.gone_at + grace).isoformat(timespec="seconds") if row.gone_at else "the grace"
        )
        detail = (
            f"{where} is no longer listed by Makini (gone, or filtered out) since {since}: "
            f"{row.credential} is rotated no more; its tokens stay readable until {until}, then "
            "are made unreadable in every backend (nothing is deleted at Makini). If that is "
            "not expected, check the connection in Makini: once listed again it is enrolled "
            "again at the next discovery"
        )
        firing = True
    elif row.status == discovery.PURGED:
        detail = f"{where} stays gone: the tokens of {row.credential} are unreadable everywhere"
        firing = False
    else:
        detail = f"{where} is listed by Makini again: {row.credential} is enrolled again"
        firing = False
    return Change(environment, row.credential, Condition.OFFBOARDED, firing,
                  scrub(detail, limit=1000))


def _notice(row: NotifyCondition) -> Notice:
    return Notice(
        condition=row.condition,
        environment=row.environment,
        credential=row.credential,
        firing=True,
        detail=row.detail,
        started_at=row.started_at,
    )
