"""Where notifications go: a signed HTTPS webhook, a Slack-compatible incoming webhook, and
Alertmanager's v2 API. Each :class:`Sender` posts one notification (Alertmanager: a list of
alerts) and raises :class:`DeliveryError` when the peer did not take it; a transient failure
(a connection error, a timeout, 429, 5xx) is tried again at once a few times with backoff
(stamina), then the outbox tries again later.

A sender's errors name the sink, never its URL (a Slack URL is a secret) nor a body.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import stamina

from rotator.errors import ConfigError
from rotator.notify.notice import Notice
from rotator.notify.settings import AlertmanagerSink, SlackSink, WebhookSink
from rotator.webhooks.signature import sign

ATTEMPTS = 3
"""Tries of one delivery attempt (the first included) before the outbox waits and tries later."""


class DeliveryError(Exception):
    """The peer did not take the notification. ``message`` names the sink and why."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


def _retry_again(exc: Exception) -> bool:
    return isinstance(exc, DeliveryError) and exc.transient


class Sender:
    """Posts JSON to one peer; :meth:`send` is one delivery attempt (with its quick retries)."""

    def __init__(self, name: str, url: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self._url = url
        self._client = client

    def headers(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def body(self, notice: Notice, delivery_id: str, now: datetime) -> Any:
        raise NotImplementedError

    async def send(self, notice: Notice, delivery_id: str, now: datetime) -> None:
        await self.post(self.body(notice, delivery_id, now))

    async def post(self, doc: Any) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        headers = self.headers(body)
        async for attempt in stamina.retry_context(
            on=_retry_again,
            attempts=ATTEMPTS,
            timeout=None,
            wait_initial=0.2,
            wait_max=2.0,
            wait_jitter=0.2,
        ):
            with attempt:
                await self._post_once(body, headers)

    async def _post_once(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            answer = await self._client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(
                f"sink {self.name!r}: the peer did not answer in time", transient=True
            ) from None
        except httpx.TransportError as exc:
            raise DeliveryError(
                f"sink {self.name!r}: cannot reach the peer ({type(exc).__name__})", transient=True
            ) from None
        if answer.status_code < 300:
            return
        transient = answer.status_code in (408, 425, 429) or answer.status_code >= 500
        raise DeliveryError(
            f"sink {self.name!r}: the peer answered HTTP {answer.status_code}", transient=transient
        )

    async def aclose(self) -> None:
        await self._client.aclose()


class WebhookSender(Sender):
    """A JSON body signed as Makini signs its webhooks: HMAC-SHA256 of the raw body."""

    def __init__(self, sink: WebhookSink, secret: bytes, client: httpx.AsyncClient) -> None:
        super().__init__(sink.name, sink.url, client)
        self._secret = secret
        self._header = sink.header
        self._encoding = sink.encoding

    def headers(self, body: bytes) -> dict[str, str]:
        signed = sign(self._secret, body, self._encoding)
        return {"Content-Type": "application/json", self._header: signed}

    def body(self, notice: Notice, delivery_id: str, now: datetime) -> Any:
        return {"id": delivery_id, "source": "makini-rotator", **notice.as_dict()}


class SlackSender(Sender):
    """``{"text": ...}`` to an incoming webhook."""

    def body(self, notice: Notice, delivery_id: str, now: datetime) -> Any:
        mark = ":rotating_light:" if notice.firing else ":white_check_mark:"
        if notice.firing and notice.severity == "info":
            mark = ":information_source:"
        text = f"{mark} *{notice.summary}* ({notice.severity})"
        if notice.detail:
            text += f"\n{notice.detail}"
        return {"text": text}


def alertname(condition: str) -> str:
    """``rotation_failed`` -> ``MakiniRotatorRotationFailed``."""
    return "MakiniRotator" + "".join(p.capitalize() for p in condition.split("_"))


class AlertmanagerSender(Sender):
    """Alerts to ``POST /api/v2/alerts``: a firing alert holds until ``hold`` from now (sent
    again every ``resend`` while it fires), a resolved one ends at its resolution."""

    def __init__(self, sink: AlertmanagerSink, client: httpx.AsyncClient) -> None:
        super().__init__(sink.name, sink.endpoint, client)
        self.labels = dict(sink.labels)
        self.hold = sink.hold

    def alert(self, notice: Notice, now: datetime) -> dict[str, Any]:
        labels = {
            **self.labels,
            "alertname": alertname(notice.condition),
            "condition": notice.condition,
            "environment": notice.environment,
            "credential": notice.credential,
            "severity": notice.severity,
        }
        ends = notice.resolved_at if notice.resolved_at else max(now, notice.started_at) + self.hold
        return {
            "labels": labels,
            "annotations": {"summary": notice.summary, "description": notice.detail},
            "startsAt": notice.started_at.isoformat(),
            "endsAt": ends.isoformat(),
            "generatorURL": "",
        }

    def body(self, notice: Notice, delivery_id: str, now: datetime) -> Any:
        return [self.alert(notice, now)]

    async def resend(self, notices: Sequence[Notice], now: datetime) -> None:
        """Post the alerts that still fire, so that Alertmanager keeps them firing."""
        if notices:
            await self.post([self.alert(n, now) for n in notices])


def client_for(timeout_s: float, ca_file: Path | None, where: str) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the CA bundle {ca_file}: {getattr(exc, 'strerror', None) or exc}",
                where=f"{where}.ca_file",
                hint="point ca_file at a readable PEM file of CA certificates",
            ) from None
    return httpx.AsyncClient(timeout=timeout_s, verify=verify, follow_redirects=False)


def build(sink: WebhookSink | SlackSink | AlertmanagerSink, where: str) -> Sender:
    """The sender of a configured sink (reads its secret now: ConfigError if it is missing)."""
    if isinstance(sink, WebhookSink):
        secret = sink.secret(where)
        return WebhookSender(sink, secret, client_for(sink.timeout_s, sink.ca_file, where))
    if isinstance(sink, SlackSink):
        url = sink.url(where)
        return SlackSender(sink.name, url, client_for(sink.timeout_s, sink.ca_file, where))
    return AlertmanagerSender(sink, client_for(sink.timeout_s, sink.ca_file, where))
