"""The simulator's webhook sender: signed Makini-style webhooks, duplicated and out of order on
request (``POST /_sim/webhooks/send``).

Makini does not document its event strings nor its id field; the simulator sends
``{"id", "event", "timestamp", "connection_id", "data"}`` with events such as
``connection.authentication_required``, ``connection.status_changed``, ``sync.completed``,
``sync.failed`` and ``system.error``, signed with HMAC-SHA256 of the raw body (base64 by
default, hex on request) in ``X-Webhook-Signature``.
"""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rotator.webhooks.signature import sign


class SimEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str = Field(min_length=1, max_length=200)
    connection_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class SendRequest(BaseModel):
    """What to send where. ``event``/``connection_id`` for one event, or ``events``."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://")
    secret: str = Field(min_length=1)
    event: str | None = None
    connection_id: str | None = None
    events: list[SimEvent] = Field(default_factory=list)
    duplicates: int = Field(default=0, ge=0, le=20, description="Extra deliveries of each.")
    shuffle: bool = False
    encoding: Literal["base64", "hex"] = "base64"
    header: str = "X-Webhook-Signature"
    bad_signature: bool = False
    seed: int | None = None

    def all_events(self) -> list[SimEvent]:
        extra = [SimEvent(event=self.event, connection_id=self.connection_id)] if self.event else []
        return [*extra, *self.events]


def build_deliveries(req: SendRequest, now: datetime) -> list[tuple[str, str, bytes]]:
    """(webhook id, event, body) per delivery, in sending order."""
    bodies = []
    for i, ev in enumerate(req.all_events()):
        doc = {
            "id": f"wh_{uuid.uuid4().hex}",
            "event": ev.event,
            "timestamp": (now + timedelta(milliseconds=i)).isoformat(),
            "connection_id": ev.connection_id,
            "data": ev.data,
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        bodies.extend([(str(doc["id"]), ev.event, body)] * (1 + req.duplicates))
    if req.shuffle:
        random.Random(req.seed).shuffle(bodies)
    return bodies


async def send(req: SendRequest, now: datetime | None = None) -> list[dict[str, Any]]:
    """Deliver every event (sequentially) and report each answer."""
    secret = req.secret.encode()
    report = []
    async with httpx.AsyncClient(timeout=10) as client:
        for wid, event, body in build_deliveries(req, now or datetime.now(UTC)):
            signature = sign(secret, body, req.encoding)
            if req.bad_signature:
                signature = sign(b"not-" + secret, body, req.encoding)
            try:
                response = await client.post(
                    req.url,
                    content=body,
                    headers={"content-type": "application/json", req.header: signature},
                )
                status: int | None = response.status_code
            except httpx.HTTPError:
                status = None
            report.append({"id": wid, "event": event, "status": status})
    return report


async def send_endpoint(request: Request) -> Response:
    """``POST /_sim/webhooks/send``: the body is a :class:`SendRequest`."""
    try:
        req = SendRequest.model_validate(json.loads(await request.body() or b"{}"))
    except (ValueError, ValidationError) as exc:
        return JSONResponse({"error": str(exc)[:2000]}, 422)
    if not req.all_events():
        return JSONResponse({"error": "give event (and connection_id) or events"}, 422)
    return JSONResponse({"deliveries": await send(req)})
