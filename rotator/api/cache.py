"""The in-memory token cache the read path serves from.

One entry per credential: the current version with its response body already rendered, so a
read is a dict lookup and one ``send``. Entries change in three ways:

* **promotion in this process**: :meth:`TokenCache.on_promoted` listens to the engine's
  ``promoted`` events; the new value is served from the moment the engine publishes it (no
  backend read);
* **promotion elsewhere** (another replica, ``rotator run-due``): the replica feed sees the
  journal's current version change and calls :meth:`TokenCache.reload`;
* **emergency revoke**: :meth:`TokenCache.on_revoked` listens to the engine's ``revoked``
  events; :meth:`TokenCache.drop` (this process) or :func:`drop_everywhere` (every process on
  the journal, from anywhere) make a version unservable at once, even if a backend still labels
  it current: reads answer 503 ``token_revoked`` until the replacement is promoted.

A miss reads the environment's primary backend on a worker thread, one load per credential at
a time. Entries only move forward: versions are time-ordered ids, so a slow load never replaces
a newer value. Long-polls wait on :meth:`TokenCache.wait_change`.

Nothing is read before the API is ready: :meth:`TokenCache.warm` reads the credentials the
journal names a current version for after start, a chunk at a time on one worker thread, while
reads of credentials not warmed yet load them on demand.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select

from rotator.aio import within
from rotator.journal.schema import CredentialState
from rotator.model import Stage, StoredVersion, utcnow
from rotator.rotation.drops import record_drop

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from datetime import datetime

    from backends.base import Backend
    from rotator.journal import Journal
    from rotator.rotation.runtime import Runtime

log = structlog.get_logger("rotator.api.cache")

CacheKey = tuple[str, str]
WARM_CHUNK = 64
"""Credentials read per worker-thread call of the warm-up."""
_CACHES: weakref.WeakSet[TokenCache] = weakref.WeakSet()


@dataclass(frozen=True)
class Served:
    """A credential's current version as the API serves it."""

    environment: str
    credential: str
    version: str
    body: bytes
    etag: bytes
    length: bytes
    expires_at: datetime | None
    rotated_at: datetime | None
    loaded_at: float

    def __repr__(self) -> str:  # the body holds the token
        return f"Served({self.environment}/{self.credential} {self.version})"


class Revoked(Exception):
    """The backend's current version of a credential was dropped (revoked)."""


def render(version: StoredVersion, rotated_at: datetime | None) -> Served:
    rotated = rotated_at or version.created_at
    expires = version.tokens.expires_at
    body = json.dumps(
        {
            "token": version.tokens.access.reveal(),
            "version": version.version_id,
            "expires_at": expires.isoformat() if expires else None,
            "rotated_at": rotated.isoformat() if rotated else None,
        },
        separators=(",", ":"),
    ).encode()
    return Served(
        environment=version.environment,
        credential=version.credential,
        version=version.version_id,
        body=body,
        etag=f'"{version.version_id}"'.encode(),
        length=str(len(body)).encode(),
        expires_at=expires,
        rotated_at=rotated,
        loaded_at=time.monotonic(),
    )


