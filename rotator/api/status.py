"""The status page's HTTP side: ``GET /status`` (rendered on the server), its sign-in, and
``GET /status/events`` (server-sent events) that keep it live. What it shows, and when that
changes, is :mod:`rotator.api.status_board`.

Access: a status key (``rotator keys create ENV --name N --status``, which opens this page and
nothing else) or an admin key of the environment; never a reader key. A browser cannot send a
bearer header when it navigates, so ``POST /status/login`` takes the key once, from a form, and
answers with a cookie holding a signed session: the key id, an expiry (:data:`SESSION_S`) and an
HMAC keyed from the key's stored hash (:meth:`KeyIndex.session_mac`). The cookie is HttpOnly
(no script reads it), SameSite=Strict (no other site's page sends it), Secure over TLS, and
scoped to ``/status`` (the API's routes take only bearer keys, so it opens nothing else). Every
replica on the journal checks it, and revoking the key ends its sessions within a replica
poll. The page and each event-stream connection renew it while the page is open. The
Content-Security-Policy allows only this app's own stylesheet and script.

Each new rendering of the board goes out as an SSE ``board`` event whose HTML the page's script
swaps in. A stream lasts at most :data:`STREAM_MAX_S` (the browser reconnects, with
``Last-Event-ID``) and ends at once when :meth:`StatusBoard.close` is called (``serve`` calls
it when it stops serving), so an open page never holds a shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Request
from markupsafe import Markup
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from rotator.api.routing import api_router
from rotator.api.status_board import Snapshot, StatusBoard, render

if TYPE_CHECKING:
    from rotator.keys import KeyIndex, KeyInfo

log = structlog.get_logger("rotator.api.status")

COOKIE = "rotator_status"
SESSION_S = 3600
"""How long a session lives without the page open (the page renews it while it is)."""
STREAM_MAX_S = 25.0
"""One event-stream connection at most; the browser reconnects (renewing the session)."""
KEEPALIVE_S = 10.0
RETRY_MS = 1000
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
STATIC = {"status.css": "text/css; charset=utf-8", "status.js": "text/javascript; charset=utf-8"}


# --- sessions ------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def issue_session(keys: KeyIndex, key: KeyInfo, now_s: float) -> str | None:
    """A cookie value for ``key``'s session, valid :data:`SESSION_S` from ``now_s``."""
    expires = int(now_s) + SESSION_S
    mac = keys.session_mac(key.key_id, f"{key.key_id}.{expires}".encode())
    return None if mac is None else f"{key.key_id}.{expires}.{_b64(mac)}"


def check_session(keys: KeyIndex, value: str | None, now_s: float) -> KeyInfo | None:
    """The key a cookie value is a live, unexpired session of, if it may view the page."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) < now_s:
        return None
    key_id, expires, mac = parts
    expected = keys.session_mac(key_id, f"{key_id}.{expires}".encode())
    if expected is None or not hmac.compare_digest(_b64(expected).encode(), mac.encode()):
        return None
    info = keys.live(key_id)
    return info if info is not None and info.may_view_status else None


@cache
def static_file(name: str) -> bytes:
    return resources.files("rotator.api").joinpath("status_page", name).read_bytes()


# --- the routes ----------------------------------------------------------------------------------


def _event(name: str, event_id: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {name}\nid: {event_id}\n{lines}\n".encode()


def _html(body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status_code, headers=HEADERS)


def _set_session(response: Response, request: Request, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_S,
        path="/status",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _same_origin(request: Request) -> bool:
    """A form post from this app's own page: by the browser's ``Sec-Fetch-Site``, else by
    ``Origin`` (a browser sends one or both with every POST; a script without either is no
    browser another site could steer)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    return origin is None or (host is not None and origin == f"{request.url.scheme}://{host}")


