"""JSON request bodies with bounded nesting: the one parser for every body the API reads.

Python's ``json`` recurses once per array or object level: a small body nested a few thousand
levels deep (4 KB is enough) raises ``RecursionError``, which no handler expects, and far less
than that gives objects that the code behind can only trip over. No body of this API is more
than a few levels deep, so a body nested deeper than :data:`MAX_DEPTH` is refused up front, as
a JSON error (``json.JSONDecodeError``, a ``ValueError``), before ``json`` sees it. Every other
refusal is a JSON error too (text that is not UTF-8, an integer of more digits than Python
converts), so callers handle one exception.

* FastAPI parses the admin routes' bodies: ``rotator.api.routing.ApiRoute`` hands it a request
  whose ``json()`` is :func:`loads`; FastAPI turns the JSON error into a validation error (422).
* The webhook receiver parses its own body (``rotator.webhooks.queue.parse_event``) with
  :func:`loads`.

Standard library only: ``rotator.webhooks`` imports it without loading FastAPI.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

MAX_DEPTH = 64

# A JSON string (also an unterminated one, to the end: ``json`` stops there), or a bracket.
# Possessive, and every string start matches: linear time whatever the text.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


class TooDeep(json.JSONDecodeError):
    """The text nests arrays and objects deeper than :data:`MAX_DEPTH` (``pos``: where)."""

    def __init__(self, doc: str, pos: int) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels", doc, pos)


def too_deep_at(text: str, limit: int = MAX_DEPTH) -> int | None:
    """Where ``text`` opens its level ``limit + 1`` outside strings, or None. An upper bound of
    the depth ``json`` would reach: it stops at the first error, this scan does not."""
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = 0
    for token in _TOKEN.finditer(text):
        char = text[token.start()]
        if char in "[{":
            depth += 1
            if depth > limit:
                return token.start()
        elif char in "]}":
            depth -= 1
    return None


def loads(body: bytes | str) -> Any:
    """``json.loads`` for a request body, refusing nesting deeper than :data:`MAX_DEPTH` with
    :class:`TooDeep` (and anything else ``json.loads`` refuses with its own errors)."""
    if isinstance(body, str):
        text = body
    else:
        try:
            text = body.decode(json.detect_encoding(body), "surrogatepass")
        except UnicodeDecodeError as exc:
            raise json.JSONDecodeError("not UTF-8 text", "", exc.start) from None
    at = too_deep_at(text)
    if at is not None:
        raise TooDeep(text, at)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # the one other refusal: an integer longer than Python converts
        raise json.JSONDecodeError(
            f"a number has more than {sys.get_int_max_str_digits()} digits", text, 0
        ) from None
