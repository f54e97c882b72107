"""The consumer client: how another service gets its Makini token from the rotator.

    tokens = TokenClient("https://rotator.internal", key=os.environ["ROTATOR_KEY"])
    token = tokens.get("prod", "acme-sap")          # cached, jittered TTL
    makini = httpx.Client(base_url="https://api.makini.io",
                          auth=MakiniAuth(tokens, "prod", "acme-sap"))

* Tokens are cached per credential for a jittered TTL (``ttl_s/2 .. ttl_s``, so a fleet of
  consumers does not refresh in step); a refresh sends ``If-None-Match`` and mostly gets 304.
* If the rotator is briefly unreachable (connection error, timeout, 5xx), the cached token is
  served until it expires at Makini, retried every ``retry_s``; with nothing cached,
  :class:`TokenUnavailable` is raised.
* 401/403/404 from the rotator raise :class:`TokenDenied` at once (a revoked or wrong key must
  not keep working from a cache).
* :meth:`TokenClient.on_unauthorized`: Makini said 401 to a token; fetch again now.
  :class:`MakiniAuth` does this for an httpx client, and retries the request once with the new
  token.

:class:`AsyncTokenClient` is the same over ``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import warnings
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

import httpx

__all__ = [
    "AsyncTokenClient",
    "ClientError",
    "MakiniAuth",
    "Token",
    "TokenClient",
    "TokenDenied",
    "TokenUnavailable",
]


class ClientError(Exception):
    """Base of the consumer client's errors. Messages never contain a token or a key."""


class TokenUnavailable(ClientError):
    """The rotator could not be reached (or failed) and no usable token is cached."""


class TokenDenied(ClientError):
    """The rotator refused: 401 (key unknown or revoked), 403 (not this key's), 404."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Token:
    """A Makini access token as served by the rotator (``GET /v1/tokens/{env}/{name}``: the
    fields are named as the API names them). ``repr`` never shows the token."""

    token: str = field(repr=False)
    version: str
    expires_at: datetime | None
    rotated_at: datetime | None

    @property
    def value(self) -> str:
        """Deprecated: the access token, named ``token`` as in the API."""
        warnings.warn(
            "Token.value is deprecated: use Token.token (the API's name)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.token

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))


@dataclass
class _Entry:
    token: Token
    etag: str
    fresh_until: float


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Policy:
    """What the sync and async clients share: URLs, headers, TTLs, reading answers."""

    def __init__(self, base_url: str, key: str, ttl_s: float, retry_s: float) -> None:
        if ttl_s <= 0 or retry_s <= 0:
            raise ValueError("ttl_s and retry_s must be positive")
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.entries: dict[tuple[str, str], _Entry] = {}

    def url(self, env: str, name: str) -> str:
        return f"{self.base_url}/v1/tokens/{env}/{name}"

    def fresh(self, env: str, name: str) -> Token | None:
        entry = self.entries.get((env, name))
        if entry is not None and time.monotonic() < entry.fresh_until:
            return entry.token
        return None

    def request_headers(self, env: str, name: str, force: bool) -> dict[str, str]:
        entry = self.entries.get((env, name))
        if entry is None or force:
            return self.headers
        return {**self.headers, "If-None-Match": entry.etag}

    def expiry(self) -> float:
        return time.monotonic() + random.uniform(self.ttl_s / 2, self.ttl_s)

    def answer(self, env: str, name: str, response: httpx.Response) -> Token:
        key = (env, name)
        entry = self.entries.get(key)
        if response.status_code == 304 and entry is not None:
            entry.fresh_until = self.expiry()
            return entry.token
        if response.status_code == 200:
            try:
                doc = response.json()
                token = Token(
                    token=str(doc["token"]),
                    version=str(doc["version"]),
                    expires_at=_when(doc.get("expires_at")),
                    rotated_at=_when(doc.get("rotated_at")),
                )
            except (ValueError, KeyError, TypeError):
                return self.unavailable(env, name, "its answer does not parse")
            etag = response.headers.get("etag") or f'"{token.version}"'
            self.entries[key] = _Entry(token, etag, self.expiry())
            return token
        if response.status_code in (401, 403, 404):
            if response.status_code == 401:
                self.entries.pop(key, None)
            code = None
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
            raise TokenDenied(
                f"the rotator at {self.base_url} refused {env}/{name}: "
                f"{response.status_code} {code or ''}".strip(),
                status=response.status_code,
                code=code,
            )
        return self.unavailable(env, name, f"it answered {response.status_code}")

    def unavailable(self, env: str, name: str, why: str) -> Token:
        """Serve the cached token through an outage, until it expires at Makini."""
        entry = self.entries.get((env, name))
        if entry is not None and not entry.token.expired():
            entry.fresh_until = time.monotonic() + min(self.retry_s, self.ttl_s)
            return entry.token
        raise TokenUnavailable(f"no token for {env}/{name} from {self.base_url}: {why}")


def _transport_failure(exc: httpx.TransportError) -> str:
    """What went wrong on the way to the rotator, in words (``connection refused``)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return str(cause.strerror).lower()
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = str(exc).strip()
    words = {
        httpx.ConnectError: "could not connect",
        httpx.RemoteProtocolError: "the connection broke",
        httpx.ReadError: "the connection broke",
    }
    for kind, said in words.items():
        if isinstance(exc, kind):
            return f"{said}: {text}" if text else said
    return text or type(exc).__name__


