"""What the status page shows of an environment, rendered once for all its viewers, and when
that changes.

The data comes from :func:`rotator.rotation.status.collect` (what ``rotator status`` prints) and
:meth:`Journal.audit_entries` (what ``rotator audit`` prints): no second implementation. It
never holds a token, nor shows a fingerprint of one; every text is escaped (Jinja2 autoescape,
the templates in ``status_page/``).

One :class:`StatusBoard` per app renders an environment's board again when this process's
engine reports a drive's end or a revoke, when the journal's newest audit entry changes (what
another replica or ``run-due`` did), and every :data:`REFRESH_S` anyway (ages, countdowns and
backends change without a journal row), but only while someone watches, and never sooner than
:data:`PACE` times as long as its last reading took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined

from rotator.aio import woken
from rotator.errors import RotatorError
from rotator.rotation.schedule import human
from rotator.rotation.status import CredentialStatus, collect
from rotator.scrub import scrub

if TYPE_CHECKING:
    from rotator.api.state import ApiState
    from rotator.journal.schema import AuditEntry
    from rotator.rotation.work import RotationResult

log = structlog.get_logger("rotator.api.status_board")

WATCH_S = 1.0
"""How often a watched board asks the journal for its newest audit entry."""
REFRESH_S = 15.0
"""A watched board is rendered again at least this often."""
FRESH_S = 2.0
"""A page load renders again only a board older than this."""
PACE = 4.0
"""A board is read again no sooner than this many times as long as its last reading took."""
AUDIT_ROWS = 12
BAD_OUTCOMES = frozenset({"failed", "rolled_back"})
GOOD_OUTCOMES = frozenset({"rotated", "retired", "waiting", "nothing"})
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{6,64}")


# --- rendering -------------------------------------------------------------------------------


@cache
def templates() -> Environment:
    return Environment(
        loader=PackageLoader("rotator.api", "status_page"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **values: Any) -> str:
    return templates().get_template(template).render(**values)


def _clean(text: str, limit: int) -> str:
    """Text for the page: :func:`scrub` (nothing token-shaped), and no token fingerprint
    either: the page has no use for one."""
    return FINGERPRINT.sub("sha256:…", scrub(text, limit=limit))


def _short(version: str | None) -> str:
    if version is None:
        return "none"
    if version.startswith("error:"):
        return _clean(version, 120)
    return f"…{version[-8:]}"


def _ago(delta: timedelta) -> str:
    return human(delta) if delta.total_seconds() >= 0 else "0s"


def _outcome_class(outcome: str | None) -> str:
    if outcome in BAD_OUTCOMES:
        return "bad"
    return "good" if outcome in GOOD_OUTCOMES else "other"


def credential_view(row: CredentialStatus, now: datetime) -> dict[str, Any]:
    """What the board shows of one credential (never its token or a fingerprint)."""
    failing: list[str] = []
    warning: list[str] = []
    if row.attention:
        failing.append(f"attention: {_clean(row.attention, 200)}")
    if row.last_outcome in BAD_OUTCOMES:
        failing.append(f"last rotation {row.last_outcome.replace('_', ' ')}")
    if row.current_version is None:
        failing.append("no current token")
    if row.expires_at is not None and row.expires_at <= now:
        failing.append("token expired")
    if not row.backends_agree and row.current_version is not None:
        warning.append("backends disagree")
    if row.open_revoke:
        warning.append(f"emergency revoke open at step {row.open_revoke}")
    if row.stalled_lease:
        warning.append("lease held by a stopped holder")
    if row.unaccounted:
        warning.append(f"{row.unaccounted} unaccounted token(s): see rotator unaccounted list")
    if row.stale_readers:
        warning.append(f"{len(row.stale_readers)} reader(s) on an old version")
    age = now - row.rotated_at if row.rotated_at else None
    lifetime = row.expires_at - row.rotated_at if row.rotated_at and row.expires_at else None
    lifetime_s = int(lifetime.total_seconds()) if lifetime and lifetime.total_seconds() > 0 else 0
    if row.expires_at is None:
        expires_text = "no expiry known"
    elif row.expires_at > now:
        expires_text = f"expires in {human(row.expires_at - now)}"
    else:
        expires_text = f"expired {human(now - row.expires_at)} ago"
    if row.next_at is None or row.next_at <= now:
        next_text = f"{row.next_action} now"
    else:
        next_text = f"{row.next_action} in {human(row.next_at - now)}"
    return {
        "name": row.credential,
        "connection_id": row.connection_id,
        "state": "failing" if failing else "warning" if warning else "ok",
        "problems": failing + warning,
        "age_s": max(0, int(age.total_seconds())) if age else 0,
        "age_text": _ago(age) if age else "-",
        "lifetime_s": lifetime_s,
        "lifetime_text": human(lifetime) if lifetime else "-",
        "low_s": int(lifetime_s * 0.6),
        "high_s": int(lifetime_s * 0.85),
        "expires_text": expires_text,
        "next_text": next_text,
        "next_reason": row.next_reason,
        "last_outcome": (row.last_outcome or "never rotated").replace("_", " "),
        "outcome_class": _outcome_class(row.last_outcome),
        "last_error": _clean(row.last_error, 200) if row.last_error else None,
        "open_step": row.open_step,
        "agree": row.backends_agree,
        "backends": [
            {
                "name": name,
                "version": _short(vid),
                "version_full": vid if vid and not vid.startswith("error:") else "",
                "same": vid == row.current_version,
            }
            for name, vid in row.backends.items()
        ],
        "stale_readers": [
            {
                "name": v.name,
                "version": _short(v.version_id),
                "version_full": v.version_id,
                "ago": _ago(now - v.last_read_at),
            }
            for v in row.stale_readers
        ],
        "open_revoke": row.open_revoke,
    }


def audit_view(entry: AuditEntry) -> dict[str, Any]:
    """One audit entry as the board shows it: what, who, when (no fingerprint)."""
    info = entry.as_dict()
    detail = info["detail"]
    said = [f"{k}: {detail[k]}" for k in ("reason", "error", "step", "detail") if detail.get(k)]
    return {
        "at_iso": entry.at.isoformat(),
        "at_text": entry.at.strftime("%Y-%m-%d %H:%M:%S"),
        "actor": _clean(entry.actor, 200),
        "action": entry.action,
        "credential": entry.credential or "",
        "outcome": entry.outcome,
        "outcome_class": _outcome_class(entry.outcome)
        if entry.outcome not in ("success",)
        else "good",
        "detail": _clean("; ".join(said), 240) if said else "",
    }


def render_board(
    environment: str,
    rows: list[CredentialStatus],
    audit: list[AuditEntry],
    now: datetime,
    problem: str | None = None,
) -> str:
    views = [credential_view(r, now) for r in rows]
    counts = {s: sum(1 for v in views if v["state"] == s) for s in ("ok", "warning", "failing")}
    return render(
        "board.html",
        environment=environment,
        problem=problem,
        rows=views,
        counts=counts,
        audit=[audit_view(a) for a in audit],
        now_iso=now.isoformat(),
        now_text=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
    )


# --- the board -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """An environment's board as last rendered."""

    revision: str
    html: str
    made_at: float
    cost_s: float = 0.0
    """how long reading it took (what every backend holds is read each time)"""


