"""Request body limits, answered with the error envelope (413).

Bodies are small here (admin actions, webhooks), so a request with a body is read in full, up
to the limit, before the app sees it: ``Content-Length`` over the limit is refused at once, a
chunked body as soon as it passes the limit. The app then reads the buffered body.
"""

from __future__ import annotations

from typing import Any

from rotator.api.errors import envelope, request_id_from
from rotator.api.tokens import ASGIApp, Message, Receive, Scope, Send

_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


async def _too_large(send: Send, scope: Scope, limit: int) -> None:
    rid = request_id_from(next((v for k, v in scope["headers"] if k == b"x-request-id"), None))
    body = envelope(413, f"the body is larger than {limit} bytes", rid)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """``limit_for(path)`` gives the limit in bytes for a request path."""

    def __init__(self, app: ASGIApp, limit_for: Any) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            return await self.app(scope, receive, send)
        limit: int = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                return await _too_large(send, scope, limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _too_large(send, scope, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
