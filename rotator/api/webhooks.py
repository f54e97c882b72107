"""``POST /v1/webhooks/makini/{env}``: check, store, answer 200; the worker acts later.

Order of checks: the environment (422 malformed, 404 unknown or webhooks off), the size (413,
from ``Content-Length`` and again while reading), the signature over the raw bytes (401), the
content type (415), the body (422: a JSON object). A duplicate answers 200 ``duplicate`` and is
not queued again: Makini retries until it sees a 200. Duplicates are found on the signed body
only (its id, else its hash; ``rotator.webhooks.queue.dedupe_key``); an id header is logged,
never used.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse

from rotator.api.auth import check_env_name
from rotator.api.errors import ApiError, responses
from rotator.api.routing import api_router
from rotator.api.state import ApiState
from rotator.configfile import ENV_NAME_PATTERN
from rotator.errors import RotatorError
from rotator.webhooks.queue import enqueue, parse_event
from rotator.webhooks.signature import signature_valid

log = structlog.get_logger("rotator.api.webhooks")

ENV_PATH = Path(description="Environment name.", json_schema_extra={"pattern": ENV_NAME_PATTERN})
_ID_HEADERS = ("x-webhook-id", "x-makini-webhook-id")


class WebhookAck(BaseModel):
    status: Literal["accepted", "duplicate"]
    id: str


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def router(state: ApiState) -> APIRouter:
    api = api_router(["webhooks"])
    runtime = state.runtime

    def count(env: str, outcome: str) -> None:
        state.metrics.webhook_events.labels(state.env_label(env), outcome).inc()

    @api.post(
        "/v1/webhooks/makini/{env}",
        response_model=WebhookAck,
        summary="Receive a Makini webhook (HMAC-SHA256 signed)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "parameters": [
                {
                    "name": "X-Webhook-Signature",
                    "in": "header",
                    "required": False,
                    "description": "HMAC-SHA256 of the raw body, base64 or hex (the header "
                    "name is configurable per environment).",
                    "schema": {"type": "string"},
                }
            ],
        },
        responses=responses(401, 404, 413, 415, 422, 503),
    )
    async def receive(request: Request, env: Annotated[str, ENV_PATH]) -> JSONResponse:
        check_env_name(env)
        rt = runtime.environments.get(env)
        if rt is None or rt.settings.webhook.secret_env is None:
            count(env, "rejected")
            raise ApiError(404, f"no webhook receiver for environment {env!r}")
        hook = rt.settings.webhook
        try:
            secret = hook.secret(f"environments.{env}.webhook.secret_env")
        except RotatorError as exc:
            log.error("webhook.no_secret", environment=env, error=exc.message)
            raise ApiError(503, "the webhook secret is not configured", "unavailable") from None
        assert secret is not None
        try:
            body = await _body(request, hook.max_body_bytes)
        except ApiError:
            count(env, "rejected")
            raise
        if not signature_valid(secret, body, request.headers.get(hook.header)):
            count(env, "rejected")
            log.warning("webhook.bad_signature", environment=env, size=len(body))
            raise ApiError(401, f"missing or invalid {hook.header}")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            count(env, "rejected")
            raise ApiError(415, "the body must be application/json")
        try:
            event = parse_event(body)
        except ValueError as exc:
            count(env, "rejected")
            raise ApiError(422, str(exc)) from None
        fresh = await asyncio.to_thread(enqueue, runtime.journal, env, event, body)
        count(env, "accepted" if fresh else "duplicate")
        if fresh:
            state.webhook_wake.set()
        log.info(
            "webhook.received",
            environment=env,
            event_type=event.event_type,
            id=event.webhook_id,
            duplicate=not fresh,
            # unsigned, so never the dedupe key; logged to help match Makini's delivery logs
            header_id=next(
                (request.headers[h][:200] for h in _ID_HEADERS if h in request.headers), None
            ),
        )
        ack: dict[str, Any] = {
            "status": "accepted" if fresh else "duplicate",
            "id": event.webhook_id,
        }
        return JSONResponse(ack)

    return api
