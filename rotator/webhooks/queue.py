"""Makini webhooks: the journal queue, and the worker that processes it.

The receiver (``rotator.api.webhooks``) checks the signature
(:mod:`rotator.webhooks.signature`), then :func:`enqueue` stores the event once per id and
the receiver answers 200 at once. :class:`WebhookWorker` takes queued events, oldest event
timestamp first, and acts:

* an "authentication required" kind of event marks the credential's ``attention`` and alerts;
* any token-related event verifies the current token with Makini (``engine.verify_current``),
  which itself marks ``attention`` when Makini rejects it.

Makini does not document the event type strings nor the id field: event types are matched with
configured patterns. Events dedupe on what the signature covers, the body, and on nothing else:
the id is the first of ``id``/``webhook_id``/``event_id``/``delivery_id`` found in the body,
else the SHA-256 of the raw body, so identical redeliveries dedupe. A header id is not signed
(anyone on the path may change it): it never takes part.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from json import JSONDecodeError
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from rotator.errors import JournalError, MakiniError, NotFound
from rotator.journal import Journal
from rotator.journal.schema import WebhookEvent
from rotator.jsonbody import loads
from rotator.model import utcnow

if TYPE_CHECKING:
    from rotator.rotation.engine import RotationEngine
    from rotator.rotation.runtime import Runtime
    from rotator.settings import Config, WebhookSettings

log = structlog.get_logger("rotator.webhooks")

PENDING, WORKING, DONE, IGNORED, FAILED = "pending", "working", "done", "ignored", "failed"
_CLAIM_LEASE = timedelta(minutes=5)
MAX_ATTEMPTS = 5


# --- the payload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedEvent:
    webhook_id: str
    event_type: str
    connection_id: str | None
    occurred_at: datetime | None


def _first(doc: dict[str, Any], *names: str) -> Any:
    for scope in (doc, doc.get("data"), doc.get("payload"), doc.get("details")):
        if isinstance(scope, dict):
            for name in names:
                value = scope.get(name)
                if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                    return value
            conn = scope.get("connection")
            if "connection_id" in names and isinstance(conn, dict) and conn.get("id"):
                return conn["id"]
    return None


def _timestamp(value: Any) -> datetime | None:
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000 if value > 1e11 else value, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


_ID_MAX = 200
"""the width of ``webhook_events.webhook_id``"""


def dedupe_key(doc: dict[str, Any], body: bytes) -> str:
    """The event's key in the queue, from the signed body only: its id, else the body's hash.
    An id too long for the column is hashed whole, never cut (two ids must not become one)."""
    found = _first(doc, "id", "webhook_id", "event_id", "delivery_id")
    if found is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    wid = str(found)
    return wid if len(wid) <= _ID_MAX else "id-sha256:" + hashlib.sha256(wid.encode()).hexdigest()


def parse_event(body: bytes) -> ParsedEvent:
    """Read what the worker needs from a webhook body; ValueError if it is not a JSON object."""
    try:
        doc = loads(body)
    except JSONDecodeError as exc:
        raise ValueError(f"the body is not JSON: {exc.msg} (at character {exc.pos})") from None
    if not isinstance(doc, dict):
        raise ValueError("the body is not a JSON object")
    event_type = _first(doc, "event", "type", "event_type", "name")
    connection = _first(doc, "connection_id", "connectionId", "connection_key", "connection")
    return ParsedEvent(
        webhook_id=dedupe_key(doc, body),
        event_type=str(event_type or "")[:200],
        connection_id=str(connection)[:200] if connection is not None else None,
        occurred_at=_timestamp(_first(doc, "timestamp", "created_at", "occurred_at", "time")),
    )


def enqueue(journal: Journal, env: str, event: ParsedEvent, body: bytes) -> bool:
    """Store an event in the queue; False when an event with its id is already there."""
    row = WebhookEvent(
        environment=env,
        webhook_id=event.webhook_id,
        event_type=event.event_type,
        connection_id=event.connection_id,
        occurred_at=event.occurred_at,
        received_at=utcnow(),
        payload=body.decode("utf-8", "replace"),
        status=PENDING,
        attempts=0,
    )
    try:
        with journal.session("queue a webhook") as s:
            s.add(row)
    except JournalError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            return False
        raise
    return True


def matches(event_type: str, patterns: list[str]) -> bool:
    name = event_type.lower()
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


# --- the worker ------------------------------------------------------------------------------


class WebhookWorker:
    """Processes the queue: ``run_once`` claims a batch and acts on each event.

    A claim is an UPDATE from pending (or from a claim older than the lease) to working, so
    replicas sharing the journal never process one event twice at once.
    """

    def __init__(
        self,
        config: Config,
        journal: Journal,
        engine: RotationEngine,
        *,
        on_event: Any = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        self.engine = engine
        self.runtime = runtime
        """what discovery runs on (without it, events never run discovery)"""
        self._listed_at: dict[str, datetime] = {}
        """per environment, when the last discovery started listing: an event received
        before that is covered by it (a burst of events lists once)"""
        self.on_event = on_event
        """called with (environment, outcome) after each event (metrics)"""

    def _claim(self, limit: int = 50) -> list[WebhookEvent]:
        now = utcnow()
        with self.journal.reader() as s:
            ids = list(
                s.scalars(
                    select(WebhookEvent.id)
                    .where(
                        or_(
                            WebhookEvent.status == PENDING,
                            (WebhookEvent.status == WORKING)
                            & (WebhookEvent.claimed_at < now - _CLAIM_LEASE),
                        )
                    )
                    .order_by(WebhookEvent.id)
                    .limit(limit)
                )
            )
        claimed = []
        for event_id in ids:
            with self.journal.session("claim a webhook") as s:
                result = s.execute(
                    update(WebhookEvent)
                    .where(
                        WebhookEvent.id == event_id,
                        or_(
                            WebhookEvent.status == PENDING,
                            (WebhookEvent.status == WORKING)
                            & (WebhookEvent.claimed_at < now - _CLAIM_LEASE),
                        ),
                    )
                    .values(status=WORKING, claimed_at=now, attempts=WebhookEvent.attempts + 1)
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    row = s.get(WebhookEvent, event_id)
                    if row is not None:
                        claimed.append(row)
        # out-of-order deliveries: act in the order the events happened
        epoch = datetime.min.replace(tzinfo=UTC)
        return sorted(claimed, key=lambda r: (r.occurred_at or r.received_at or epoch, r.id))

    def _finish(self, event_id: int, status: str, outcome: str) -> None:
        with self.journal.session("finish a webhook") as s:
            row = s.get(WebhookEvent, event_id)
            if row is not None:
                row.status = status
                row.outcome = outcome[:2000]
                row.processed_at = utcnow()

    async def run_once(self) -> int:
        """Process what is queued now; returns how many events were handled."""
        rows = await asyncio.to_thread(self._claim)
        for row in rows:
            try:
                status, outcome = await self._process(row)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the queue
                retry = row.attempts < MAX_ATTEMPTS
                status = PENDING if retry else FAILED
                outcome = f"{type(exc).__name__}: {getattr(exc, 'message', '')}"[:500]
                log.warning(
                    "webhook.failed",
                    environment=row.environment,
                    id=row.id,
                    error=outcome,
                    retry=retry,
                )
            await asyncio.to_thread(self._finish, row.id, status, outcome)
            if self.on_event is not None:
                self.on_event(row.environment, status)
        return len(rows)

    def credential_for(self, env: str, connection_id: str | None) -> str | None:
        settings = self.config.environments.get(env)
        if settings is None or connection_id is None:
            return None
        for cred in settings.credentials:
            if cred.connection_id == connection_id:
                return cred.name
        return None

    async def _process(self, row: WebhookEvent) -> tuple[str, str]:
        env = row.environment
        settings = self.config.environments.get(env)
        if settings is None or env not in self.engine.environments:
            return IGNORED, "environment not served here"
        cred = self.credential_for(env, row.connection_id)
        discover = settings.discover
        if (
            self.runtime is not None
            and discover.enabled
            and matches(row.event_type, discover.events)
            and (cred is None or matches(row.event_type, ["*delet*", "*disconnect*", "*remov*"]))
        ):  # a connection appeared (no credential has it) or went away
            return DONE, await self._discover(env, row.received_at)
        if cred is None:
            return IGNORED, f"no credential for connection {row.connection_id!r}"
        if cred in settings.offboarded:  # nothing to verify, rotate or mark: it is gone
            return IGNORED, (
                f"credential {cred!r} is off-boarded (its connection is gone at Makini): "
                "no action"
            )
        hook = settings.webhook
        bound = log.bind(environment=env, credential=cred, event_type=row.event_type, id=row.id)
        if matches(row.event_type, hook.attention_events):
            return await self._attention(row, cred, hook, bound)
        if matches(row.event_type, hook.verify_events):
            ok, detail = await self._verify(env, cred)
            bound.info("webhook.verified", ok=ok, detail=detail)
            return DONE, f"verified: {'ok' if ok else 'FAILED'}: {detail}"
        return IGNORED, "event type needs no action"

    async def _discover(self, env: str, received_at: datetime | None) -> str:
        """Discovery for ``env`` now (a connection appeared, changed or went away): new
        credentials get their first tokens at once. A failed listing raises: the event is
        tried again."""
        from rotator.rotation import discovery

        assert self.runtime is not None
        last = self._listed_at.get(env)
        if last is not None and received_at is not None and received_at <= last:
            return "covered by a discovery that started after it arrived"
        started = utcnow()
        change = await discovery.discover(self.runtime, env)
        self._listed_at[env] = started  # only once it succeeded: a failed one covers nothing
        log.info("webhook.discovered", environment=env, new=len(change.new),
                 gone=len(change.gone))
        return (f"discovered: {len(change.new)} new, {len(change.returned)} back, "
                f"{len(change.gone)} gone")

    async def _verify(self, env: str, cred: str) -> tuple[bool, str]:
        from rotator.rotation.queries import verify_current

        try:
            return await verify_current(self.engine, env, cred)
        except (MakiniError, NotFound) as exc:
            return False, exc.message

    async def _attention(
        self, row: WebhookEvent, cred: str, hook: WebhookSettings, bound: Any
    ) -> tuple[str, str]:
        env = row.environment
        state = await asyncio.to_thread(self.journal.state, env, cred)
        if (
            row.occurred_at is not None
            and state is not None
            and state.rotated_at is not None
            and row.occurred_at < state.rotated_at
        ):
            # delivered late: it is about a token that has since been replaced; check the new one
            ok, detail = await self._verify(env, cred)
            bound.info("webhook.stale_attention", ok=ok, detail=detail)
            return DONE, f"older than the last rotation; verified: {'ok' if ok else 'FAILED'}"
        message = (
            f"Makini reported {row.event_type!r} for connection {row.connection_id}: the "
            "customer must re-authorize the connection in Makini"
        )
        await asyncio.to_thread(self.journal.set_state, env, cred, attention=message)
        await asyncio.to_thread(
            lambda: self.journal.audit(
                actor="makini-webhook",
                action="webhook.attention",
                outcome="alert",
                environment=env,
                credential=cred,
                event=row.event_type,
                webhook_id=row.webhook_id,
            )
        )
        bound.error("webhook.attention", alert=message)
        return DONE, "attention marked"