class TokenClient:
    """Reads tokens from the rotator over ``httpx.Client`` (thread-safe)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        ttl_s: float = 60.0,
        retry_s: float = 5.0,
        timeout_s: float = 5.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._policy = _Policy(base_url, key, ttl_s, retry_s)
        self._http = http or httpx.Client(timeout=timeout_s)
        self._own_http = http is None
        self._lock = threading.Lock()

    def get(self, env: str, name: str) -> Token:
        """The current token of ``env/name``, from the cache while it is fresh."""
        return self._policy.fresh(env, name) or self._fetch(env, name, force=False)

    def refresh(self, env: str, name: str) -> Token:
        """Ask the rotator now, whatever the cache holds."""
        return self._fetch(env, name, force=True)

    def on_unauthorized(self, env: str, name: str) -> Token:
        """Makini answered 401 to the cached token: fetch the current one now."""
        return self._fetch(env, name, force=True)

    def _fetch(self, env: str, name: str, *, force: bool) -> Token:
        with self._lock:
            if not force and (token := self._policy.fresh(env, name)):
                return token
            policy = self._policy
            try:
                response = self._http.get(
                    policy.url(env, name), headers=policy.request_headers(env, name, force)
                )
            except httpx.TransportError as exc:
                return policy.unavailable(env, name, _transport_failure(exc))
            return policy.answer(env, name, response)

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTokenClient:
    """Reads tokens from the rotator over ``httpx.AsyncClient`` (one event loop)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        ttl_s: float = 60.0,
        retry_s: float = 5.0,
        timeout_s: float = 5.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._policy = _Policy(base_url, key, ttl_s, retry_s)
        self._http = http or httpx.AsyncClient(timeout=timeout_s)
        self._own_http = http is None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, env: str, name: str) -> Token:
        return self._policy.fresh(env, name) or await self._fetch(env, name, force=False)

    async def refresh(self, env: str, name: str) -> Token:
        return await self._fetch(env, name, force=True)

    async def on_unauthorized(self, env: str, name: str) -> Token:
        return await self._fetch(env, name, force=True)

    async def _fetch(self, env: str, name: str, *, force: bool) -> Token:
        async with self._locks.setdefault((env, name), asyncio.Lock()):
            if not force and (token := self._policy.fresh(env, name)):
                return token
            policy = self._policy
            try:
                response = await self._http.get(
                    policy.url(env, name), headers=policy.request_headers(env, name, force)
                )
            except httpx.TransportError as exc:
                return policy.unavailable(env, name, _transport_failure(exc))
            return policy.answer(env, name, response)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class MakiniAuth(httpx.Auth):
    """httpx auth that sends the credential's current token to Makini and, when Makini
    answers 401, fetches the token again and retries the request once with it (only if the
    rotator has a different token: the same one would only be refused again).

    Give a :class:`TokenClient` for ``httpx.Client``, an :class:`AsyncTokenClient` for
    ``httpx.AsyncClient``.
    """

    requires_request_body = True

    def __init__(self, tokens: TokenClient | AsyncTokenClient, env: str, name: str) -> None:
        self.tokens = tokens
        self.env = env
        self.name = name

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        if not isinstance(self.tokens, TokenClient):
            raise TypeError("MakiniAuth on httpx.Client needs a TokenClient")
        token = self.tokens.get(self.env, self.name)
        request.headers["Authorization"] = f"Bearer {token.token}"
        response = yield request
        if response.status_code == 401:
            fresh = self.tokens.on_unauthorized(self.env, self.name)
            if fresh.token != token.token:
                request.headers["Authorization"] = f"Bearer {fresh.token}"
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not isinstance(self.tokens, AsyncTokenClient):
            raise TypeError("MakiniAuth on httpx.AsyncClient needs an AsyncTokenClient")
        token = await self.tokens.get(self.env, self.name)
        request.headers["Authorization"] = f"Bearer {token.token}"
        response = yield request
        if response.status_code == 401:
            fresh = await self.tokens.on_unauthorized(self.env, self.name)
            if fresh.token != token.token:
                request.headers["Authorization"] = f"Bearer {fresh.token}"
                yield request
