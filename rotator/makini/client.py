"""The async Makini API client: issue, refresh, verify and revoke connection tokens.

Admin calls authenticate with the client-credentials grant; the admin token is cached and
renewed before it expires (and once on a 401). The client never uses the admin refresh grant:
refreshing would invalidate the admin tokens of every other process using the same client.

Every failure is a :class:`~rotator.errors.MakiniError`. Transient ones are retried with backoff,
except where Makini may already have processed a token-creating request (issue, refresh, code
exchange): such a failure is raised at once with ``ambiguous=True``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
import structlog

from rotator.errors import (
    BadRequest,
    InvalidToken,
    MakiniError,
    MakiniProtocolError,
    WrongConnection,
)
from rotator.model import Secret, TokenPair
from rotator.settings import MakiniSettings

from . import _parse
from ._errors import error_from_exception, error_from_response, request_id_from
from ._retry import RetryBudget
from .transport import http_transport

ADMIN_RENEW_MARGIN_S = 60.0
TOKEN_PATH = "/link/token"  # noqa: S105 (a path, not a secret)
CURRENT_PATH = "/api/integrations/current"
CONNECTIONS_PATH = "/api/system/connections"

# every exception httpx raises: the three outside HTTPError included
_HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.CookieConflict, httpx.StreamError)

log = structlog.get_logger("rotator.makini")


@dataclass(frozen=True)
class Issued:
    """A new token pair from Makini."""

    tokens: TokenPair
    request_id: str | None


@dataclass(frozen=True)
class ConnectionInfo:
    """What ``GET /api/integrations/current`` says about the connection a token belongs to."""

    connection_id: str
    company_name: str | None
    provider: str | None
    request_id: str | None


@dataclass(frozen=True)
class ListedConnection:
    """One connection as ``GET /api/system/connections`` lists it (no token)."""

    connection_id: str
    name: str | None = None
    platform: str | None = None
    company: str | None = None
    status: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectionList:
    """An admin client's connections; ``complete`` False: some may be missing."""

    items: list[ListedConnection]
    complete: bool


class _Admin:
    """Marks a request that carries the admin token."""


ADMIN = _Admin()


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    what: str  # "issuing a token for connection X": starts every error message
    auth: _Admin | Secret | None
    idempotent: bool = True
    json: dict[str, Any] | None = field(default=None, repr=False)  # may hold a token
    form: dict[str, str] | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # scrubbed from error text
    operation: str = "other"  # a metric label: never a path (it names the connection)


@dataclass(frozen=True)
class _AdminToken:
    token: Secret
    renew_at: float


CallHook = Callable[[str, str, str, float], None]
"""``(environment, operation, outcome, seconds)`` of one request attempt"""

_SHARD = 4
"""Connections per httpx pool (see MakiniClient.__init__)."""


_KEEPALIVE_S = 2.0
"""How long an idle pooled connection is reused. Shorter than the idle timeouts of common
servers and proxies (uvicorn 5 s, nginx 75 s, load balancers 60 s): a server closing an idle
connection just as it is reused breaks that request (a POST cannot be retried blindly)."""


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing. Makini is a bearer-token API: a cookie one answer set
    must not ride along on the next request, which may carry another connection's token. And
    httpx's jar parses every response for cookies through ``http.cookiejar`` (a ``urllib``
    request per response): about a sixth of the client's CPU per request on the rotation hot
    path (``bench.bench_discovery --first-tokens``)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def __bool__(self) -> bool:
        return False


