"""The HTTP API of ``rotator serve``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from rotator.runtime import Runtime


def build_app(runtime: Runtime) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        import asyncio

        from rotator.errors import RotatorError

        problems = []
        try:
            await asyncio.to_thread(runtime.journal.ping)
        except RotatorError as exc:
            problems.append(f"journal: {exc.message}")
        for name, rt in runtime.environments.items():
            try:
                await asyncio.to_thread(rt.primary.check)
            except RotatorError as exc:
                problems.append(f"{name}/{rt.primary.name}: {exc.message}")
        if problems:
            return JSONResponse({"status": "unready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])
