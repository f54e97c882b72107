"""The configuration's durations: ``"30d"``, ``"1h30m"``, ``"90s"``, ``"250ms"``, a number of
seconds, or ISO 8601 (``"P30D"``). One parser for every part of the configuration (the
notification settings, a layer below ``rotator.settings``, use it too)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from pydantic import TypeAdapter, ValidationError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LONGEST = timedelta(days=36500)
"""No duration in the configuration may exceed a century: beyond that, adding one to a date (or
handing it to a timer) overflows, and nothing here means to wait that long."""
_ISO_DURATION = TypeAdapter(timedelta)
_EXAMPLES = "write e.g. '30d', '12h', '1h30m', '90s' or '250ms'"


def format_duration(value: timedelta) -> str:
    """The shortest way to write ``value`` in the configuration's syntax (``"1d"``, ``"90s"``)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    parts, rest = [], abs(ms)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest:
        parts.append(f"{rest}ms")
    return ("-" if ms < 0 else "") + "".join(parts)


def parse_duration(value: object) -> object:
    """Accept ``"30d"``, ``"1h30m"``, ``"90s"``, ``"250ms"``, a number of seconds, or anything
    pydantic takes as a timedelta (ISO 8601 ``"P30D"``). A value too large for a timedelta is a
    ValueError (which the configuration reports under its key), never an OverflowError."""
    if isinstance(value, str) and not value.strip().upper().startswith("P"):
        text = value.replace(" ", "").lower()
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value[:40]!r} is not a duration: {_EXAMPLES}")
        return _seconds(sum(float(n) * _UNITS[u] for n, u in parts), value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _seconds(float(value), value)
    if isinstance(value, str):  # ISO 8601, "P30D"
        try:
            parsed = _ISO_DURATION.validate_python(value.strip())
        except ValidationError:
            raise ValueError(f"{value[:40]!r} is not a duration (or far too long): "
                             f"{_EXAMPLES}") from None
        return _seconds(parsed.total_seconds(), value)
    if isinstance(value, timedelta):
        _seconds(value.total_seconds(), format_duration(value))  # within a century
        return value
    raise ValueError(f"not a duration: {_EXAMPLES}")


def _seconds(seconds: float, written: object) -> timedelta:
    shown = f"{str(written)[:40]!r}"
    if not math.isfinite(seconds):
        raise ValueError(f"{shown} is not a duration: {_EXAMPLES}")
    if abs(seconds) > _LONGEST.total_seconds():
        raise ValueError(f"{shown} is far too long: at most {format_duration(_LONGEST)}")
    return timedelta(seconds=seconds)