def router(board: StatusBoard) -> APIRouter:
    api = api_router(["status"])
    state = board.state
    keys = state.keys

    def login_page(problem: str | None, status_code: int) -> HTMLResponse:
        body = render("login.html", problem=problem, session_minutes=SESSION_S // 60)
        return _html(body, status_code)

    def message(title: str, problem: str, status_code: int) -> HTMLResponse:
        body = render("message.html", title=title, problem=problem)
        return _html(body, status_code)

    def session_of(request: Request) -> KeyInfo | None:
        return check_session(keys, request.cookies.get(COOKIE), time.time())

    @api.get("/status", include_in_schema=False)
    async def page(request: Request) -> Response:
        key = session_of(request)
        if key is None:
            return login_page(None, 401 if request.cookies.get(COOKIE) else 200)
        env = key.environment
        if env not in state.runtime.environments:
            return message(
                "not served here",
                f"this server does not serve environment {env!r}: open the status page of a "
                "server that serves it",
                404,
            )
        snap = await board.snapshot(env)
        body = render(
            "page.html",
            environment=env,
            key_kind=key.kind,
            key_name=key.name,
            revision=snap.revision,
            board=Markup(snap.html),  # noqa: S704 - rendered by the autoescaping board template
        )
        response = _html(body)
        if (value := issue_session(keys, key, time.time())) is not None:
            _set_session(response, request, value)
        return response

    @api.post("/status/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return message("refused", "a sign-in must come from this server's own page", 403)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        text = (form.get("key") or [""])[0].strip()
        key = keys.verify(text) if text else None
        if key is None:
            return login_page(
                "That is not a live key of this server: paste a status or admin key "
                "(rotator keys list shows which exist; rotator keys create ENV --name NAME "
                "--status makes one).",
                401,
            )
        if not key.may_view_status:
            log.info("status.login_refused", key_id=key.key_id, kind=key.kind)
            return login_page(
                f"A {key.kind} key cannot open the status page: use a status key "
                "(rotator keys create ENV --name NAME --status) or an admin key.",
                403,
            )
        value = issue_session(keys, key, time.time())
        if value is None:  # revoked in between
            return login_page("That key was just revoked: use another.", 401)
        log.info("status.login", key_id=key.key_id, kind=key.kind, environment=key.environment)
        response = RedirectResponse("/status", status_code=303, headers=HEADERS)
        _set_session(response, request, value)
        return response

    @api.post("/status/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        response = RedirectResponse("/status", status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/status", httponly=True, samesite="strict")
        return response

    @api.get("/status/events", include_in_schema=False)
    async def events(request: Request, known: str = "") -> Response:
        key = session_of(request)
        if key is None or key.environment not in state.runtime.environments:
            return Response(
                "no status session: open /status and sign in with a status or admin key\n",
                status_code=401,
                media_type="text/plain",
                headers=HEADERS,
            )
        env, key_id = key.environment, key.key_id
        seen = request.headers.get("last-event-id") or known

        async def stream() -> AsyncIterator[bytes]:
            board.join(env)
            try:
                yield f"retry: {RETRY_MS}\n\n".encode()
                current = seen
                snap: Snapshot | None = await board.snapshot(env)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + STREAM_MAX_S
                while not board.closing:
                    info = keys.live(key_id)
                    if info is None or not info.may_view_status:
                        yield b"event: end\ndata: signed out\n\n"
                        return
                    if snap is not None and snap.revision != current:
                        current = snap.revision
                        yield _event("board", snap.revision, snap.html)
                    else:
                        yield b": keep-alive\n\n"
                    left = deadline - loop.time()
                    if left <= 0:
                        return
                    snap = await board.wait(env, current, min(KEEPALIVE_S, left))
            finally:
                board.leave(env)

        response = StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={**HEADERS, "X-Accel-Buffering": "no"},
        )
        if (value := issue_session(keys, key, time.time())) is not None:
            _set_session(response, request, value)
        return response

    @api.get("/status/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        media = STATIC.get(name)
        if media is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(
            static_file(name), media_type=media, headers={**HEADERS, "Cache-Control": "no-cache"}
        )

    return api
