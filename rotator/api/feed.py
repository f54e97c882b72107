"""How a replica learns, through the journal, what another process changed.

Three things are watched: the current version of every credential (the journal's
``credential_state.current_version_id``, written by whichever process promoted), revoked
versions (``token_drops``, written by :func:`rotator.rotation.drops.record_drop`), and reader
keys (created or revoked by ``rotator keys``).

Nothing is re-read while nothing changes. A trigger numbers every change of a credential's
current version (``credential_state.change_seq``, migration 0007); drops have increasing ids;
keys a count and a last change. One query (:data:`MARKER`) reads the three high-water marks,
and only what lies above the marks this replica has seen is read.

* **SQLite**: every ``api.replica_poll`` the feed asks whether any connection committed since
  its last read (:meth:`Journal.commit_mark`, a pragma: about 20 µs), and only then reads the
  marks (one indexed query). SQLite has one writer at a time, so numbers are committed in order
  and "above the mark" misses nothing.
* **PostgreSQL**: triggers ``NOTIFY rotator_changes``, naming the credential whose version
  changed; the feed ``LISTEN``s on its own connection and reads that row at once. Sequence
  numbers may commit out of order there, so the safety poll (every 5 s, in case a notification
  was lost) re-reads the rows numbered in the last :data:`PG_LOOKBACK_S` seconds, and a
  listener that (re)connects re-reads every row once.

The whole table is read once, at start, to know each credential's version; token bodies are
read by the cache (on the first read of a credential, or by its warm-up after start). A change
of current version makes the cache re-read that credential from the primary backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import func, select, tuple_

from rotator.aio import woken
from rotator.journal import CredentialState, Journal
from rotator.journal.schema import ReaderKey, TokenDrop
from rotator.keys import KeyIndex

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from rotator.api.cache import TokenCache

log = structlog.get_logger("rotator.api.feed")

CHANNEL = "rotator_changes"
PG_SAFETY_POLL_S = 5.0
PG_LOOKBACK_S = 60.0
"""On PostgreSQL, how far back (in time) the safety poll re-reads numbered changes: a
transaction that took its number earlier than this and committed only now is found by the
next full read (a listener's reconnect, a restart)."""

LISTENER_STOP_S = 2.0
"""How long a stopping feed waits for its listener to finish once cancelled."""

_STATE_COLUMNS = (
    CredentialState.environment,
    CredentialState.credential,
    CredentialState.current_version_id,
    CredentialState.change_seq,
)
MARKER = select(
    select(func.max(CredentialState.change_seq)).scalar_subquery(),
    select(func.max(TokenDrop.id)).scalar_subquery(),
    select(func.count(ReaderKey.key_id)).scalar_subquery(),
    select(func.max(ReaderKey.changed_at)).scalar_subquery(),
)
"""The journal's high-water marks: last change number, last drop, key count and last change."""

Key = tuple[str, str]
States = dict[Key, tuple[str | None, int | None]]
"""(environment, credential) -> (current version, change number)"""


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
        self._last_seq = 0
        self._key_mark: tuple[Any, Any] | None = None
        self._seen: dict[Key, str | None] = {}
        self._named: set[Key] = set()
        self._full = False
        self._marks: deque[tuple[float, int, int]] = deque()
        """PostgreSQL: (when, last change number, last drop) at start and each safety poll."""
        self._commit_mark: int | None = None
        """SQLite: the journal's commit mark taken before the last read."""
        self._wake = asyncio.Event()
        self.polls = 0
        self.rows_read = 0
        """Credential rows read since start (the first full read included)."""

    def start(self) -> None:
        """Load keys and past drops, and remember the versions the journal names now."""
        self._commit_mark = self.journal.commit_mark()
        self.keys.load(self.journal)
        with self.journal.reader() as s:
            marker = s.execute(MARKER).one()
            states = self._rows(s, select(*_STATE_COLUMNS))
            drops = self._drops(s, 0)
        self._key_mark = (marker[2], marker[3])
        self._apply(states, drops, initial=True)
        self._marks.append((time.monotonic(), self._last_seq, self._last_drop))

    # --- reading (a worker thread) ------------------------------------------------------------

    def _rows(self, s: Session, query: Any) -> States:
        rows = {(env, cred): (vid, seq) for env, cred, vid, seq in s.execute(query)}
        self.rows_read += len(rows)
        return rows

    @staticmethod
    def _drops(s: Session, after: int) -> list[TokenDrop]:
        return list(s.scalars(select(TokenDrop).where(TokenDrop.id > after).order_by(TokenDrop.id)))

    def changed(self, payload: str = "") -> None:
        """Something changed in the journal (a notification): look now. A payload
        ``credential_state ENV NAME`` names the credential whose version changed."""
        parts = payload.split(" ")
        if len(parts) == 3 and parts[0] == "credential_state":
            self._named.add((parts[1], parts[2]))
        self._wake.set()

    def resync(self) -> None:
        """Re-read every credential's row at the next look (notifications may have been lost)."""
        self._full = True
        self._wake.set()

    def poll(self, safety: bool = False) -> tuple[States, list[TokenDrop], bool]:
        """Blocking: what changed in the journal (run on a thread). ``safety``: the timer's
        look on PostgreSQL, which re-reads a recent window of numbered changes."""
        named, self._named = self._named, set()
        full, self._full = self._full, False
        mark = self.journal.commit_mark()
        if mark is not None and mark == self._commit_mark and not (named or full):
            return {}, [], False  # nothing committed since the last read
        self._commit_mark = mark  # taken before the read: a commit during it moves it again
        since_seq, since_drop = self._last_seq, self._last_drop
        if safety and not self.journal.is_sqlite:
            since_seq, since_drop = self._lookback()
        states: States = {}
        drops: list[TokenDrop] = []
        with self.journal.reader() as s:
            top_seq, top_drop, key_count, key_latest = s.execute(MARKER).one()
            if top_seq is not None and top_seq < self._last_seq:
                full = True  # numbers went back (a journal restored): start over
            if full:
                states = self._rows(s, select(*_STATE_COLUMNS))
            else:
                if top_seq is not None and top_seq > since_seq:
                    states = self._rows(
                        s, select(*_STATE_COLUMNS).where(CredentialState.change_seq > since_seq)
                    )
                if named:
                    query = select(*_STATE_COLUMNS).where(
                        tuple_(CredentialState.environment, CredentialState.credential).in_(
                            sorted(named)
                        )
                    )
                    states.update(self._rows(s, query))
            if top_drop is not None and top_drop > since_drop:
                drops = self._drops(s, since_drop)
        reloaded = False
        if (key_count, key_latest) != self._key_mark:
            reloaded = self.keys.refresh(self.journal)
            self._key_mark = (key_count, key_latest)
        return states, drops, reloaded

    def _lookback(self) -> tuple[int, int]:
        """The marks this replica had :data:`PG_LOOKBACK_S` ago (or at its oldest look)."""
        now = time.monotonic()
        self._marks.append((now, self._last_seq, self._last_drop))
        while len(self._marks) > 1 and now - self._marks[1][0] >= PG_LOOKBACK_S:
            self._marks.popleft()
        _, seq, drop = self._marks[0]
        return seq, drop

    # --- applying (the event loop) ------------------------------------------------------------

    def _apply(self, states: States, drops: list[TokenDrop], *, initial: bool = False) -> None:
        for drop in drops:
            self.cache.drop(drop.environment, drop.credential, drop.version_id)
            self._last_drop = max(self._last_drop, drop.id)
        for key, (version, seq) in states.items():
            if seq is not None and seq > self._last_seq:
                self._last_seq = seq
            before = self._seen.get(key, "")
            self._seen[key] = version
            if initial or version is None or before == version:
                continue  # at start, token bodies are read on demand (or by the warm-up)
            entry = self.cache.entries.get(key)
            if entry is None or entry.version != version:
                self.cache.reload(*key)

    def versions(self) -> dict[Key, str | None]:
        """The current version of each credential, as last read from the journal."""
        return dict(self._seen)

    async def run(self) -> None:
        """Poll (and on PostgreSQL listen) until cancelled."""
        listener = None if self.journal.is_sqlite else asyncio.ensure_future(self._listen())
        try:
            while True:
                woke = await woken(self._wake, self.poll_s)
                self._wake.clear()
                try:
                    states, drops, reloaded = await asyncio.to_thread(self.poll, not woke)
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
                    self.resync()  # catch up on whatever happened while not listening
                    async for note in conn.notifies():
                        self.changed(note.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("feed.listen_failed", error=type(exc).__name__, retry_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