class TokenCache:
    def __init__(self, runtime: Runtime, *, max_age_s: float = 300.0) -> None:
        self.runtime = runtime
        self.max_age_s = max_age_s
        self.entries: dict[CacheKey, Served] = {}
        self.dropped: set[str] = set()
        self._waiters: dict[CacheKey, list[asyncio.Future[None]]] = {}
        self._loading: dict[CacheKey, asyncio.Future[Served | None]] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Future[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_backend_error: Callable[[str, str], None] | None = None
        _CACHES.add(self)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop long-polls wait on (set when the app starts)."""
        self.loop = loop

    # --- writes (any thread) ----------------------------------------------------------------

    def put(self, served: Served) -> bool:
        """Serve ``served`` unless a newer version is already served or it was dropped."""
        key = (served.environment, served.credential)
        with self._lock:
            if served.version in self.dropped:
                return False
            old = self.entries.get(key)
            if old is not None and old.version > served.version:
                return False
            self.entries[key] = served
        if old is None or old.version != served.version:
            self._wake(key)
        return True

    def on_promoted(self, env: str, cred: str, version: StoredVersion) -> None:
        """Promoted-event listener: serve the new version at once."""
        if env in self.runtime.environments:
            self.put(render(version, utcnow()))

    def drop(self, env: str, cred: str, version_id: str) -> None:
        """Make ``version_id`` unservable in this process at once (emergency revoke)."""
        with self._lock:
            self.dropped.add(version_id)
            entry = self.entries.get((env, cred))
            if entry is not None and entry.version == version_id:
                del self.entries[(env, cred)]

    def on_revoked(self, env: str, cred: str, version_id: str) -> None:
        """Revoked-event listener: unservable here at once (the revoke recorded the drop in the
        journal, for the other replicas)."""
        self.drop(env, cred, version_id)

    def _wake(self, key: CacheKey) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake_now(key)
        else:
            loop.call_soon_threadsafe(self._wake_now, key)

    def _wake_now(self, key: CacheKey) -> None:
        for fut in self._waiters.pop(key, []):
            if not fut.done():
                fut.set_result(None)

    # --- reads (the event loop) -------------------------------------------------------------

    def get(self, env: str, cred: str) -> Served | None:
        entry = self.entries.get((env, cred))
        if entry is not None and time.monotonic() - entry.loaded_at > self.max_age_s:
            self.reload(env, cred)  # serve this one meanwhile
        return entry

    async def load(self, env: str, cred: str) -> Served | None:
        """The current version from the primary backend (one load per credential at a time).
        Raises :class:`Revoked` if the backend's current version was dropped, and the
        backend's error if it fails."""
        key = (env, cred)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(env, cred))
            self._loading[key] = pending
            pending.add_done_callback(lambda _f: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    async def _load(self, env: str, cred: str) -> Served | None:
        rt = self.runtime.environments[env]
        journal = self.runtime.journal

        def read() -> tuple[StoredVersion | None, datetime | None]:
            version = rt.primary.read(cred, Stage.CURRENT)
            if version is None:
                return None, None
            state = journal.state(env, cred)
            same = state is not None and state.current_version_id == version.version_id
            return version, state.rotated_at if same and state is not None else None

        try:
            version, rotated_at = await asyncio.to_thread(read)
        except Exception:
            if self.on_backend_error is not None:
                self.on_backend_error(env, rt.primary.name)
            raise
        if version is None:
            return None
        if version.version_id in self.dropped:
            raise Revoked(version.version_id)
        self.put(render(version, rotated_at))
        return self.entries.get((env, cred))

    async def warm(
        self, versions: Mapping[CacheKey, str | None], served: Mapping[str, frozenset[str]]
    ) -> int:
        """Read the current version of every served credential the journal names one for and
        that is not cached yet, :data:`WARM_CHUNK` at a time on one worker thread (reads and
        promotions go on meanwhile: entries only move forward). Returns how many were cached.
        A backend that fails stops the warm-up of its environment: reads load on demand."""
        todo: dict[str, list[str]] = {}
        for (env, cred), current in versions.items():
            if current is None or cred not in served.get(env, ()) or (env, cred) in self.entries:
                continue
            todo.setdefault(env, []).append(cred)
        cached = 0
        for env, creds in todo.items():
            if env not in self.runtime.environments:
                continue
            primary = self.runtime.environments[env].primary
            rotated = await asyncio.to_thread(_rotated_at, self.runtime.journal, env)
            for start in range(0, len(creds), WARM_CHUNK):
                chunk = creds[start : start + WARM_CHUNK]
                part = [c for c in chunk if (env, c) not in self.entries]
                try:
                    found = await asyncio.to_thread(_read_current, primary, part)
                except Exception as exc:  # noqa: BLE001 - reads load on demand, and say so
                    if self.on_backend_error is not None:
                        self.on_backend_error(env, primary.name)
                    log.warning("cache.warm_failed", environment=env, error=type(exc).__name__)
                    break
                for version in found:
                    if version is None or version.version_id in self.dropped:
                        continue
                    journal = rotated.get(version.credential)
                    at = journal[1] if journal and journal[0] == version.version_id else None
                    cached += self.put(render(version, at))
        return cached

    def reload(self, env: str, cred: str) -> None:
        """Re-read a credential in the background (the feed saw it change)."""
        if self.loop is None or env not in self.runtime.environments:
            return

        async def run() -> None:
            try:
                await self.load(env, cred)
            except Exception as exc:  # noqa: BLE001 - logged; the next read or poll retries
                log.warning(
                    "cache.reload_failed",
                    environment=env,
                    credential=cred,
                    error=type(exc).__name__,
                )

        if self._off_loop():
            asyncio.run_coroutine_threadsafe(run(), self.loop)
        else:
            task = asyncio.ensure_future(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _off_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is not self.loop
        except RuntimeError:
            return True

    def waiting(self, env: str, cred: str) -> int:
        """How many long-polls wait on ``env/cred`` now."""
        return len(self._waiters.get((env, cred), []))

    async def wait_change(self, env: str, cred: str, known: str, timeout_s: float) -> Served | None:
        """Return as soon as the served version is not ``known``, or after ``timeout_s``."""
        key = (env, cred)
        deadline = time.monotonic() + timeout_s
        while True:
            entry = self.entries.get(key)
            if entry is not None and entry.version != known:
                return entry
            left = deadline - time.monotonic()
            if left <= 0:
                return entry
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(fut)
            try:
                await within(fut, left)
            except TimeoutError:
                return self.entries.get(key)
            finally:
                waiters = self._waiters.get(key)
                if waiters and fut in waiters:
                    waiters.remove(fut)


def _read_current(primary: Backend, names: list[str]) -> list[StoredVersion | None]:
    return [primary.read(name, Stage.CURRENT) for name in names]


def _rotated_at(journal: Journal, env: str) -> dict[str, tuple[str | None, datetime | None]]:
    """credential -> (current version, rotated at) of ``env``, in one query."""
    with journal.reader() as s:
        rows = s.execute(
            select(
                CredentialState.credential,
                CredentialState.current_version_id,
                CredentialState.rotated_at,
            ).where(CredentialState.environment == env)
        )
        return {cred: (vid, at) for cred, vid, at in rows}


def drop_everywhere(journal: Journal, env: str, cred: str, version_id: str) -> None:
    """Make ``version_id`` unservable in every API process on ``journal``: at once in this
    process, within a second in the others (the replica feed reads the drop from the journal).
    Blocking; it touches nothing but the journal and the caches."""
    for cache in list(_CACHES):
        cache.drop(env, cred, version_id)
    record_drop(journal, env, cred, version_id)
