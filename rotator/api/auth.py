"""Bearer keys: who is calling, and may they.

The key decides first, so that a stranger learns nothing and no input of theirs is looked at:
no or unknown key (401), then scope (403: a status key, which opens only the status page;
another environment; the wrong kind of key; a credential outside the key's list), and only then
is the request validated (422: path, query, body) and whether the thing exists (404).

A route that needs a key says so once, with a :class:`KeyGuard` among its dependencies. The
guard puts the bearer scheme into the OpenAPI document, hands the route the caller's
:class:`~rotator.keys.KeyInfo`, and is what :class:`KeyGate` (ASGI, in front of everything that
reads a body) finds on the route a request is for: it answers 401 or 403 before the body is
read, its size checked or its JSON parsed, and before FastAPI validates the path. The lean token
routes (``rotator.api.tokens``) call :func:`authorize` first for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from backends.base import NAME_PATTERN
from rotator.api.errors import ApiError
from rotator.configfile import ENV_NAME_PATTERN
from rotator.keys import KeyIndex, KeyInfo

ENV_RE = re.compile(ENV_NAME_PATTERN.strip("^$"))
NAME_RE = re.compile(NAME_PATTERN.strip("^$"))

UNAUTHORIZED = "a valid key is required: Authorization: Bearer <key>"

Need = Literal["reader", "admin", "any"]
"""The kind of key a route takes: a reader key (reads tokens), an admin key (acts), either."""

SCHEME = HTTPBearer(auto_error=False, description="A reader or admin key.")

STATUS_ONLY = "a status key opens only the status page (/status): use a reader or admin key"
"""The security scheme the OpenAPI document names on every route that needs a key."""


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


def authorize(
    keys: KeyIndex,
    authorization: bytes | str | None,
    env: str,
    name: str | None = None,
    need: Need = "any",
) -> KeyInfo:
    """The caller's key if it may call a route of ``env`` (and credential ``name``, for a
    reader), else ApiError 401 or 403. Looks at no other input: ``env`` and ``name`` are only
    compared with the key's scope, so they need not be valid names yet."""
    key = authenticate(keys, authorization)
    if key.is_status:  # whatever the route: a status key opens the status page and nothing else
        raise ApiError(403, STATUS_ONLY)
    if key.environment != env:
        raise ApiError(403, "this key belongs to another environment")
    if need == "admin" and not key.is_admin:
        raise ApiError(403, "this endpoint needs an admin key")
    if need == "reader" and key.is_admin:
        raise ApiError(403, "admin keys cannot read tokens: use a reader key")
    if need == "reader" and name is not None and not key.may_read(env, name):
        raise ApiError(403, "this key may not read this credential")
    return key


def check_env_name(env: str) -> None:
    if not ENV_RE.fullmatch(env):
        raise ApiError(422, "env: not an environment name (lowercase letters, digits, '-')")


def check_cred_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ApiError(422, "name: not a credential name (lowercase letters, digits, '-', '_')")


class KeyGuard:
    """A route's key requirement, as a FastAPI dependency: ``Depends(KeyGuard(keys, "admin"))``
    gives the handler the caller's key. The route's path names the environment (``{env}``) and,
    for reads, the credential (``{name}``)."""

    def __init__(self, keys: KeyIndex, need: Need) -> None:
        self.keys = keys
        self.need = need

    def check(self, authorization: bytes | str | None, path_params: Mapping[str, Any]) -> KeyInfo:
        name = path_params.get("name")
        return authorize(
            self.keys,
            authorization,
            str(path_params.get("env", "")),
            name if isinstance(name, str) else None,
            self.need,
        )

    async def __call__(
        self,
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(SCHEME)],
    ) -> KeyInfo:
        # KeyGate has decided already; deciding again costs a hash and needs no gate
        return self.check(request.headers.get("authorization"), request.path_params)
