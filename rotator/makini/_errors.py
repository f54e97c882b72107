"""Turn Makini's failures into the rotator's exception tree.

Makini's error body is not documented, so :func:`parse_error_body` looks for a code, a type, a
message and a request id wherever they commonly sit: at the top level, under ``error``, under
``errors[0]``, under ``meta``; keys in snake, camel or kebab case. A plain-text body may still
start with a code (``AUTHENTICATION_FAILED: ...``).

No raw body ever reaches a message: only the code, the type and a truncated message in which
anything that looks like a token is masked (:func:`rotator.scrub.scrub`).

Each mapping also says whether Makini *may have processed* the request. For a request that
creates a token, a failure after processing is *ambiguous*: a token may have been issued and not
received, so the client must not retry it blindly.
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from rotator.errors import (
    BadRequest,
    Forbidden,
    InvalidToken,
    MakiniError,
    MakiniProtocolError,
    MakiniTimeout,
    MakiniTransient,
    MakiniUnreachable,
    MakiniUntrusted,
    RateLimited,
    ServerError,
)
from rotator.scrub import scrub

MESSAGE_LIMIT = 160
_FIELD_LIMIT = 64
_PLAIN_CODE = re.compile(r"^\s*([A-Z][A-Z0-9_]{2,63})\s*:")

_CODE_KEYS = ("code", "errorcode", "errorkey")
_TYPE_KEYS = ("type", "errortype", "kind")
_MESSAGE_KEYS = (
    "message", "errormessage", "detail", "errordescription", "description", "msg", "title",
)
_REQUEST_ID_KEYS = ("requestid", "xrequestid", "correlationid", "traceid")
_REQUEST_ID_HEADERS = (
    "x-request-id", "request-id", "x-requestid", "x-correlation-id", "x-amzn-requestid",
    "x-amz-request-id", "x-trace-id",
)

_HINTS: dict[type[MakiniError], str] = {
    InvalidToken: "the token or the client credentials are invalid, expired or revoked; a "
    "connection token that is lost means the customer must reconnect",
    Forbidden: "the credentials may not do this; check the client's permissions and that the "
    "connection belongs to this environment's Makini client",
    BadRequest: "check the connection id and that it belongs to this environment's Makini client",
    RateLimited: "Makini limits requests per connection; wait and retry",
    ServerError: "Makini is failing; retry later",
    MakiniTimeout: "Makini did not answer in time; retry later or raise makini.timeout_s",
    MakiniUnreachable: "check makini.base_url, DNS, the network path and TLS",
    MakiniUntrusted: "check makini.base_url; if it is right, trust the CA that signed its "
    "certificate (SSL_CERT_FILE or SSL_CERT_DIR name a CA bundle)",
    MakiniProtocolError: "Makini's answer was not as expected; check makini.base_url",
}


@dataclass(frozen=True)
class ErrorBody:
    """What could be recovered from an error answer (already scrubbed)."""

    code: str | None = None
    type: str | None = None
    message: str | None = None
    request_id: str | None = None


def _norm(key: str) -> str:
    return key.lower().replace("_", "").replace("-", "")


def _scalar(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int | float):
        text = str(value).strip()
        return text or None
    return None


def _find(places: list[Mapping[str, Any]], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        for place in places:
            for name, value in place.items():
                if _norm(name) == key and (found := _scalar(value)) is not None:
                    return found
    return None


def _places(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    places: list[Mapping[str, Any]] = []
    error = body.get("error")
    if isinstance(error, Mapping):
        places.append(error)
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], Mapping):
        places.append(errors[0])
    places.append(body)
    for key in ("meta", "data"):
        if isinstance(body.get(key), Mapping):
            places.append(body[key])
    return places


def request_id_from(headers: httpx.Headers) -> str | None:
    """The request id of a response, from the usual headers or any ``*request-id`` header."""
    for name in _REQUEST_ID_HEADERS:
        value: str | None = headers.get(name)
        if value:
            return value[:_FIELD_LIMIT]
    for name, value in headers.items():
        if _norm(name).endswith(("requestid", "correlationid")) and value:
            return value[:_FIELD_LIMIT]
    return None


def parse_error_body(
    content: bytes, headers: httpx.Headers, secrets: Iterable[str] = ()
) -> ErrorBody:
    """Recover code, type, message and request id from any error answer; never raises."""
    secrets = tuple(secrets)
    header_id = request_id_from(headers)
    try:
        body = json.loads(content) if content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, Mapping):
        places = _places(body)
        code = _find(places, _CODE_KEYS)
        message = _find(places, _MESSAGE_KEYS)
        error = body.get("error")
        if isinstance(error, str):  # OAuth style: {"error": "invalid_grant", ...}
            if code is None and " " not in error.strip():
                code = error
            elif message is None:
                message = error
        body_id = _find(places, _REQUEST_ID_KEYS)
        return ErrorBody(
            code=scrub(code, secrets, limit=_FIELD_LIMIT) if code else None,
            type=(t := _find(places, _TYPE_KEYS)) and scrub(t, secrets, limit=_FIELD_LIMIT),
            message=scrub(message, secrets, limit=MESSAGE_LIMIT) if message else None,
            request_id=header_id or (body_id[:_FIELD_LIMIT] if body_id else None),
        )
    text = content.decode("utf-8", "replace").strip() if content else ""
    first = text.splitlines()[0] if text else ""
    match = _PLAIN_CODE.match(first)
    if match:
        first = first[match.end():]
    looks_html = first.lstrip().startswith("<")
    return ErrorBody(
        code=match.group(1) if match else None,
        message=scrub(first, secrets, limit=MESSAGE_LIMIT) if first and not looks_html else None,
        request_id=header_id,
    )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _status_class(status: int) -> tuple[type[MakiniError], bool]:
    """The error class of an HTTP status, and whether Makini may have processed the request."""
    if status == 401:
        return InvalidToken, False
    if status == 403:
        return Forbidden, False
    if status == 408:
        return MakiniTimeout, False
    if status == 429:
        return RateLimited, False
    if status == 503:
        return ServerError, False
    if status >= 500:
        return ServerError, True
    if 400 <= status < 500:
        return BadRequest, False
    return MakiniProtocolError, True  # 1xx/3xx: redirects are not followed


def error_from_response(
    response: httpx.Response,
    *,
    what: str,
    where: str,
    idempotent: bool,
    now: float,
    secrets: Iterable[str] = (),
) -> MakiniError:
    """The rotator error for a non-2xx answer to the request that did ``what``."""
    status = response.status_code
    body = parse_error_body(response.content, response.headers, secrets)
    cls, maybe_processed = _status_class(status)
    detail = " ".join(p for p in (body.code, f"({body.type})" if body.type else None) if p)
    message = f"{what}: Makini answered HTTP {status}"
    if detail:
        message += f" {detail}"
    if body.message:
        message += f": {body.message}"
    common: dict[str, Any] = {
        "status": status,
        "code": body.code,
        "request_id": body.request_id,
        "where": where,
        "hint": _HINTS.get(cls),
        "ambiguous": maybe_processed and not idempotent,
    }
    if issubclass(cls, MakiniTransient):
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        return cls(message, retry_after_s=retry_after, **common)
    return cls(message, **common)


def _exception_class(exc: Exception) -> tuple[type[MakiniError], bool, str]:
    """Error class, may-have-been-processed, and a short description for an httpx exception."""
    if _certificate_refused(exc):  # a retry meets the same certificate
        return MakiniUntrusted, False, "the server's TLS certificate is not trusted"
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return MakiniTimeout, False, "timed out before the request was sent"
    if isinstance(exc, httpx.TimeoutException):
        return MakiniTimeout, True, "timed out waiting for the answer"
    if isinstance(exc, httpx.ConnectError | httpx.ProxyError):
        return MakiniUnreachable, False, "cannot connect"
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return MakiniUnreachable, True, "the connection broke during the request"
    if isinstance(exc, httpx.DecodingError | httpx.TooManyRedirects):
        return MakiniProtocolError, True, "the answer cannot be read"
    if isinstance(exc, httpx.HTTPStatusError):
        return MakiniProtocolError, True, "unexpected status"
    return MakiniProtocolError, False, "the request could not be made"


def _certificate_refused(exc: BaseException) -> bool:
    """An ssl.SSLCertVerificationError in the chain (httpx and our transport keep causes)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_from_exception(
    exc: Exception, *, what: str, where: str, idempotent: bool, now: float,
    secrets: Iterable[str] = (),
) -> MakiniError:
    """The rotator error for an exception raised by httpx (any of its classes)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return error_from_response(
            exc.response, what=what, where=where, idempotent=idempotent, now=now, secrets=secrets
        )
    cls, maybe_processed, description = _exception_class(exc)
    reason = scrub(exc, secrets, limit=MESSAGE_LIMIT) or type(exc).__name__
    return cls(
        f"{what}: {description} ({type(exc).__name__}: {reason})",
        where=where,
        hint=_HINTS.get(cls),
        ambiguous=maybe_processed and not idempotent,
    )
