"""Makini webhook signatures: HMAC-SHA256 of the raw body, base64 or hex (Makini's docs disagree).

Standard library only: the receiver checks with it, the simulator signs with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def sign(secret: bytes, body: bytes, encoding: str = "base64") -> str:
    """The signature Makini sends: HMAC-SHA256 of the raw body, base64 or hex."""
    digest = hmac.new(secret, body, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def _decode(signature: str) -> bytes | None:
    value = signature.strip().removeprefix("sha256=")
    if len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            return None
    padded = value + "=" * (-len(value) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        return raw if len(raw) == 32 else None
    return None


def signature_valid(secret: bytes, body: bytes, signature: str | None) -> bool:
    """Constant-time check of a hex or base64 (standard or URL-safe) HMAC-SHA256 signature."""
    if not signature or len(signature) > 200:
        return False
    given = _decode(signature)
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    return hmac.compare_digest(expected, given if given is not None else b"\0" * 32)
