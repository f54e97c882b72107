"""What a key is: 32 random bytes, written as URL-safe base64. Apart from ``rotator.crypto``
(which reads, checks and uses keys, with the configuration's models) so that ``rotator keygen``
prints one without importing either."""

from __future__ import annotations

import base64
import os

KEY_BYTES = 32


def generate_key() -> str:
    """A fresh key, base64 (what goes into the environment variable or key file)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()
