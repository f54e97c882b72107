"""The route class of every router of the API.

:class:`ApiRoute` makes FastAPI parse JSON bodies with :func:`rotator.jsonbody.loads`, so a
body nested deeper than ``MAX_DEPTH`` is a JSON error, which FastAPI answers as a validation
error (422 in the envelope), never a ``RecursionError`` (500).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from rotator.jsonbody import loads


class BoundedJsonRequest(Request):
    """A request whose ``json()`` is :func:`loads`."""

    async def json(self) -> Any:
        if not hasattr(self, "_bounded_json"):
            self._bounded_json = loads(await self.body())
        return self._bounded_json


class ApiRoute(APIRoute):
    """The route class of every router of the API: FastAPI parses JSON bodies with
    :func:`loads` (too deep: a JSON error, which FastAPI answers as invalid, 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded


def api_router(tags: list[str]) -> APIRouter:
    """An APIRouter of this API (routes of :class:`ApiRoute`)."""
    return APIRouter(tags=list(tags), route_class=ApiRoute)