class StatusBoard:
    """Renders each environment's board once for all its viewers and tells them when it
    changes. :meth:`start` and :meth:`stop` follow the app's lifespan; the watcher works only
    while someone watches."""

    def __init__(self, state: ApiState, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.monotonic = monotonic
        self._boot = secrets.token_hex(3)
        self._numbers = itertools.count(1)
        self._snapshots: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._news: dict[str, asyncio.Event] = {}
        self._viewers: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._watched = asyncio.Event()
        self._closing = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._marker: int | None = None
        self._pending: set[str] = set()

    # lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing.clear()
        events = self.state.runtime.engine.events
        events.result.subscribe(self._on_result)
        events.revoked.subscribe(self._on_revoked)
        self._task = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        """End every event stream now (the server is stopping). Safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._close_now)

    def _close_now(self) -> None:
        self._closing.set()
        for news in self._news.values():
            news.set()

    async def stop(self) -> None:
        self._close_now()
        events = self.state.runtime.engine.events
        with contextlib.suppress(ValueError):
            events.result.unsubscribe(self._on_result)
        with contextlib.suppress(ValueError):
            events.revoked.unsubscribe(self._on_revoked)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # what wakes it (the engine may publish from another thread)

    def _nudge(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def _on_result(self, _result: RotationResult) -> None:
        self._nudge()

    def _on_revoked(self, _env: str, _cred: str, _version_id: str) -> None:
        self._nudge()

    # snapshots

    def _read(self, env: str) -> tuple[list[CredentialStatus], list[AuditEntry], datetime]:
        """Blocking (a worker thread): what ``rotator status`` and ``rotator audit`` read."""
        runtime = self.state.runtime
        rows = asyncio.run(collect(runtime, env))
        audit = runtime.journal.audit_entries(environment=env, limit=AUDIT_ROWS)
        return rows, audit, runtime.engine.clock.now()

    async def refresh(self, env: str) -> Snapshot:
        """Render ``env``'s board now; viewers hear of it if it changed."""
        lock = self._locks.setdefault(env, asyncio.Lock())
        async with lock:
            started = self.monotonic()
            try:
                rows, audit, now = await asyncio.to_thread(self._read, env)
                html = render_board(env, rows, audit, now)
            except Exception as exc:  # noqa: BLE001 - shown on the page; the next refresh retries
                problem = exc.message if isinstance(exc, RotatorError) else type(exc).__name__
                log.warning("status.read_failed", environment=env, error=type(exc).__name__)
                now = self.state.runtime.engine.clock.now()
                html = render_board(env, [], [], now, problem=_clean(problem, 300))
            old = self._snapshots.get(env)
            done = self.monotonic()
            revision = (
                old.revision
                if old is not None and old.html == html
                else f"{self._boot}-{next(self._numbers)}"
            )
            snap = Snapshot(revision, html, done, done - started)
            self._snapshots[env] = snap
            if old is None or old.revision != snap.revision:
                self._news.pop(env, asyncio.Event()).set()
            return snap

    async def snapshot(self, env: str, *, max_age_s: float = FRESH_S) -> Snapshot:
        snap = self._snapshots.get(env)
        if snap is not None and self.monotonic() - snap.made_at <= max_age_s:
            return snap
        return await self.refresh(env)

    async def wait(self, env: str, known: str, timeout_s: float) -> Snapshot | None:
        """The board once its revision is not ``known``; None after ``timeout_s`` or when
        closing."""
        snap = self._snapshots.get(env)
        if snap is not None and snap.revision != known:
            return snap
        if self.closing:
            return None
        await woken(self._news.setdefault(env, asyncio.Event()), timeout_s)
        snap = self._snapshots.get(env)
        return snap if snap is not None and snap.revision != known else None

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # viewers and the watcher

    def join(self, env: str) -> None:
        self._viewers[env] = self._viewers.get(env, 0) + 1
        self._watched.set()

    def leave(self, env: str) -> None:
        left = self._viewers.get(env, 1) - 1
        if left > 0:
            self._viewers[env] = left
        else:
            self._viewers.pop(env, None)

    def _newest_audit(self) -> int | None:
        entries = self.state.runtime.journal.audit_entries(limit=1)
        return entries[0].id if entries else None

    async def _watch(self) -> None:
        """While someone watches: render their boards again when something happened."""
        while True:
            if not self._viewers:
                self._watched.clear()
                await self._watched.wait()
            woke = await woken(self._wake, WATCH_S)
            self._wake.clear()
            try:
                marker = await asyncio.to_thread(self._newest_audit)
            except Exception as exc:  # noqa: BLE001 - the journal may come back
                log.warning("status.watch_failed", error=type(exc).__name__)
                marker = self._marker
            if woke or marker != self._marker:
                self._pending.update(self._viewers)
            self._marker = marker
            now = self.monotonic()
            for env in list(self._viewers):
                snap = self._snapshots.get(env)
                if snap is None:
                    await self.refresh(env)
                    continue
                age = now - snap.made_at
                # news waits while the last reading's cost says so: a large environment's
                # board (a read of every backend) never takes more than a share of the time
                if (env in self._pending or age >= REFRESH_S) and age >= PACE * snap.cost_s:
                    self._pending.discard(env)
                    await self.refresh(env)
