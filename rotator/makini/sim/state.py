"""The simulator's model of Makini: clients, connections, tokens and link codes, no HTTP.

Choices where Makini is silent (each is an option where the rotator must cope with both):

- A connection belongs to the admin client that first referenced it (``auto_provision``) or was
  created for it; any other client gets 404 for it, as environments stay apart at Makini too.
- Issuing a token (admin API) with ``issue_invalidates_previous`` revokes the connection's other
  live access *and* refresh tokens: the connection has one token again.
- Refreshing returns a new pair. With ``refresh_single_use`` the used refresh token is revoked.
  The old access token stays valid until it expires, as most OAuth servers do, unless
  ``issue_invalidates_previous`` is set, in which case a refresh replaces the pair like an issue.
- A refresh token or code that is unknown, dead, or another client's gets 400 ``INVALID_GRANT``
  (OAuth's ``invalid_grant``); a dead bearer token gets 401 ``AUTHENTICATION_FAILED``.
- Refreshing with an admin refresh token returns a new admin pair and revokes the client's
  other admin tokens (what the docs say of admin refresh).
- Disconnecting revokes every token of the connection; the id stays dead (404) until reset.

Token values live only here; everything the inspection surface shows is a fingerprint. Given
a ``path``, the state (connections and their tokens, values included) is kept in that file,
mode 0600, rewritten atomically after each change and read back at start: a simulator that
restarts (``make run`` again) still knows the tokens it issued.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rotator.model import fingerprint

Kind = Literal["access", "refresh", "admin", "admin_refresh"]
DAY_S = 86400.0
CODE_LIFETIME_S = 600.0
KEEP_DEAD_S = 3600.0
"""A token revoked or expired longer ago than this is not written to the state file (it is
as dead to a client as a token never issued: 401)."""
STATE_VERSION = 1
_JWT_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()


class SimOptions(BaseModel):
    """How the simulator behaves. Any field can change at runtime (``PATCH /_sim/options``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    clients: dict[str, str] = Field(
        default_factory=lambda: {
            "local-prod": "local-prod-secret",
            "local-dev": "local-dev-secret",
        },
        description="client_id → client_secret of the admin clients Makini knows.",
    )
    auto_provision: bool = True
    issue_invalidates_previous: bool = True
    refresh_single_use: bool = True
    token_lifetime_s: float = Field(default=30 * DAY_S, gt=0)
    refresh_lifetime_s: float = Field(default=31 * DAY_S, gt=0)
    admin_token_lifetime_s: float = Field(default=30 * DAY_S, gt=0)
    expires_in_format: Literal["timestamp", "seconds"] = "timestamp"
    error_shape: Literal["nested", "flat", "list", "plain"] = "nested"
    request_id_header: str = Field(default="X-Request-Id", min_length=1)
    retry_after_format: Literal["seconds", "http-date"] = "seconds"
    rate_limit_per_minute: int | None = Field(default=None, ge=1)
    latency_ms: float = Field(default=0.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None
    outage_until: float | None = None
    fail_next: list[int] = Field(
        default_factory=list,
        description="Statuses the next API requests answer with, one each, in order "
        "(502 and 504 after processing the request, any other before).",
    )
    fail_only: str | None = Field(
        default=None,
        description="The one API route fail_next and error_rate strike, named as /_sim/stats "
        "names it (e.g. 'POST /api/system/connections/{id}/token'); None: every API route.",
    )
    garbage: bool = False
    revoke_endpoint: bool = False
    clock_offset_s: float = Field(default=0.0, description="Added to the real clock (tests).")
    page_size: int = Field(
        default=100, ge=1, le=10_000,
        description="Connections per page of GET /api/system/connections (a request's "
        "per_page overrides it, up to max_page_size).",
    )
    max_page_size: int = Field(default=1000, ge=1, le=10_000)


class ApiError(Exception):
    """An error answer: rendered in the configured ``error_shape`` by the app."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class Token:
    value: str = field(repr=False)
    kind: Kind
    client_id: str
    connection_id: str | None
    issued_at: float
    expires_at: float
    revoked_at: float | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"

    def view(self, now: float) -> dict[str, Any]:
        """The inspection view: never the value."""
        return {
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "client_id": self.client_id,
            "connection_id": self.connection_id,
            "status": self.status(now),
            "issued_at": _iso(self.issued_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
        }


@dataclass
class Connection:
    id: str
    client_id: str
    created_at: float
    deleted_at: float | None = None
    tokens: list[Token] = field(default_factory=list)
    platform: str = "simulated"
    company: str | None = None
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def listed(self) -> dict[str, Any]:
        """One item of ``GET /api/system/connections`` (Makini's ``Connection`` schema;
        ``user_metadata`` is a JSON string there)."""
        return {
            "key": self.id,
            "name": self.name or self.company_name,
            "email": f"{self.id}@example.com",
            "status": "active",
            "integration_name": self.platform,
            "company_name": self.company_name,
            "tags": [],
            "user_metadata": json.dumps(self.metadata, separators=(",", ":")),
            "client_id": self.client_id,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.created_at),
            "connected_at": _iso(self.created_at),
        }

    @property
    def company_name(self) -> str:
        return self.company or f"Company {self.id}"

    def integration(self) -> dict[str, Any]:
        """The ``data`` of ``GET /api/integrations/current``."""
        return {
            "id": self.id,
            "company_name": self.company_name,
            "email": f"{self.id}@example.com",
            "provider": self.platform,
            "updated_at": _iso(self.created_at),
            "sync_status": "done",
            "sync_updated_at": _iso(self.created_at),
        }

    def view(self, now: float) -> dict[str, Any]:
        statuses = Counter(t.status(now) for t in self.tokens)
        return {
            **self.integration(),
            "client_id": self.client_id,
            "name": self.name,
            "metadata": dict(self.metadata),
            "status": "disconnected" if self.deleted_at is not None else "active",
            "tokens": dict(statuses),
        }


@dataclass
class LinkCode:
    client_id: str
    connection_id: str
    redirect_uri: str | None
    expires_at: float
    used: bool = False


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SimState:
    """Everything the simulator knows. Single-threaded: only the server's event loop uses it."""

    def __init__(self, options: SimOptions | None = None, *, path: Path | None = None) -> None:
        self.options = options or SimOptions()
        self.rng = random.Random(self.options.seed)
        self.path = path
        self.reset()
        if path is not None:
            self.load(path)

    # --- persistence -------------------------------------------------------------------------

    def load(self, path: Path) -> None:
        """Read the connections and tokens saved at ``path`` (nothing there: start empty).
        A file that does not parse is a ValueError naming the file, never a token."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, not {STATE_VERSION}")
            for item in doc["connections"]:
                conn = Connection(
                    str(item["id"]), str(item["client_id"]), float(item["created_at"]),
                    _float(item.get("deleted_at")),
                    platform=str(item.get("platform", "simulated")),
                    company=item.get("company"), name=item.get("name"),
                    metadata={str(k): str(v) for k, v in (item.get("metadata") or {}).items()},
                )
                self._keep(conn)
            for item in doc["tokens"]:
                token = Token(
                    str(item["value"]), item["kind"], str(item["client_id"]),
                    item.get("connection_id"), float(item["issued_at"]),
                    float(item["expires_at"]), _float(item.get("revoked_at")),
                )
                self.tokens[token.value] = token
                self.by_fingerprint[token.fingerprint] = token
                if token.connection_id in self.connections:
                    self.connections[token.connection_id].tokens.append(token)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"the simulator's state file {path} does not parse ({type(exc).__name__}); "
                "move it away to start with an empty simulator"
            ) from None

    def save(self) -> None:
        """Write the state to ``path`` (if given): a temporary file beside it, fsynced, then
        renamed over it, so a crash leaves the old state or the new one, never half."""
        if self.path is None:
            return
        now = self.now()
        doc = {
            "version": STATE_VERSION,
            "connections": [
                {"id": c.id, "client_id": c.client_id, "created_at": c.created_at,
                 "deleted_at": c.deleted_at, "platform": c.platform, "company": c.company,
                 "name": c.name, "metadata": c.metadata}
                for c in self.connections.values()
            ],
            "tokens": [
                {"value": t.value, "kind": t.kind, "client_id": t.client_id,
                 "connection_id": t.connection_id, "issued_at": t.issued_at,
                 "expires_at": t.expires_at, "revoked_at": t.revoked_at}
                for t in self.tokens.values()
                if t.status(now) == "active"
                or now - min(t.revoked_at or t.expires_at, t.expires_at) < KEEP_DEAD_S
            ],
        }
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(doc, handle, separators=(",", ":"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def reset(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.live: dict[str, dict[str, Connection]] = {}
        """Each client's connections that are not deleted, in the order they were created."""
        self._pages: dict[str, list[Connection]] = {}  # live[client] as a list, until a change
        self.tokens: dict[str, Token] = {}  # by value
        self.by_fingerprint: dict[str, Token] = {}
        self.codes: dict[str, LinkCode] = {}
        self.stats: Counter[tuple[str, int]] = Counter()
        self.received: Counter[str] = Counter()  # API requests by route, counted on arrival
        self.inflight: Counter[tuple[str, str | None]] = Counter()
        """API requests being answered now, by route and connection id (where the path has
        one): a test can stop a client while its request is inside Makini."""
        self.windows: dict[str, tuple[int, int]] = {}  # connection → (minute, count)
        self.busy = 0
        """API requests being answered now, all routes together."""
        self.peak_busy = 0
        """The most API requests ever answered at once since the reset: what a client's
        concurrency limit (``makini.max_concurrency``) is checked against."""

    def set_options(self, options: SimOptions) -> None:
        if options.seed != self.options.seed:
            self.rng = random.Random(options.seed)
        self.options = options

    def now(self) -> float:
        return time.time() + self.options.clock_offset_s

    # --- tokens ----------------------------------------------------------------------------

    def _mint(self, kind: Kind, client_id: str, connection: Connection | None) -> Token:
        now = self.now()
        life = {
            "access": self.options.token_lifetime_s,
            "refresh": self.options.refresh_lifetime_s,
            "admin": self.options.admin_token_lifetime_s,
            "admin_refresh": self.options.admin_token_lifetime_s + DAY_S,
        }[kind]
        claims = {
            "sub": connection.id if connection else client_id,
            "kind": kind,
            "iat": int(now),
            "exp": int(now + life),
            "jti": secrets.token_hex(8),
        }
        value = f"{_JWT_HEADER}.{_b64(claims)}.{secrets.token_urlsafe(32)}"
        conn_id = connection.id if connection else None
        token = Token(value, kind, client_id, conn_id, now, now + life)
        self.tokens[value] = token
        self.by_fingerprint[token.fingerprint] = token
        if connection is not None:
            connection.tokens.append(token)
        return token

    def _pair(self, client_id: str, connection: Connection | None) -> dict[str, Any]:
        admin = connection is None
        access = self._mint("admin" if admin else "access", client_id, connection)
        refresh = self._mint("admin_refresh" if admin else "refresh", client_id, connection)
        if self.options.expires_in_format == "timestamp":
            expires_in = int(access.expires_at)
        else:
            expires_in = int(access.expires_at - access.issued_at)
        return {
            "access_token": access.value,
            "refresh_token": refresh.value,
            "token_type": "bearer",
            "expires_in": expires_in,
        }

    def revoke(self, token: Token) -> None:
        if token.revoked_at is None:
            token.revoked_at = self.now()

    def _revoke_live(self, connection: Connection, keep: Token | None = None) -> None:
        now = self.now()
        for token in connection.tokens:
            if token is not keep and token.status(now) == "active":
                token.revoked_at = now

    def _live(self, value: str) -> Token | None:
        token = self.tokens.get(value)
        return token if token is not None and token.status(self.now()) == "active" else None

    # --- clients and connections -----------------------------------------------------------

    def check_client(self, client_id: str, client_secret: str) -> None:
        expected = self.options.clients.get(client_id)
        if expected is None or not secrets.compare_digest(expected, client_secret):
            raise ApiError(401, "INVALID_CLIENT", "Client authentication failed.")

    def admin_client(self, bearer: str | None) -> str:
        """The client id of a live admin token, else 401/403."""
        token = self._live(bearer) if bearer else None
        if token is None:
            raise ApiError(401, "AUTHENTICATION_FAILED", "Unauthenticated.")
        if token.kind != "admin":
            raise ApiError(403, "FORBIDDEN", "This action needs an admin token.")
        return token.client_id

    def connection(self, client_id: str, connection_id: str, *, create: bool = True) -> Connection:
        conn = self.connections.get(connection_id)
        if conn is None and create and self.options.auto_provision:
            conn = self.add_connection(connection_id, client_id)
        if conn is None or conn.client_id != client_id or conn.deleted_at is not None:
            raise ApiError(404, "NOT_FOUND", "Connection not found.")
        return conn

    def add_connection(
        self,
        connection_id: str,
        client_id: str,
        *,
        platform: str = "simulated",
        company: str | None = None,
        name: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Connection:
        if connection_id in self.connections:
            raise ApiError(409, "CONFLICT", "The connection exists.")
        if client_id not in self.options.clients:
            raise ApiError(422, "VALIDATION_FAILED", "Unknown client.")
        conn = Connection(
            connection_id, client_id, self.now(), platform=platform, company=company,
            name=name, metadata=dict(metadata or {}),
        )
        self._keep(conn)
        return conn

    def _keep(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        if conn.deleted_at is None:
            self.live.setdefault(conn.client_id, {})[conn.id] = conn
            self._pages.pop(conn.client_id, None)

    def _gone(self, conn: Connection) -> None:
        conn.deleted_at = self.now()
        self.live.get(conn.client_id, {}).pop(conn.id, None)
        self._pages.pop(conn.client_id, None)

    def remove_connection(self, connection_id: str) -> Connection:
        """The connection disappears (as when the customer disconnects at Makini): its tokens
        die and the admin API no longer lists it."""
        conn = self.connections.get(connection_id)
        if conn is None or conn.deleted_at is not None:
            raise ApiError(404, "NOT_FOUND", "Connection not found.")
        self._revoke_live(conn)
        self._gone(conn)
        return conn

    def page(self, client_id: str, page: int, per_page: int) -> tuple[list[Connection], int]:
        """One page (from 1) of the client's live connections, and how many there are: a
        slice of a list kept until the next change, never a scan of every connection."""
        listed = self._pages.get(client_id)
        if listed is None:
            listed = self._pages[client_id] = list(self.live.get(client_id, {}).values())
        start = (page - 1) * per_page
        return listed[start:start + per_page], len(listed)

    def rate_check(self, connection_id: str) -> None:
        limit = self.options.rate_limit_per_minute
        if limit is None:
            return
        now = self.now()
        minute = int(now // 60)
        window, count = self.windows.get(connection_id, (minute, 0))
        if window != minute:
            count = 0
        if count >= limit:
            retry = max(1.0, math.ceil((minute + 1) * 60 - now))
            raise ApiError(429, "RATE_LIMIT_EXCEEDED", "Too many requests.", retry_after_s=retry)
        self.windows[connection_id] = (minute, count + 1)

    # --- the API ---------------------------------------------------------------------------

    def client_credentials(self, client_id: str, client_secret: str) -> dict[str, Any]:
        self.check_client(client_id, client_secret)
        return self._pair(client_id, None)

    def issue(self, client_id: str, connection_id: str) -> dict[str, Any]:
        conn = self.connection(client_id, connection_id)
        self.rate_check(conn.id)
        if self.options.issue_invalidates_previous:
            self._revoke_live(conn)
        return self._pair(client_id, conn)

    def refresh(self, client_id: str, client_secret: str, value: str) -> dict[str, Any]:
        self.check_client(client_id, client_secret)
        token = self._live(value)
        if token is None or token.client_id != client_id or token.kind not in (
            "refresh", "admin_refresh"
        ):
            raise ApiError(400, "INVALID_GRANT", "The refresh token is invalid.")
        if token.kind == "admin_refresh":
            for other in self.tokens.values():
                if other.client_id == client_id and other.kind in ("admin", "admin_refresh"):
                    self.revoke(other)
            return self._pair(client_id, None)
        conn = self.connection(client_id, token.connection_id or "", create=False)
        self.rate_check(conn.id)
        if self.options.issue_invalidates_previous:
            self._revoke_live(conn, keep=token)
        if self.options.refresh_single_use:
            self.revoke(token)
        return self._pair(client_id, conn)

    def link_code(self, connection_id: str, client_id: str | None, redirect_uri: str | None) -> str:
        client_id = client_id or next(iter(self.options.clients), "")
        conn = self.connection(client_id, connection_id)
        code = secrets.token_urlsafe(16)
        self.codes[code] = LinkCode(client_id, conn.id, redirect_uri, self.now() + CODE_LIFETIME_S)
        return code

    def exchange(
        self, client_id: str, client_secret: str, code: str, redirect_uri: str | None
    ) -> dict[str, Any]:
        self.check_client(client_id, client_secret)
        link = self.codes.get(code)
        if (
            link is None or link.used or link.client_id != client_id
            or self.now() >= link.expires_at
            or (link.redirect_uri is not None and link.redirect_uri != redirect_uri)
        ):
            raise ApiError(400, "INVALID_GRANT", "The authorization code is invalid.")
        link.used = True
        conn = self.connection(client_id, link.connection_id, create=False)
        if self.options.issue_invalidates_previous:
            self._revoke_live(conn)
        return self._pair(client_id, conn)

    def current(self, bearer: str | None) -> dict[str, Any]:
        token = self._live(bearer) if bearer else None
        if token is None or token.kind != "access" or token.connection_id is None:
            raise ApiError(401, "AUTHENTICATION_FAILED", "Unauthenticated.")
        conn = self.connections[token.connection_id]
        self.rate_check(conn.id)
        return conn.integration()

    def disconnect(self, client_id: str, connection_id: str) -> None:
        conn = self.connection(client_id, connection_id, create=False)
        self.rate_check(conn.id)
        self._revoke_live(conn)
        self._gone(conn)

    def revoke_value(self, client_id: str, value: str) -> None:
        """RFC 7009 style: an unknown token is not an error; another client's is left alone."""
        token = self.tokens.get(value)
        if token is not None and token.client_id == client_id:
            self.revoke(token)
