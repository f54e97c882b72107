"""What is due, computed from the configuration plus the journal, never from memory.

The same function answers ``rotator plan``, ``rotator run-due`` and each tick of ``rotator
serve``, so a restart loses nothing: overdue work is simply due at once. Jitter is derived from
the credential and its last rotation (a hash), so every replica and every restart agrees on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from rotator.journal.rows import RotationView, StateView, Step
from rotator.settings import Config, CredentialSettings, EnvironmentSettings, Schedule

if TYPE_CHECKING:
    from rotator.journal import Journal

RESUME = "resume"
RETIRE = "retire"
ROTATE = "rotate"
WAIT = "wait"


@dataclass(frozen=True)
class PlanItem:
    environment: str
    credential: str
    action: str
    """resume | retire | rotate (due now) or wait (``due_at`` says when)"""
    reason: str
    due_at: datetime | None = None
    urgent: bool = False

    @property
    def is_due(self) -> bool:
        return self.action != WAIT

    def as_dict(self) -> dict[str, object]:
        return {
            "environment": self.environment,
            "credential": self.credential,
            "action": self.action,
            "reason": self.reason,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "urgent": self.urgent,
        }


def _jitter(schedule: Schedule, env: str, cred: str, anchor: datetime | None) -> timedelta:
    span = schedule.jitter.total_seconds() if schedule.jitter else 0
    if span <= 0:
        return timedelta(0)
    seed = f"{env}/{cred}/{anchor.isoformat() if anchor else ''}".encode()
    return timedelta(seconds=int.from_bytes(hashlib.sha256(seed).digest()[:8]) % int(span))


def _next_window_open(schedule: Schedule, after: datetime) -> datetime:
    """The first moment at or after ``after`` inside the schedule's window."""
    window = schedule.window
    if window is None or window.contains(after, schedule.tz):
        return after
    local = after.astimezone(schedule.tz)
    for day in range(8):
        start = (local + timedelta(days=day)).replace(
            hour=window.start.hour, minute=window.start.minute, second=0, microsecond=0
        )
        if start >= local and window.contains(start, schedule.tz):
            return start
    return after  # a window that never opens is refused by validation; be safe anyway


def scheduled_at(schedule: Schedule, env: str, cred: str, rotated_at: datetime) -> datetime | None:
    """When the schedule (not expiry) wants the next rotation after ``rotated_at``."""
    jitter = _jitter(schedule, env, cred, rotated_at)
    if schedule.interval is not None:
        return rotated_at + schedule.interval + jitter
    if schedule.cron is not None:
        from apscheduler.triggers.cron import CronTrigger

        trigger = CronTrigger.from_crontab(schedule.cron, timezone=schedule.tz)
        fire = trigger.get_next_fire_time(None, rotated_at + timedelta(seconds=1))
        return fire + jitter if fire else None
    return None


def plan_credential(
    env_name: str,
    env: EnvironmentSettings,
    cred: CredentialSettings,
    state: StateView | None,
    open_rotation: RotationView | None,
    now: datetime,
    retry_after_failure: timedelta,
    *,
    open_revoke: RotationView | None = None,
) -> PlanItem:
    schedule = env.schedule_for(cred)

    def item(
        action: str, reason: str, due: datetime | None = None, urgent: bool = False
    ) -> PlanItem:
        return PlanItem(env_name, cred.name, action, reason, due, urgent)

    if open_revoke is not None:  # an unfinished emergency revoke: the engine finishes it first
        return item(
            RESUME,
            f"emergency revoke {open_revoke.id[:8]} stopped at {open_revoke.step}",
            now,
            urgent=True,
        )
    if state and state.last_outcome == "revoked-no-token" and state.current_version_id is None:
        return item(
            WAIT,
            "revoked without a replacement: `rotator rotate` (or `rotator import` after the "
            "customer reconnected) gives it a token again",
            None,
        )

    backoff_until = None
    if state and state.last_outcome in ("error", "failed", "rolled_back") and state.last_attempt_at:
        backoff_until = state.last_attempt_at + retry_after_failure

    if open_rotation is not None and open_rotation.step != Step.PROMOTED:
        if backoff_until and backoff_until > now:
            return item(
                WAIT, f"resume {open_rotation.step} rotation after the last error", backoff_until
            )
        return item(
            RESUME,
            f"rotation {open_rotation.id[:8]} stopped at {open_rotation.step}",
            now,
            urgent=True,
        )

    margin = schedule.rotate_before_expiry or timedelta(0)
    expiry_due = state.expires_at - margin if state and state.expires_at else None
    if state is None or state.current_version_id is None:
        if backoff_until and backoff_until > now:
            return item(WAIT, "first token, retrying after the last error", backoff_until)
        return item(ROTATE, "no token yet", now, urgent=True)
    if expiry_due is not None and expiry_due <= now:
        if backoff_until and backoff_until > now:
            return item(WAIT, "close to expiry, retrying after the last error", backoff_until, True)
        assert state.expires_at is not None
        left = state.expires_at - now
        return item(ROTATE, f"expires in {human(left)} (margin {human(margin)})", now, True)

    candidates: list[tuple[datetime, str]] = []
    if expiry_due is not None:
        candidates.append((expiry_due, "before expiry"))
    if state.rotated_at is not None:
        sched = scheduled_at(schedule, env_name, cred.name, state.rotated_at)
        if sched is not None:
            what = (
                f"every {human(schedule.interval)}"
                if schedule.interval
                else f"cron {schedule.cron}"
            )
            candidates.append((_next_window_open(schedule, max(sched, now)), what))
    if backoff_until is not None:
        candidates = [(max(at, backoff_until), why) for at, why in candidates]

    retire = None
    if open_rotation is not None and open_rotation.retire_after is not None:
        retire = open_rotation.retire_after
        if retire <= now:
            return item(RETIRE, "grace period over: retire the previous version", now)

    if not candidates:
        if retire is not None:
            return item(WAIT, "retire the previous version after the grace period", retire)
        return item(WAIT, "no schedule and no known expiry", None)
    due_at, why = min(candidates)
    if due_at <= now:
        return item(ROTATE, f"scheduled ({why})", now)
    if retire is not None and retire < due_at:
        return item(WAIT, "retire the previous version after the grace period", retire)
    return item(WAIT, f"next rotation ({why})", due_at)


