"""The hot path: token reads as a bare ASGI handler in front of FastAPI.

``GET /v1/tokens/{env}/{name}`` and ``GET /v1/tokens/{env}`` are answered here without
Starlette's request objects, middleware or FastAPI's validation: the key is checked against the
in-memory index, the body comes pre-rendered from the cache, the read is recorded in memory.
Every other request goes on to the FastAPI app, which also documents these two operations in
the OpenAPI (``rotator.api.docs``) and routes them back here if ever reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import select

from rotator.api.auth import authorize, check_cred_name, check_env_name
from rotator.api.cache import Revoked, Served, render
from rotator.api.errors import ApiError, envelope, internal_error, request_id_from
from rotator.api.state import ApiState
from rotator.errors import RotatorError
from rotator.journal import CredentialState, Journal, Step
from rotator.keys import KeyInfo
from rotator.model import utcnow

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/v1/tokens/"
VERSION_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class Query:
    """The validated query of a token read."""

    __slots__ = ("known", "previous", "wait_s")

    def __init__(self) -> None:
        self.previous = False
        self.wait_s = 0
        self.known: str | None = None


def parse_query(raw: bytes, long_poll_max_s: int) -> Query:
    q = Query()
    if not raw:
        return q
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise ApiError(422, "the query string does not parse") from None
    for name, value in pairs:
        if name == "stage":
            if value not in ("current", "previous"):
                raise ApiError(422, "stage: must be 'current' or 'previous'")
            q.previous = value == "previous"
        elif name == "wait":
            if not value.isascii() or not value.isdigit() or len(value) > 6:
                raise ApiError(422, "wait: must be a whole number of seconds")
            q.wait_s = int(value)
            if q.wait_s > long_poll_max_s:
                raise ApiError(422, f"wait: at most {long_poll_max_s} seconds")
        elif name == "known_version":
            if not VERSION_RE.fullmatch(value):
                raise ApiError(422, "known_version: not a version id")
            q.known = value
    if q.previous and q.wait_s:
        raise ApiError(422, "wait: long-polls follow the current stage only")
    return q


def _etags(value: bytes) -> list[str]:
    out = []
    for part in value.decode("latin-1").split(","):
        tag = part.strip().removeprefix("W/").strip('"')
        if tag:
            out.append(tag)
    return out


class TokenRoutes:
    """ASGI: token reads here, everything else to ``app``."""

    def __init__(self, state: ApiState, app: ASGIApp) -> None:
        self.state = state
        self.app = app
        self.long_poll_max_s = int(state.settings.long_poll_max.total_seconds())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(PREFIX)
        ):
            await self.handle(scope, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, send: Send) -> None:
        auth = inm = rid = None
        for name, value in scope["headers"]:
            if name == b"authorization" and auth is None:  # the first, as Starlette reads it
                auth = value
            elif name == b"if-none-match":
                inm = value
            elif name == b"x-request-id":
                rid = value
        request_id = request_id_from(rid)
        parts = scope["path"][len(PREFIX) :].split("/")
        env = parts[0]
        try:
            # the key decides first (401, 403), before the path or the query is validated
            if len(parts) == 1 and env:
                key = authorize(self.state.keys, auth, env)
                await self._list(send, key, env, request_id)
            elif len(parts) == 2 and env and parts[1]:
                key = authorize(self.state.keys, auth, env, parts[1], "reader")
                await self._read(send, scope, key, env, parts[1], inm, request_id)
            else:
                raise ApiError(404, "no such endpoint")
        except ApiError as err:
            if len(parts) == 2:
                self.state.metrics.read(self.state.env_label(env), err.status)
            await send_error(send, err, request_id)
        except Exception:  # noqa: BLE001 - a bug: answered as the FastAPI routes answer one
            crash = internal_error(scope["path"])
            with contextlib.suppress(RuntimeError):  # the response had begun: uvicorn closes it
                await send_error(send, crash, request_id)

    # --- GET /v1/tokens/{env}/{name} --------------------------------------------------------

    async def _read(
        self,
        send: Send,
        scope: Scope,
        key: KeyInfo,
        env: str,
        name: str,
        inm: bytes | None,
        request_id: str,
    ) -> None:
        state = self.state
        check_env_name(env)
        check_cred_name(name)
        query = parse_query(scope["query_string"], self.long_poll_max_s)
        if name not in state.credentials.get(env, ()):
            raise ApiError(404, f"environment {env!r} has no credential {name!r}")
        if query.previous:
            entry = await self._previous(env, name)
        else:
            entry = state.cache.get(env, name) or await self._load(env, name)
            tags = _etags(inm) if inm else []
            known = query.known or (tags[0] if tags and query.wait_s else None)
            if query.wait_s and known is not None and entry.version == known:
                entry = await state.cache.wait_change(env, name, known, query.wait_s) or entry
                if entry.version == known:
                    return await self._not_modified(send, key, entry, request_id)
        if inm is not None and not query.wait_s:
            tags = _etags(inm)
            if entry.version in tags or "*" in tags:
                return await self._not_modified(send, key, entry, request_id)
        state.reads.record(key.key_id, key.name, env, name, entry.version, time.time())
        state.metrics.read(env, 200)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    _JSON,
                    (b"content-length", entry.length),
                    (b"etag", entry.etag),
                    _NO_STORE,
                    _NOSNIFF,
                    (b"x-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": entry.body})

    async def _not_modified(self, send: Send, key: KeyInfo, entry: Served, request_id: str) -> None:
        self.state.reads.record(
            key.key_id, key.name, entry.environment, entry.credential, entry.version, time.time()
        )
        self.state.metrics.read(entry.environment, 304)
        await send(
            {
                "type": "http.response.start",
                "status": 304,
                "headers": [
                    (b"etag", entry.etag),
                    _NO_STORE,
                    (b"x-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _load(self, env: str, name: str) -> Served:
        try:
            entry = await self.state.cache.load(env, name)
        except Revoked:
            raise ApiError(
                503,
                "the current version was revoked; its replacement is not promoted yet",
                "token_revoked",
                {"retry-after": "1"},
            ) from None
        except RotatorError as exc:
            raise ApiError(
                503,
                f"the primary backend failed: {exc.message}",
                "backend_unavailable",
                {"retry-after": "2"},
            ) from None
        if entry is None:
            raise ApiError(404, f"{env}/{name} has no current token yet", "no_token")
        return entry

    async def _previous(self, env: str, name: str) -> Served:
        """The previous version, only while its grace period runs (never cached)."""
        runtime = self.state.runtime
        primary = runtime.environments[env].primary

        def read() -> Any:
            rot = runtime.journal.open_rotation(env, name)
            if (
                rot is None
                or rot.step != Step.PROMOTED
                or rot.old_version_id is None
                or rot.invalidated_old
                or (rot.retire_after is not None and rot.retire_after <= utcnow())
            ):
                return None
            return primary.read_version(name, rot.old_version_id)

        try:
            version = await asyncio.to_thread(read)
        except RotatorError as exc:
            raise ApiError(
                503, f"the primary backend failed: {exc.message}", "backend_unavailable"
            ) from None
        if version is None or version.version_id in self.state.cache.dropped:
            raise ApiError(404, f"{env}/{name} is not in a grace period", "no_previous")
        return render(version, None)

    # --- GET /v1/tokens/{env} ---------------------------------------------------------------

    async def _list(self, send: Send, key: KeyInfo, env: str, request_id: str) -> None:
        state = self.state
        check_env_name(env)
        names = state.credentials.get(env)
        if names is None:
            raise ApiError(404, f"environment {env!r} is not served here")
        visible = sorted(n for n in names if key.is_admin or key.may_read(env, n))
        states = await asyncio.to_thread(_listed, state.runtime.journal, env)
        items = []
        for n in visible:
            vid, expires, rotated = states.get(n, (None, None, None))
            cached = state.cache.entries.get((env, n))
            version = cached.version if cached else vid
            items.append(
                {
                    "name": n,
                    "version": version,
                    "expires_at": expires.isoformat() if expires else None,
                    "rotated_at": rotated.isoformat() if rotated else None,
                }
            )
        body = json.dumps({"environment": env, "credentials": items}).encode()
        await _send(send, 200, body, request_id)


_LISTED = (
    CredentialState.credential,
    CredentialState.current_version_id,
    CredentialState.expires_at,
    CredentialState.rotated_at,
)


def _listed(journal: Journal, env: str) -> dict[str, tuple[Any, Any, Any]]:
    """The list's columns of an environment's credentials, as plain rows (no ORM object: at
    10,000 credentials, about a quarter of the CPU of reading the states whole)."""
    query = select(*_LISTED).where(CredentialState.environment == env)
    with journal.reader() as s:
        return {name: (vid, expires, rotated) for name, vid, expires, rotated in s.execute(query)}


async def _send(send: Send, status: int, body: bytes, request_id: str, extra: Any = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                _JSON,
                (b"content-length", str(len(body)).encode()),
                _NO_STORE,
                _NOSNIFF,
                (b"x-request-id", request_id.encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, err: ApiError, request_id: str) -> None:
    """An error in the envelope, from bare ASGI (the lean routes, the key gate)."""
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    if err.status == 401:
        extra.append((b"www-authenticate", b"Bearer"))
    await _send(
        send, err.status, envelope(err.status, err.message, request_id, err.code), request_id, extra
    )
