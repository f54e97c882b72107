"""How a replica learns, through the journal, what another process changed.

Three things are watched: the current version of every credential (the journal's
``credential_state.current_version_id``, written by whichever process promoted), revoked
versions (``token_drops``, written by :func:`rotator.rotation.drops.record_drop`), and reader
keys (created or revoked by ``rotator keys``).

* **SQLite**: the feed polls those (a few small queries) every ``api.replica_poll``.
* **PostgreSQL**: triggers on the three tables ``NOTIFY rotator_changes``; the feed ``LISTEN``s
  on its own connection and looks at once, and still polls now and then (every 5 s) in case a
  notification was lost with a connection.

A change of current version makes the cache re-read that credential from the primary backend.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select

from rotator.aio import woken
from rotator.journal import CredentialState, Journal
from rotator.journal.schema import TokenDrop
from rotator.keys import KeyIndex

if TYPE_CHECKING:
    from rotator.api.cache import TokenCache

log = structlog.get_logger("rotator.api.feed")

CHANNEL = "rotator_changes"
PG_SAFETY_POLL_S = 5.0


LISTENER_STOP_S = 2.0
"""How long a stopping feed waits for its listener to finish once cancelled."""


async def stop_listener(listener: asyncio.Task[None]) -> None:
    """Cancel the listener and wait for it, a bounded time: psycopg can lose a cancellation that
    arrives while it connects (psycopg#1345), and a shutdown must not wait on it for ever."""
    listener.cancel()
    done, _ = await asyncio.wait({listener}, timeout=LISTENER_STOP_S)
    if not done:
        log.warning("feed.listener_not_stopped", waited_s=LISTENER_STOP_S)
    elif not listener.cancelled() and listener.exception() is not None:
        log.warning("feed.listener_failed", error=type(listener.exception()).__name__)


class ReplicaFeed:
    """Keeps a process's cache and key index in step with the journal."""

    def __init__(
        self, journal: Journal, cache: TokenCache, keys: KeyIndex, *, poll_s: float
    ) -> None:
        self.journal = journal
        self.cache = cache
        self.keys = keys
        self.poll_s = poll_s if journal.is_sqlite else max(poll_s, PG_SAFETY_POLL_S)
        self._last_drop = 0
        self._seen: dict[tuple[str, str], str | None] = {}
        self._wake = asyncio.Event()
        self.polls = 0

    def start(self) -> None:
        """Load keys and past drops, and remember the versions the journal names now."""
        self.keys.load(self.journal)
        states, drops = self._read()
        self._apply(states, drops)

    def _read(self) -> tuple[dict[tuple[str, str], str | None], list[TokenDrop]]:
        with self.journal.reader() as s:
            states = {
                (env, cred): vid
                for env, cred, vid in s.execute(
                    select(
                        CredentialState.environment,
                        CredentialState.credential,
                        CredentialState.current_version_id,
                    )
                )
            }
            drops = list(
                s.scalars(
                    select(TokenDrop).where(TokenDrop.id > self._last_drop).order_by(TokenDrop.id)
                )
            )
        return states, drops

    def changed(self) -> None:
        """Something changed in the journal (a notification): poll now."""
        self._wake.set()

    def poll(self) -> tuple[dict[tuple[str, str], str | None], list[TokenDrop], bool]:
        """Blocking: what changed in the journal (run on a thread)."""
        states, drops = self._read()
        reloaded = self.keys.refresh(self.journal)
        return states, drops, reloaded

    def _apply(self, states: dict[tuple[str, str], str | None], drops: list[TokenDrop]) -> None:
        for drop in drops:
            self.cache.drop(drop.environment, drop.credential, drop.version_id)
            self._last_drop = max(self._last_drop, drop.id)
        for key, version in states.items():
            before = self._seen.get(key, "")
            self._seen[key] = version
            if version is None or before == version:
                continue
            entry = self.cache.entries.get(key)
            if entry is None or entry.version != version:
                self.cache.reload(*key)

    async def run(self) -> None:
        """Poll (and on PostgreSQL listen) until cancelled."""
        listener = None if self.journal.is_sqlite else asyncio.ensure_future(self._listen())
        try:
            while True:
                await woken(self._wake, self.poll_s)
                self._wake.clear()
                try:
                    states, drops, reloaded = await asyncio.to_thread(self.poll)
                except Exception as exc:  # noqa: BLE001 - the journal may come back; keep serving
                    log.warning("feed.poll_failed", error=type(exc).__name__)
                    continue
                self.polls += 1
                self._apply(states, drops)
                if reloaded:
                    log.info("feed.keys_reloaded", keys=len(self.keys))
        finally:
            if listener is not None:
                await stop_listener(listener)

    async def _listen(self) -> None:
        import psycopg

        dsn = self.journal.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        delay = 0.5
        while True:
            try:
                conn: Any = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    self.changed()  # catch up on whatever happened while not listening
                    async for _ in conn.notifies():
                        self.changed()
            except (psycopg.Error, OSError) as exc:
                log.warning("feed.listen_failed", error=type(exc).__name__, retry_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
