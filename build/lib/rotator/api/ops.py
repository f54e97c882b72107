"""Operations endpoints: liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from rotator.api.routing import api_router
from rotator.api.state import ApiState
from rotator.errors import RotatorError
from rotator.metrics import CONTENT_TYPE


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    problems: list[str] = []


def router(state: ApiState) -> APIRouter:
    api = api_router(["operations"])
    runtime = state.runtime

    @api.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz() -> Health:
        return Health(status="ok")

    @api.get(
        "/readyz",
        response_model=Readiness,
        summary="The journal and every primary backend are reachable",
        responses={503: {"model": Readiness, "description": "Not ready: see problems"}},
    )
    async def readyz() -> Response:
        problems: list[str] = []
        try:
            await asyncio.to_thread(runtime.journal.ping)
        except RotatorError as exc:
            problems.append(f"journal: {exc.message}")

        async def check(env: str) -> None:
            rt = runtime.environments[env]
            try:
                await asyncio.to_thread(rt.primary.check)
            except RotatorError as exc:
                state.metrics.backend_errors.labels(env, rt.primary.name).inc()
                problems.append(f"{env}/{rt.primary.name}: {exc.message}")
            try:
                rt.settings.webhook.secret(f"environments.{env}.webhook.secret_env")
            except RotatorError as exc:
                problems.append(f"{env}: webhooks: {exc.message} ({exc.where})")

        await asyncio.gather(*(check(env) for env in runtime.environments))
        ready = Readiness(status="unready" if problems else "ready", problems=problems)
        return JSONResponse(ready.model_dump(), status_code=503 if problems else 200)

    @api.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            }
        },
    )
    async def metrics() -> Response:
        body = await asyncio.to_thread(state.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    return api