class _HttpClient(httpx.AsyncClient):
    """httpx's client with :class:`_NoCookies` (its ``cookies`` setter copies into a plain
    jar, so the jar is set behind it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = _NoCookies()


class MakiniClient:
    """One environment's client for the Makini API. Use as ``async with`` or call ``aclose``.

    ``transport`` replaces the network (tests); ``sleep`` the backoff wait; ``clock`` (Unix
    seconds) is used to read expiry times and to renew the admin token. ``on_call``, if set, is
    told of every request attempt: ``(environment, operation, outcome, seconds)`` with an
    operation such as ``issue`` or ``verify`` and an outcome of ``ok``, ``429``, ``4xx``,
    ``5xx`` or ``network`` (the metrics' hook; it must not raise).
    """

    on_call: CallHook | None = None

    def __init__(
        self,
        settings: MakiniSettings,
        client_secret: str,
        *,
        environment: str,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not client_secret:
            raise ValueError("the Makini client secret is empty")
        self._settings = settings
        self._secret = client_secret
        self._environment = environment
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._admin: _AdminToken | None = None
        self._auth_lock = asyncio.Lock()
        self._auth_attempts = 0
        self._auth_error: MakiniError | None = None
        self._log = log.bind(environment=environment)
        # httpcore checks every pooled connection (two syscalls each) on every request, so one
        # pool of N connections costs O(N) per request: spread the connections over shards of
        # at most _SHARD connections, used in turn (with a transport given, one shard uses it)
        size = settings.max_concurrency
        shards = 1 if transport is not None else max(1, -(-size // _SHARD))
        per_shard = -(-size // shards)
        # one TLS context for every shard: loading the CA bundle costs tens of milliseconds
        tls = httpx.create_ssl_context()  # honours SSL_CERT_FILE and SSL_CERT_DIR
        limits = httpx.Limits(
            max_connections=per_shard,
            max_keepalive_connections=per_shard,
            keepalive_expiry=_KEEPALIVE_S,
        )
        self._shards = [
            _HttpClient(
                base_url=settings.base_url,
                timeout=httpx.Timeout(settings.timeout_s),
                headers={"Accept": "application/json", "User-Agent": "makini-rotator"},
                # proxies from the environment still apply (httpx mounts them itself)
                transport=transport or http_transport(verify=tls, limits=limits),
                follow_redirects=False,
            )
            for _ in range(shards)
        ]
        # requests go out with absolute URLs: httpx parses a relative one, then the base URL
        # joined with it (a second parse); the verify URL, the same for every token, is
        # parsed once here
        self._base = str(self._shards[0].base_url).rstrip("/")
        self._current_url = httpx.URL(self._base + CURRENT_PATH)
        self._next_shard = itertools.cycle(self._shards)

    def __repr__(self) -> str:
        return (
            f"MakiniClient(environment={self._environment!r}, "
            f"base_url={self._settings.base_url!r}, client_id={self._settings.client_id!r})"
        )

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the API ---------------------------------------------------------------------------

    async def issue_token(self, connection_id: str) -> Issued:
        """Have the admin API issue a new token for ``connection_id``.

        Raises a :class:`MakiniError`; one with ``ambiguous=True`` means Makini may have issued
        a token that was not received (the old token may already be dead where issuing
        invalidates it).
        """
        call = _Call(
            "POST", f"/api/system/connections/{quote(connection_id, safe='')}/token",
            f"issuing a token for connection {connection_id}", ADMIN, idempotent=False, json={},
            operation="issue",
        )
        return await self._issued(call)

    async def refresh(self, refresh_token: Secret) -> Issued:
        """Trade a refresh token for a new pair (OAuth refresh grant). The old refresh token may
        be single-use: on an ``ambiguous`` error it may already be spent."""
        call = _Call(
            "POST", TOKEN_PATH, f"refreshing token {refresh_token.short}", None,
            idempotent=False,
            form={
                "grant_type": "refresh_token",
                "refresh_token": refresh_token.reveal(),
                "client_id": self._settings.client_id,
                "client_secret": self._secret,
            },
            secrets=(refresh_token.reveal(), self._secret),
            operation="refresh",
        )
        return await self._issued(call, grant=True)

    async def exchange_code(self, code: str, redirect_uri: str) -> Issued:
        """Trade a Makini Link authorization code for a pair (bootstraps refresh credentials)."""
        call = _Call(
            "POST", TOKEN_PATH, "exchanging an authorization code", None, idempotent=False,
            form={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": self._settings.client_id,
                "client_secret": self._secret,
            },
            secrets=(code, self._secret),
            operation="exchange_code",
        )
        return await self._issued(call, grant=True)

    async def verify(self, token: Secret, expected_connection_id: str) -> ConnectionInfo:
        """Check that ``token`` works and belongs to ``expected_connection_id``.

        Raises :class:`InvalidToken` for a dead token and :class:`WrongConnection` for a live
        token of another connection.
        """
        what = f"verifying token {token.short}"
        call = _Call(
            "GET", CURRENT_PATH, what, token, secrets=(token.reveal(),), operation="verify"
        )
        response = await self._request(call)
        data = _parse.json_object(response, what=what, where=self._where(call), ambiguous=False)
        request_id = request_id_from(response.headers)
        actual = data.get("id")
        if actual is None or isinstance(actual, dict | list | bool):
            raise MakiniProtocolError(
                f"{what}: Makini's answer names no connection id",
                status=response.status_code,
                where=self._where(call),
                request_id=request_id,
            )
        if str(actual) != expected_connection_id:
            raise WrongConnection(
                f"token {token.short} works but belongs to connection {actual}, "
                f"not {expected_connection_id}",
                status=response.status_code,
                request_id=request_id,
                where=self._where(call),
                hint="the token was stored under the wrong credential; do not promote it",
            )
        return ConnectionInfo(
            connection_id=str(actual),
            company_name=_text(data.get("company_name")),
            provider=_text(data.get("provider")),
            request_id=request_id,
        )

    async def check_admin(self) -> None:
        """Make sure the admin client can get a token (the cached one, or a new one): raises
        the :class:`MakiniError` that says why not (``rotator doctor``)."""
        await self._admin_token()

    async def connection_ids(self, *, max_pages: int = 10_000) -> set[str]:
        """The ids of the connections this environment's admin client sees (see
        :meth:`connections`)."""
        listing = await self.connections(max_pages=max_pages)
        return {item.connection_id for item in listing.items}

    async def connections(self, *, max_pages: int = 10_000) -> ConnectionList:
        """Every connection this environment's admin client sees (``GET
        /api/system/connections``; each item's ``key``, or ``id``), following ``links.next``
        pages on Makini's own host. ``complete`` is False when the listing stopped early (a
        next page on another host, a loop, ``max_pages``) or saw fewer connections than
        ``meta.total`` says exist (a connection deleted meanwhile shifts the pages): a caller
        that off-boards what is missing must not trust an incomplete listing."""
        path: str | None = CONNECTIONS_PATH
        found: dict[str, ListedConnection] = {}
        visited: set[str] = set()
        complete = True
        total: int | None = None
        while path is not None:
            if len(visited) >= max_pages or path in visited:
                complete = False
                break
            visited.add(path)
            call = _Call("GET", path, "listing connections", ADMIN, operation="list")
            response = await self._request(call)
            where = self._where(call)
            try:
                body = json.loads(response.content)
            except (ValueError, UnicodeDecodeError):
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("data"), list):
                raise MakiniProtocolError(
                    "listing connections: Makini's answer has no list under 'data'",
                    status=response.status_code,
                    where=where,
                    request_id=request_id_from(response.headers),
                    hint="check makini.base_url points at the Makini API",
                )
            for item in body["data"]:
                listed = _listed(item)
                if listed is not None:
                    found.setdefault(listed.connection_id, listed)
            meta = body.get("meta")
            if isinstance(meta, dict) and isinstance(meta.get("total"), int):
                total = meta["total"]
            links = body.get("links")
            following = links.get("next") if isinstance(links, dict) else None
            path = None
            if isinstance(following, str) and following:
                base = self._settings.base_url
                if following.startswith(base + "/"):
                    following = following[len(base):]
                # the admin token goes to Makini's own host only
                path = following if following.startswith("/") else None
                if path is None:
                    complete = False
                    self._log.warning("makini.next_page_elsewhere", note="listing stopped")
        if total is not None and len(found) < total:
            complete = False
        return ConnectionList(items=list(found.values()), complete=complete)

    async def disconnect(self, connection_id: str) -> None:
        """Delete the connection: all its tokens die and syncs stop. A 404 raises BadRequest
        (the connection is unknown to this environment's client)."""
        await self._request(_Call(
            "DELETE", f"/api/system/connections/{quote(connection_id, safe='')}",
            f"disconnecting connection {connection_id}", ADMIN, operation="disconnect",
        ))

    async def revoke_token(self, token: Secret) -> bool:
        """Revoke one token at ``settings.revoke_path``; ``False`` when none is configured."""
        path = self._settings.revoke_path
        if path is None:
            return False
        await self._request(_Call(
            "POST", path, f"revoking token {token.short}", ADMIN,
            json={"token": token.reveal()}, secrets=(token.reveal(),), operation="revoke",
        ))
        return True

    async def revoke_pair(self, tokens: TokenPair) -> bool:
        """Revoke a pair's access and refresh token at ``settings.revoke_path``; ``False`` when
        none is configured. Each call is idempotent (an unknown or dead token is no error)."""
        if not await self.revoke_token(tokens.access):
            return False
        if tokens.refresh is not None:
            await self.revoke_token(tokens.refresh)
        return True

    # --- plumbing --------------------------------------------------------------------------

    def _where(self, call: _Call) -> str:
        return f"makini {self._environment}: {call.method} {call.path}"

    async def _issued(self, call: _Call, *, grant: bool = False) -> Issued:
        try:
            response = await self._request(call)
        except BadRequest as exc:
            if grant and (exc.code or "").lower() == "invalid_grant":
                raise InvalidToken(
                    exc.message, status=exc.status, code=exc.code, request_id=exc.request_id,
                    where=exc.where, hint="the refresh token or code is invalid, expired or "
                    "already used; the customer may have to reconnect",
                ) from exc
            raise
        where = self._where(call)
        data = _parse.json_object(response, what=call.what, where=where, ambiguous=True)
        tokens = _parse.token_pair(
            data, mode=self._settings.expires_in, now=self._clock(),
            default_lifetime=self._settings.default_token_lifetime,
            what=call.what, where=where, ambiguous=True,
        )
        return Issued(tokens=tokens, request_id=request_id_from(response.headers))

    async def _admin_token(self) -> Secret:
        """The cached admin token, or a new one. One authentication at a time: callers that
        waited for one that failed get its error rather than each trying again in turn."""
        cached = self._admin
        if cached is not None and self._clock() < cached.renew_at:
            return cached.token
        # an authentication already under way is the one this caller waits for
        seen = self._auth_attempts - (1 if self._auth_lock.locked() else 0)
        async with self._auth_lock:
            cached = self._admin
            if cached is not None and self._clock() < cached.renew_at:
                return cached.token
            if self._auth_attempts != seen and self._auth_error is not None:
                raise self._auth_error
            self._auth_attempts += 1
            try:
                self._admin = await self._authenticate()
            except MakiniError as exc:
                self._auth_error = exc
                raise
            self._auth_error = None
            return self._admin.token

    async def _authenticate(self) -> _AdminToken:
        call = _Call(
            "POST", TOKEN_PATH, f"authenticating client {self._settings.client_id}", None,
            json={
                "grant_type": "client_credentials",
                "client_id": self._settings.client_id,
                "client_secret": self._secret,
            },
            secrets=(self._secret,),
            operation="authenticate",
        )
        response = await self._request(call)
        now = self._clock()
        where = self._where(call)
        data = _parse.json_object(response, what=call.what, where=where, ambiguous=False)
        pair = _parse.token_pair(
            data, mode=self._settings.expires_in, now=now,
            default_lifetime=self._settings.default_token_lifetime,
            what=call.what, where=where, ambiguous=False,
        )
        assert pair.expires_at is not None  # token_pair defaults it
        lifetime = max(0.0, pair.expires_at.timestamp() - now)
        margin = min(ADMIN_RENEW_MARGIN_S, lifetime / 2)
        self._log.debug("makini.admin_token", token=pair.access.short, lifetime_s=int(lifetime))
        return _AdminToken(token=pair.access, renew_at=now + lifetime - margin)

    def _forget_admin(self, token: Secret) -> None:
        if self._admin is not None and self._admin.token == token:
            self._admin = None

    async def _request(self, call: _Call) -> httpx.Response:
        """Send ``call`` with retries; return a 2xx response or raise a MakiniError."""
        budget = RetryBudget(self._settings.retry, self._sleep, self._rng)
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            admin = await self._admin_token() if isinstance(call.auth, _Admin) else None
            try:
                return await self._send(call, attempt, admin)
            except InvalidToken:
                if admin is None or reauthenticated:
                    raise
                reauthenticated = True  # the admin token died early: authenticate once more
                self._forget_admin(admin)
                attempt -= 1
            except MakiniError as exc:
                delay = budget.delay_s(attempt, exc)
                if delay is None:
                    raise
                self._log.debug(
                    "makini.retry", method=call.method, path=call.path, attempt=attempt,
                    delay_s=round(delay, 3), error=type(exc).__name__, status=exc.status,
                )
                await budget.wait(delay)

    async def _send(self, call: _Call, attempt: int, admin: Secret | None) -> httpx.Response:
        bearer = admin if admin is not None else call.auth
        headers: dict[str, str] = {}
        secrets = call.secrets
        if isinstance(bearer, Secret):
            headers["Authorization"] = f"Bearer {bearer.reveal()}"
            secrets = (*secrets, bearer.reveal())
        where = self._where(call)
        started = time.monotonic()
        try:
            url = (
                self._current_url if call.path == CURRENT_PATH
                else self._base + "/" + call.path.lstrip("/")
            )
            response = await next(self._next_shard).request(
                call.method, url, headers=headers, json=call.json, data=call.form
            )
        except _HTTPX_ERRORS as exc:
            if self.on_call is not None:
                self.on_call(
                    self._environment, call.operation, "network", time.monotonic() - started
                )
            error = error_from_exception(
                exc, what=call.what, where=where, idempotent=call.idempotent,
                now=self._clock(), secrets=secrets,
            )
            self._log.debug(
                "makini.request", method=call.method, path=call.path, attempt=attempt,
                error=type(exc).__name__,
            )
            raise error from exc
        elapsed = time.monotonic() - started
        if self.on_call is not None:
            self.on_call(
                self._environment, call.operation, _outcome(response.status_code), elapsed
            )
        self._log.debug(
            "makini.request", method=call.method, path=call.path, status=response.status_code,
            request_id=request_id_from(response.headers), attempt=attempt,
            elapsed_ms=round(elapsed * 1000, 1),
        )
        if response.is_success:
            return response
        raise error_from_response(
            response, what=call.what, where=where, idempotent=call.idempotent,
            now=self._clock(), secrets=secrets,
        )


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "429"
    return "4xx" if status < 500 else "5xx"


def _listed(item: object) -> ListedConnection | None:
    """A listed connection from one item of the list (``key`` or ``id``; the platform is
    ``integration_name`` or ``provider``; ``user_metadata`` an object or a JSON string)."""
    if not isinstance(item, dict):
        return None
    key = _text(item.get("key")) or _text(item.get("id"))
    if key is None:
        return None
    raw = item.get("user_metadata", item.get("metadata"))
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    metadata = (
        {str(k): v for k, v in raw.items() if isinstance(v, str)}
        | {str(k): str(v) for k, v in raw.items() if isinstance(v, int | float)
           and not isinstance(v, bool)}
        if isinstance(raw, dict) else {}
    )
    return ListedConnection(
        connection_id=key,
        name=_text(item.get("name")),
        platform=_text(item.get("integration_name")) or _text(item.get("provider")),
        company=_text(item.get("company_name")) or _text(item.get("company")),
        status=_text(item.get("status")),
        metadata=metadata,
    )


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
