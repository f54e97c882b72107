"""The token read operations as FastAPI path operations: they put the lean routes of
:mod:`rotator.api.tokens` into the OpenAPI document, with the same parameters and answers.
Requests never reach them in practice (the lean router answers first); if one does, it is
handed to the same handler.

No ``from __future__ import annotations`` here: FastAPI must evaluate the parameter
annotations, which use the configured long-poll bound."""

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backends.base import NAME_PATTERN
from rotator.api.auth import KeyGuard
from rotator.api.errors import responses
from rotator.api.routing import api_router
from rotator.api.tokens import TokenRoutes
from rotator.configfile import ENV_NAME_PATTERN

ENV_PATH = Path(description="Environment name.", pattern=ENV_NAME_PATTERN, max_length=32)
NAME_PATH = Path(description="Credential name.", pattern=NAME_PATTERN, max_length=63)


class TokenOut(BaseModel):
    token: str = Field(description="The access token. A refresh token never leaves the rotator.")
    version: str = Field(description="The version id; also the ETag.")
    expires_at: datetime | None = Field(description="When Makini expires the token.")
    rotated_at: datetime | None = Field(description="When this version was promoted.")


class CredentialOut(BaseModel):
    name: str
    version: str | None
    expires_at: datetime | None
    rotated_at: datetime | None


class CredentialList(BaseModel):
    environment: str
    credentials: list[CredentialOut] = Field(
        description="The credentials this key may read (no values)."
    )


class _Delegate(Response):
    """Hands the request to the lean handler."""

    def __init__(self, routes: TokenRoutes) -> None:
        super().__init__()
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.routes.handle(scope, send)


_ETAG = {"ETag": {"description": "The version id, quoted.", "schema": {"type": "string"}}}


def router(routes: TokenRoutes, long_poll_max_s: int) -> APIRouter:
    api = api_router(["tokens"])
    keys = routes.state.keys

    @api.get(
        "/v1/tokens/{env}/{name}",
        response_model=TokenOut,
        summary="Read a credential's current access token",
        responses={
            200: {"headers": _ETAG},
            304: {
                "description": "Not modified: the ETag matches, or a long-poll timed out "
                "with the version unchanged",
                "headers": _ETAG,
            },
            **responses(401, 403, 404, 422, 503),
        },
        dependencies=[Depends(KeyGuard(keys, "reader"))],
        description=(
            'Served from memory. `If-None-Match: "<version>"` answers 304 while the version '
            "is unchanged. Long-poll: `?wait=30&known_version=V` answers as soon as the "
            "current version is not V, or 304 after `wait` seconds. `?stage=previous` reads "
            "the previous version while its grace period runs. 401: no or unknown key; 403: "
            "a key of another environment or credential, or an admin key; 404: an unknown "
            "credential, or one without a token yet (`no_token`)."
        ),
    )
    async def read_token(
        env: Annotated[str, ENV_PATH],
        name: Annotated[str, NAME_PATH],
        stage: Annotated[Literal["current", "previous"], Query()] = "current",
        wait: Annotated[int, Query(ge=0, le=long_poll_max_s, description="Seconds.")] = 0,
        known_version: Annotated[
            str | None, Query(pattern=r"^[A-Za-z0-9-]{1,64}$", max_length=64)
        ] = None,
        if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
    ) -> Response:
        return _Delegate(routes)

    @api.get(
        "/v1/tokens/{env}",
        response_model=CredentialList,
        summary="List the credentials this key may read (no values)",
        responses=responses(401, 403, 404, 422),
        dependencies=[Depends(KeyGuard(keys, "any"))],
    )
    async def list_tokens(env: Annotated[str, ENV_PATH]) -> Response:
        return _Delegate(routes)

    return api
