"""The error envelope every endpoint answers with: ``{"error": {"code", "message",
"request_id"}}``, plus the request id header. Client mistakes are 4xx, never 500.

Codes: ``unauthorized`` (401), ``forbidden`` (403), ``not_found`` (404), ``method_not_allowed``
(405), ``payload_too_large`` (413), ``unsupported_media_type`` (415), ``invalid_request`` (422),
``no_token`` (404: the credential has no current token yet), ``token_revoked`` (503: its current
version was revoked and the replacement is not yet promoted), ``backend_unavailable`` (503),
``not_implemented`` (501), ``internal`` (500: a bug).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = structlog.get_logger("rotator.api")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    501: "not_implemented",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code: program against this.")
    message: str = Field(description="For people; never contains a token.")
    request_id: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """Raised by handlers; rendered as the envelope with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or {}


def new_request_id() -> str:
    return os.urandom(8).hex()


def request_id_from(value: str | bytes | None) -> str:
    """The caller's request id when it is a sane one, else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _CLIENT_ID.fullmatch(value):
        return value
    return new_request_id()


def envelope(status: int, message: str, request_id: str, code: str | None = None) -> bytes:
    body = {
        "error": {
            "code": code or _CODES.get(status, "error"),
            "message": message,
            "request_id": request_id,
        }
    }
    return json.dumps(body, separators=(",", ":")).encode()


def error_response(request: Request, err: ApiError) -> Response:
    rid = request_id_of(request)
    headers = {REQUEST_ID_HEADER: rid, "cache-control": "no-store", **err.headers}
    if err.status == 401:
        headers.setdefault("www-authenticate", "Bearer")
    return Response(
        envelope(err.status, err.message, rid, err.code),
        err.status,
        headers=headers,
        media_type="application/json",
    )


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request.state.request_id = rid
    return str(rid)


def _validation_message(exc: RequestValidationError) -> str:
    """Each problem as ``where: what``, where naming the field as the request carries it
    (``body.if_version``, ``query.wait``, ``body.credentials[2]``)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":  # the body as a whole: say why, and where
            why = (err.get("ctx") or {}).get("error", "not JSON")
            at = loc[-1] if loc else 0
            parts.append(f"body: refused as JSON: {why} (at character {at})")
            continue
        msg = str(err.get("msg", "invalid"))
        if loc == ("body",) and err.get("type") == "missing":
            msg = "required: send a JSON object (Content-Type: application/json)"
        parts.append(f"{field_path(loc)}: {msg}")
    return "; ".join(parts) or "invalid request"


def field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "credentials", 2)`` as ``body.credentials[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "request"


def internal_error(path: str) -> ApiError:
    """A bug, called from its except block: logged with the traceback, answered as a 500."""
    log.exception("api.internal_error", path=path)
    return ApiError(500, "internal error", "internal")


def install(app: FastAPI) -> None:
    """Route every error FastAPI or Starlette raises through the envelope."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(request, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = "no such endpoint"
        return error_response(
            request, ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(request, ApiError(422, _validation_message(exc)))

    async def crash(request: Request, exc: Exception) -> Response:
        return error_response(request, internal_error(request.url.path))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, crash)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the envelope at these statuses."""
    text = {
        400: "Bad request",
        401: "Missing or unknown key",
        403: "The key may not do this",
        404: "Not found",
        409: "Conflict",
        413: "Body too large",
        415: "Unsupported media type",
        422: "Invalid input",
        501: "Not implemented in this build",
        503: "Temporarily unavailable",
    }
    return {s: {"model": ErrorEnvelope, "description": text.get(s, "Error")} for s in statuses}
