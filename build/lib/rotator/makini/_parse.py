"""Read Makini's successful answers: token pairs and the current integration.

Answers may be wrapped in ``{"data": {...}}`` or bare. ``expires_in`` is read per
``MakiniSettings.expires_in``: a Unix timestamp, a duration in seconds, or ``auto`` (a value above
10**9 is a timestamp). Anything that does not parse raises
:class:`~rotator.errors.MakiniProtocolError`, never with the body in the message.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import structlog

from rotator.errors import MakiniProtocolError
from rotator.model import Secret, TokenPair

ExpiresIn = Literal["auto", "timestamp", "seconds"]
_TIMESTAMP_FLOOR = 10**9

log = structlog.get_logger("rotator.makini")


def json_object(
    response: httpx.Response, *, what: str, where: str, ambiguous: bool
) -> dict[str, Any]:
    """The answer's JSON object, unwrapped from ``data`` when it is wrapped."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise MakiniProtocolError(
            f"{what}: Makini answered HTTP {response.status_code} with a body that is not JSON "
            f"({response.headers.get('content-type', 'no content type')[:40]})",
            status=response.status_code,
            where=where,
            ambiguous=ambiguous,
            hint="check makini.base_url points at the Makini API",
        ) from None
    if not isinstance(body, dict):
        raise MakiniProtocolError(
            f"{what}: Makini's answer is not a JSON object",
            status=response.status_code,
            where=where,
            ambiguous=ambiguous,
        )
    data = body.get("data")
    return data if isinstance(data, dict) else body


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def expiry(
    value: object, *, mode: ExpiresIn, now: float, default: timedelta | None
) -> datetime | None:
    """When a token expires, from an ``expires_in`` value (or ``now + default`` without one)."""
    number = _number(value)
    if number is None and isinstance(value, str):
        try:  # an absolute ISO 8601 time, should Makini ever send one
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except ValueError:
            log.warning("makini.expires_in_unreadable", note="using the default lifetime")
    if number is None or number <= 0:
        return datetime.fromtimestamp(now, UTC) + default if default is not None else None
    is_timestamp = mode == "timestamp" or (mode == "auto" and number > _TIMESTAMP_FLOOR)
    return datetime.fromtimestamp(number if is_timestamp else now + number, UTC)


def token_pair(
    data: dict[str, Any],
    *,
    mode: ExpiresIn,
    now: float,
    default_lifetime: timedelta,
    what: str,
    where: str,
    ambiguous: bool,
) -> TokenPair:
    """A :class:`TokenPair` from ``{access_token|token, refresh_token?, expires_in?}``."""
    access = data.get("access_token", data.get("token"))
    if not isinstance(access, str) or not access:
        raise MakiniProtocolError(
            f"{what}: Makini's answer has no access_token",
            where=where,
            ambiguous=ambiguous,
            hint="the response shape changed; a token may have been issued and not received",
        )
    refresh = data.get("refresh_token")
    expires_in = data.get("expires_in", data.get("expires_at"))
    return TokenPair(
        access=Secret(access),
        refresh=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        expires_at=expiry(expires_in, mode=mode, now=now, default=default_lifetime),
        refresh_expires_at=expiry(
            data.get("refresh_expires_in"), mode=mode, now=now, default=None
        ),
    )