def plan(
    config: Config,
    journal: Journal,
    now: datetime,
    *,
    environments: list[str] | None = None,
    retry_after_failure: timedelta | None = None,
) -> list[PlanItem]:
    """Every credential of the chosen environments with what is due for it."""
    return plan_from(
        config,
        journal.states(),
        {(r.environment, r.credential): r for r in journal.open_rotations()},
        {(r.environment, r.credential): r for r in journal.open_revokes()},
        now,
        environments=environments,
        retry_after_failure=retry_after_failure,
    )


def plan_from(
    config: Config,
    states: Mapping[tuple[str, str], StateView],
    open_rotations: Mapping[tuple[str, str], RotationView],
    open_revokes: Mapping[tuple[str, str], RotationView],
    now: datetime,
    *,
    environments: list[str] | None = None,
    retry_after_failure: timedelta | None = None,
) -> list[PlanItem]:
    """:func:`plan` from journal rows already read: each credential's state, its latest open
    rotation and its unfinished revoke, by (environment, credential)."""
    backoff = (
        retry_after_failure
        if retry_after_failure is not None
        else config.scheduler.retry_after_failure
    )
    items = []
    for env_name, env in config.environments.items():
        if environments and env_name not in environments:
            continue
        for cred in env.credentials:
            if cred.name in env.offboarded:
                continue  # gone at Makini: readable for its grace, never rotated again
            key = (env_name, cred.name)
            items.append(
                plan_credential(
                    env_name,
                    env,
                    cred,
                    states.get(key),
                    open_rotations.get(key),
                    now,
                    backoff,
                    open_revoke=open_revokes.get(key),
                )
            )
    return items


@dataclass(frozen=True)
class _Planned:
    inputs: tuple[object, ...]
    config: tuple[tuple[str, EnvironmentSettings], ...]
    """each environment's settings object: discovery's refresh replaces it, never edits it"""
    environments: tuple[str, ...]
    backoff: timedelta
    until: datetime | None
    """the earliest ``due_at`` of the plan (None: nothing waits on time)"""


class Planner:
    """:func:`plan` for a process that asks every tick (``rotator serve``): it plans again only
    when the plan can have changed, and otherwise answers that nothing is due, at the cost of
    one raw read of the plan's journal inputs (:meth:`Journal.plan_inputs`) instead of loading
    and planning every credential. The plan is a function of the configuration, those inputs
    and the time; so a tick plans again when the inputs differ from the last plan's (a change
    by any process or replica: a version, a failure, an open rotation's step or retire time),
    when an environment's settings were replaced (discovery) or the scheduler's settings
    differ, when the time has reached the last plan's earliest ``due_at`` (a credential
    becoming due, a retry after a failure, a window opening, a grace period's end), and
    whenever the last plan had due work (a credential found busy is driven again at the next
    tick, so a dead holder's lease is taken over once it expires). The engine still decides
    again under each credential's lease: a plan can only be late by a tick, never run twice."""

    def __init__(self) -> None:
        self._last: _Planned | None = None
        self.planned = 0
        """how many ticks planned (the others found nothing that could have changed)"""

    def due(
        self,
        config: Config,
        journal: Journal,
        now: datetime,
        *,
        environments: list[str] | None = None,
    ) -> list[PlanItem]:
        """The items of :func:`plan` that are due at ``now``."""
        inputs = journal.plan_inputs()  # before the plan's own read: a change between is seen
        settings = tuple(config.environments.items())
        chosen = tuple(environments or ())
        backoff = config.scheduler.retry_after_failure
        last = self._last
        if (
            last is not None
            and (last.until is None or now < last.until)
            and last.inputs == inputs
            and last.environments == chosen
            and last.backoff == backoff
            and len(last.config) == len(settings)
            and all(
                a == b and x is y for (a, x), (b, y) in zip(last.config, settings, strict=True)
            )
        ):
            return []
        self._last = None  # a failing plan leaves nothing to trust
        items = plan(config, journal, now, environments=environments)
        self.planned += 1
        due = [i for i in items if i.is_due]
        waits = [i.due_at for i in items if not i.is_due and i.due_at is not None]
        until = now if due else min(waits, default=None)
        self._last = _Planned(inputs, settings, chosen, backoff, until)
        return due


def human(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            sub = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            extra = rest // sub[1]
            return f"{sign}{whole}{unit}{f'{extra}{sub[0]}' if extra else ''}"
    return f"{sign}{seconds}s"
