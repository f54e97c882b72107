"""The key gate: on a route that needs a key, the key decides before anything else.

ASGI, in front of the body limit and FastAPI. For a request to a route that has a
:class:`~rotator.api.auth.KeyGuard` among its dependencies (the same guard that puts the bearer
scheme into the OpenAPI document, so every route documented as needing a key is gated), it
answers 401 or 403 before the body is read, its size checked or its JSON parsed, and before
FastAPI validates the path: a caller the key does not admit learns nothing from their input.
A route added later is gated as soon as it declares its guard.

Matching is Starlette's (``Route.matches``) on the routes of the routers as the app includes
them, so the gate sees the route FastAPI will pick, whatever FastAPI does inside.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match

from rotator.api.auth import KeyGuard
from rotator.api.errors import ApiError, request_id_from
from rotator.api.tokens import ASGIApp, Receive, Scope, Send, send_error


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value, as Starlette's ``request.headers`` (the guard's) reads it."""
    return next((value for key, value in scope["headers"] if key == name), None)


def guard_of(route: APIRoute) -> KeyGuard | None:
    """The route's key guard, wherever it sits among its dependencies (or None)."""
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, KeyGuard):
            return dependant.call
        stack.extend(dependant.dependencies)
    return None


class KeyGate:
    """``app`` behind the gate. Routers are served through :meth:`include`, which includes them
    in the FastAPI app and gates their routes that need a key: the two cannot diverge."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.keyed: list[tuple[APIRoute, KeyGuard]] = []

    def include(self, fastapi: FastAPI, router: APIRouter) -> None:
        """Serve ``router``'s routes (at their own paths, no prefix: the gate matches them
        there), each that needs a key behind the gate."""
        fastapi.include_router(router)
        for route in router.routes:
            if isinstance(route, APIRoute) and (guard := guard_of(route)) is not None:
                self.keyed.append((route, guard))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route, guard in self.keyed:
                match, child = route.matches(scope)
                if match is not Match.FULL:
                    continue
                try:
                    guard.check(_header(scope, b"authorization"), child.get("path_params", {}))
                except ApiError as err:
                    rid = request_id_from(_header(scope, b"x-request-id"))
                    await send_error(send, err, rid)
                    return
                break
        await self.app(scope, receive, send)
