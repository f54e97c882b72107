"""The one token scrubber: what the logs, the backends' errors and Makini's errors must never show.

Tokens travel inside :class:`~rotator.model.Secret`, which prints as a fingerprint; this is the
second line of defence, for text that may hold one anyway (a vendor's error message, a value
someone pasted, an exception's text in a log line). What it masks, and with what:

* a value known to be secret (``secrets=``): ``[masked]``;
* a JWT, or a fragment of one (``eyJ...``): ``[masked-token]``;
* a Vault token (``hvs.``, ``s.``...): ``[redacted-token]``; an AWS access key id:
  ``[redacted-key-id]``; a key of this service's API (``mrk_<id>_...``): its id stays readable;
* what follows ``Bearer``/``Basic``, an ``Authorization`` or ``X-Vault-Token`` header, or a key
  named ``token``, ``access_token``, ``refresh_token``, ``secret``, ``password`` or ``value``:
  ``[redacted]``.

:func:`mask` does that and keeps the text as it is otherwise (log values, a reason shown back).
:func:`scrub` is for text from a peer going into an error message: it also masks any long opaque
run (40 characters and more, a token of a shape not listed above), and makes the result one line
of bounded length. Our own text keeps long runs: a credential name may be 63 characters, a
fingerprint is 64.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MARK = "[masked]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"), "[masked-token]"),
    (re.compile(r"\b(hv[sbr]|s|b|r)\.[A-Za-z0-9_-]{20,}"), "[redacted-token]"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "[redacted-key-id]"),
    (re.compile(r"\b(mr[aks]_[0-9a-f]{12}_)[A-Za-z0-9_-]+"), r"\1[masked]"),
    (
        re.compile(r'(?i)("?(?:access_token|refresh_token|token|secret|password|value)"?\s*[:=]\s*)'
                   r'("[^"]*"|[^\s,;}]+)'),
        r"\1[redacted]",
    ),
    (re.compile(r"(?i)(x-vault-token|authorization)(['\"]?\s*[:=]\s*)\S+"), r"\1\2[redacted]"),
)
_OPAQUE = re.compile(r"[A-Za-z0-9_\-+=~]{40,}")


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with ``secrets`` and everything token-shaped masked; nothing else changed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MARK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub(text: object, secrets: Iterable[str] = (), limit: int = 300) -> str:
    """Foreign text made safe for an error message: :func:`mask`, any long opaque run masked,
    one line, at most ``limit`` characters."""
    out = _OPAQUE.sub(MARK, mask(str(text), secrets))
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 1] + "…"
