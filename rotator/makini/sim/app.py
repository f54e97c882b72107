"""The simulator's HTTP surface: the Makini API routes and the ``/_sim/`` inspection routes.

API routes go through fault injection in this order: latency, outage (503 with Retry-After),
scripted (``fail_next``) or random (``error_rate``: 500, 502 or 503) errors (on every route, or
on the one ``fail_only`` names), the handler, then
``garbage`` (a processed request answered 200 with a non-JSON body). A 502 or 504 is answered
*after* the request was processed, so it loses a token that was issued; any other fault comes
before processing. ``/_sim/`` routes are never faulty, never slow, and never show a token
value: tokens appear by fingerprint only.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .state import ApiError, Connection, SimOptions, SimState
from .webhooks import send_endpoint as send_webhooks

Handler = Callable[[Request], Awaitable[Response]]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "authorization_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_FAULT_CODES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}
_AFTER_PROCESSING = frozenset({502, 504})  # the gateway lost an answer Makini produced
_GARBAGE = b"<html><body><h1>200 OK</h1><p>maintenance page</p></body></html>"
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _fault(status: int) -> ApiError:
    return ApiError(
        status, _FAULT_CODES.get(status, "SIMULATED"), "Simulated failure.",
        retry_after_s=1.0 if status == 429 else None,
    )


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


async def _fields(request: Request) -> dict[str, str]:
    """A JSON object or a form body as a dict of strings (no python-multipart needed)."""
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise ApiError(400, "INVALID_REQUEST", "The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_REQUEST", "The body must be a JSON object.")
        return {str(k): str(v) for k, v in body.items() if isinstance(v, str | int | float)}
    return dict(parse_qsl(raw.decode("utf-8", "replace")))


class SimApp:
    """Builds the Starlette app around one :class:`SimState`."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    def build(self) -> Starlette:
        api = self._api
        routes = [
            Route("/link/token", api("POST /link/token", self.token), methods=["POST"]),
            Route("/api/integrations/current",
                  api("GET /api/integrations/current", self.current), methods=["GET"]),
            Route("/api/system/connections",
                  api("GET /api/system/connections", self.list_connections), methods=["GET"]),
            Route("/api/system/connections/{id}/token",
                  api("POST /api/system/connections/{id}/token", self.issue), methods=["POST"]),
            Route("/api/system/connections/{id}",
                  api("DELETE /api/system/connections/{id}", self.disconnect),
                  methods=["DELETE"]),
            Route("/api/system/tokens/revoke",
                  api("POST /api/system/tokens/revoke", self.revoke), methods=["POST"]),
            Route("/_sim/connections", self.sim_connections, methods=["GET", "POST"]),
            Route("/_sim/connections/{id}", self.sim_connection, methods=["GET", "DELETE"]),
            Route("/_sim/connections/{id}/link-code", self.sim_link_code,
                  methods=["GET", "POST"]),
            Route("/_sim/tokens", self.sim_tokens, methods=["GET"]),
            Route("/_sim/tokens/{fingerprint}", self.sim_token, methods=["GET"]),
            Route("/_sim/tokens/{fingerprint}/revoke", self.sim_revoke, methods=["POST"]),
            Route("/_sim/options", self.sim_options, methods=["GET", "PATCH"]),
            Route("/_sim/reset", self.sim_reset, methods=["POST"]),
            Route("/_sim/stats", self.sim_stats, methods=["GET"]),
            Route("/_sim/inflight", self.sim_inflight, methods=["GET"]),
            Route("/_sim/webhooks/send", send_webhooks, methods=["POST"]),
            Route("/{path:path}", api("unmatched", self.unmatched), methods=_ALL_METHODS),
        ]
        return Starlette(routes=routes)

    # --- fault injection and error rendering ------------------------------------------------

    def _api(self, key: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            state = self.state
            opts = state.options
            request_id = uuid.uuid4().hex
            state.received[key] += 1
            busy = (key, request.path_params.get("id"))
            state.inflight[busy] += 1
            state.busy += 1
            state.peak_busy = max(state.peak_busy, state.busy)
            try:
                if opts.latency_ms:
                    await asyncio.sleep(opts.latency_ms / 1000)
                now = state.now()
                if opts.outage_until is not None and now < opts.outage_until:
                    raise ApiError(503, "SERVICE_UNAVAILABLE", "Makini is under maintenance.",
                                   retry_after_s=math.ceil(opts.outage_until - now))
                fault = None
                if opts.fail_only is not None and opts.fail_only != key:
                    pass  # the scripted and random faults strike another route
                elif opts.fail_next:
                    fault = opts.fail_next.pop(0)
                elif opts.error_rate and state.rng.random() < opts.error_rate:
                    fault = state.rng.choice((500, 502, 503))
                if fault is not None and fault not in _AFTER_PROCESSING:
                    raise _fault(fault)
                response = await handler(request)
                if fault is not None:
                    raise _fault(fault)
                if opts.garbage and response.status_code < 300:
                    response = Response(_GARBAGE, 200, media_type="text/html")
            except ApiError as err:
                response = self._error(err, request_id)
            finally:
                state.busy = max(0, state.busy - 1)  # a reset meanwhile zeroed it
                state.inflight[busy] -= 1
                if state.inflight[busy] <= 0:
                    del state.inflight[busy]
            if request.method != "GET":
                state.save()  # a POST or DELETE may have issued, revoked or disconnected
            response.headers[opts.request_id_header] = request_id
            state.stats[(key, response.status_code)] += 1
            return response

        return endpoint

    def _error(self, err: ApiError, request_id: str) -> Response:
        opts = self.state.options
        kind = _TYPES.get(err.status, "api_error")
        headers = {}
        if err.retry_after_s is not None:
            if opts.retry_after_format == "seconds":
                headers["Retry-After"] = str(math.ceil(err.retry_after_s))
            else:
                when = time.time() + math.ceil(err.retry_after_s) + 1
                headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
        body: dict[str, Any]
        if opts.error_shape == "plain":
            return PlainTextResponse(f"{err.code}: {err.message}", err.status, headers=headers)
        if opts.error_shape == "nested":
            body = {"error": {"code": err.code, "type": kind, "message": err.message,
                              "request_id": request_id}}
        elif opts.error_shape == "flat":
            body = {"error_code": err.code, "error_type": kind, "message": err.message,
                    "requestId": request_id}
        else:
            body = {"errors": [{"code": err.code, "type": kind, "detail": err.message}],
                    "meta": {"request_id": request_id}}
        return JSONResponse(body, err.status, headers=headers)

    # --- the Makini API ---------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        fields = await _fields(request)
        grant = fields.get("grant_type")
        client_id, secret = fields.get("client_id", ""), fields.get("client_secret", "")
        if grant == "client_credentials":
            pair = self.state.client_credentials(client_id, secret)
        elif grant == "refresh_token":
            pair = self.state.refresh(client_id, secret, fields.get("refresh_token", ""))
        elif grant == "authorization_code":
            pair = self.state.exchange(
                client_id, secret, fields.get("code", ""), fields.get("redirect_uri")
            )
        else:
            raise ApiError(400, "UNSUPPORTED_GRANT_TYPE", "Unsupported grant_type.")
        return JSONResponse(pair, headers={"Cache-Control": "no-store"})

    async def current(self, request: Request) -> Response:
        return JSONResponse({"data": self.state.current(_bearer(request))})

    async def list_connections(self, request: Request) -> Response:
        """Paginated like Makini (Laravel): ``?page=N`` (from 1) and ``?per_page=M``; ``links``
        holds absolute URLs (``next`` null on the last page) and ``meta`` the counts."""
        state = self.state
        client_id = state.admin_client(_bearer(request))
        opts = state.options
        page = _positive(request.query_params.get("page"), 1, "page")
        per_page = min(
            _positive(request.query_params.get("per_page"), opts.page_size, "per_page"),
            opts.max_page_size,
        )
        items, total = state.page(client_id, page, per_page)
        last = max(1, math.ceil(total / per_page))
        path = str(request.url.replace(query=""))

        def link(n: int) -> str:
            extra = "" if "per_page" not in request.query_params else f"&per_page={per_page}"
            return f"{path}?page={n}{extra}"

        start = (page - 1) * per_page
        body = {
            "data": [c.listed() for c in items],
            "links": {
                "first": link(1),
                "last": link(last),
                "prev": link(page - 1) if 1 < page <= last + 1 else None,
                "next": link(page + 1) if page < last else None,
            },
            "meta": {
                "current_page": page,
                "from": start + 1 if items else None,
                "last_page": last,
                "path": path,
                "per_page": per_page,
                "to": start + len(items) if items else None,
                "total": total,
            },
        }
        return JSONResponse(body)

    async def issue(self, request: Request) -> Response:
        client_id = self.state.admin_client(_bearer(request))
        pair = self.state.issue(client_id, request.path_params["id"])
        pair.pop("token_type")
        return JSONResponse({"data": pair}, headers={"Cache-Control": "no-store"})

    async def disconnect(self, request: Request) -> Response:
        client_id = self.state.admin_client(_bearer(request))
        self.state.disconnect(client_id, request.path_params["id"])
        return JSONResponse({})

    async def revoke(self, request: Request) -> Response:
        if not self.state.options.revoke_endpoint:
            raise ApiError(404, "NOT_FOUND", "Not found.")
        client_id = self.state.admin_client(_bearer(request))
        value = (await _fields(request)).get("token")
        if not value:
            raise ApiError(422, "VALIDATION_FAILED", "The token field is required.")
        self.state.revoke_value(client_id, value)
        return JSONResponse({"data": {"revoked": True}})

    async def unmatched(self, request: Request) -> Response:
        raise ApiError(404, "NOT_FOUND", "Not found.")

    # --- /_sim/ inspection and control ------------------------------------------------------

    async def sim_connections(self, request: Request) -> Response:
        """GET: every connection. POST: create one (``id``, ``client_id``, ``platform``,
        ``company``, ``name``, ``metadata``: an object of strings), or ``count`` of them at
        once named ``{prefix}{n:05d}`` (10,000 in well under a second)."""
        state = self.state
        if request.method == "POST":
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                created = _create(state, body)
            except (ValueError, TypeError) as exc:
                return JSONResponse({"error": str(exc)}, 422)
            except ApiError as err:
                return JSONResponse({"error": err.message}, err.status)
            state.save()
            if "count" in body:
                return JSONResponse({"created": len(created)}, 201)
            return JSONResponse(created[0].view(state.now()), 201)
        now = state.now()
        return JSONResponse([c.view(now) for c in state.connections.values()])

    async def sim_connection(self, request: Request) -> Response:
        """GET: one connection. DELETE: it disappears at Makini (tokens die, no longer
        listed), as when a customer disconnects."""
        state = self.state
        ident = request.path_params["id"]
        if request.method == "DELETE":
            try:
                conn = state.remove_connection(ident)
            except ApiError as err:
                return JSONResponse({"error": err.message}, err.status)
            state.save()
            return JSONResponse(conn.view(state.now()))
        found = state.connections.get(ident)
        if found is None:
            return JSONResponse({"error": "no such connection"}, 404)
        return JSONResponse(found.view(state.now()))

    async def sim_link_code(self, request: Request) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":
            params.update(await _fields(request))
        try:
            code = self.state.link_code(
                request.path_params["id"], params.get("client_id"), params.get("redirect_uri")
            )
        except ApiError as err:
            return JSONResponse({"error": err.message}, err.status)
        return JSONResponse({"code": code})

    async def sim_tokens(self, request: Request) -> Response:
        q = request.query_params
        now = self.state.now()
        views = [t.view(now) for t in self.state.tokens.values()]
        for key in ("connection_id", "kind", "status", "client_id"):
            if key in q:
                views = [v for v in views if v[key] == q[key]]
        return JSONResponse(views)

    async def sim_token(self, request: Request) -> Response:
        token = self.state.by_fingerprint.get(request.path_params["fingerprint"])
        if token is None:
            return JSONResponse({"error": "no such token"}, 404)
        return JSONResponse(token.view(self.state.now()))

    async def sim_revoke(self, request: Request) -> Response:
        token = self.state.by_fingerprint.get(request.path_params["fingerprint"])
        if token is None:
            return JSONResponse({"error": "no such token"}, 404)
        self.state.revoke(token)
        self.state.save()
        return JSONResponse(token.view(self.state.now()))

    async def sim_options(self, request: Request) -> Response:
        if request.method == "PATCH":
            try:
                body = json.loads(await request.body() or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                self.state.set_options(patched(self.state, body))
            except (ValueError, TypeError, ValidationError) as exc:
                return JSONResponse({"error": str(exc)}, 422)
        shown = self.state.options.model_dump()
        shown["clients"] = dict.fromkeys(shown["clients"], "<hidden>")
        return JSONResponse(shown)

    async def sim_reset(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        self.state.reset()
        self.state.save()
        if isinstance(body, dict) and isinstance(body.get("options"), dict):
            try:
                self.state.set_options(SimOptions.model_validate(body["options"]))
            except ValidationError as exc:
                return JSONResponse({"error": str(exc)}, 422)
        return JSONResponse({"ok": True})

    async def sim_inflight(self, request: Request) -> Response:
        """The API requests being answered right now (inside the latency, or the handler)."""
        views = [
            {"route": route, "connection_id": conn, "count": count}
            for (route, conn), count in sorted(
                self.state.inflight.items(), key=lambda item: (item[0][0], item[0][1] or "")
            )
        ]
        return JSONResponse(views)

    async def sim_stats(self, request: Request) -> Response:
        routes: dict[str, dict[str, int]] = {}
        for (key, status), count in sorted(self.state.stats.items()):
            routes.setdefault(key, {})[str(status)] = count
        return JSONResponse(
            {
                "total": sum(self.state.stats.values()),
                "routes": routes,
                # on arrival, before latency and faults: a test sees a request in flight
                "received": dict(sorted(self.state.received.items())),
                # the most API requests answered at once (inside the latency or the handler)
                "peak_inflight": self.state.peak_busy,
            }
        )


def _positive(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(422, "VALIDATION_FAILED", f"{name} must be a whole number.") from None
    if number < 1:
        raise ApiError(422, "VALIDATION_FAILED", f"{name} must be at least 1.")
    return number


def _create(state: SimState, body: dict[str, Any]) -> list[Connection]:
    client_id = str(body.get("client_id") or next(iter(state.options.clients), ""))
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object of strings")
    fields: dict[str, Any] = {
        "platform": str(body.get("platform") or "simulated"),
        "company": None if body.get("company") is None else str(body["company"]),
        "name": None if body.get("name") is None else str(body["name"]),
        "metadata": {str(k): str(v) for k, v in metadata.items()},
    }
    if "count" in body:
        count, prefix = int(body["count"]), str(body.get("prefix") or "conn-")
        if not 0 <= count <= 1_000_000:
            raise ValueError("count must be between 0 and 1000000")
        start = int(body.get("start", 0))
        return [
            state.add_connection(f"{prefix}{n:05d}", client_id, **fields)
            for n in range(start, start + count)
        ]
    return [state.add_connection(str(body.get("id") or uuid.uuid4().hex[:12]), client_id,
                                 **fields)]


def patched(state: SimState, changes: dict[str, Any]) -> SimOptions:
    """The options with ``changes`` applied. Besides the fields of :class:`SimOptions`:
    ``outage_s`` starts an outage that long from now (0 or null ends it) and ``advance_s``
    moves the simulator's clock forward."""
    changes = dict(changes)
    current = state.options
    if "advance_s" in changes:
        changes["clock_offset_s"] = current.clock_offset_s + float(changes.pop("advance_s"))
    if "outage_s" in changes:
        seconds = changes.pop("outage_s")
        offset = float(changes.get("clock_offset_s", current.clock_offset_s))
        changes["outage_until"] = time.time() + offset + float(seconds) if seconds else None
    return SimOptions.model_validate({**current.model_dump(), **changes})


def create_app(state: SimState | None = None) -> Starlette:
    """A Starlette app playing Makini (``state`` defaults to a fresh one with default options)."""
    return SimApp(state or SimState()).build()
