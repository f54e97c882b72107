"""Bearer keys: who is calling, and may they.

Checks run in a fixed order so that a stranger learns nothing: no or unknown key (401), then
input validation (422), then scope (403: another environment, a credential outside the key's
list, or the wrong kind of key), and only then whether the thing exists (404).
"""

from __future__ import annotations

import re

from fastapi import Request

from backends.base import NAME_PATTERN
from rotator.api.errors import ApiError
from rotator.keys import KeyIndex, KeyInfo
from rotator.settings import ENV_NAME_PATTERN

ENV_RE = re.compile(ENV_NAME_PATTERN.strip("^$"))
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))

UNAUTHORIZED = "a valid key is required: Authorization: Bearer <key>"


def bearer(value: bytes | str | None) -> str | None:
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, key = text.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def authenticate(keys: KeyIndex, authorization: bytes | str | None) -> KeyInfo:
    key = bearer(authorization)
    info = keys.verify(key) if key else None
    if info is None:
        raise ApiError(401, UNAUTHORIZED)
    return info


def check_env_name(env: str) -> None:
    if not ENV_RE.fullmatch(env):
        raise ApiError(422, "env: not an environment name (lowercase letters, digits, '-')")


def check_cred_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ApiError(422, "name: not a credential name (lowercase letters, digits, '-', '_')")


def check_env_scope(key: KeyInfo, env: str) -> None:
    if key.environment != env:
        raise ApiError(403, "this key belongs to another environment")


def require_admin(keys: KeyIndex, request: Request, env: str) -> KeyInfo:
    """The admin key of ``env`` calling, or an ApiError (401, 422, 403)."""
    key = authenticate(keys, request.headers.get("authorization"))
    check_env_name(env)
    check_env_scope(key, env)
    if not key.is_admin:
        raise ApiError(403, "this endpoint needs an admin key")
    return key
