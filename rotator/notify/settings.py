"""The ``[environments.X.notify]`` table: where one environment's notifications go.

Each environment lists its own sinks, so a dev environment's notifications can go elsewhere
than prod's. Secrets (a webhook's signing secret, a Slack incoming-webhook URL, which is a
secret itself) never sit in the file: the file names the environment variable or the file that
holds them, like every other secret of the configuration.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from rotator.durations import parse_duration
from rotator.errors import ConfigError

ConditionName = Literal[
    "rotation_failed", "attention", "near_expiry", "revoke", "revoke_unconfirmed", "drift",
    "offboarded",
]
"""What can be notified (``rotator.notify.notice.Condition``'s values)."""
CONDITIONS: tuple[str, ...] = get_args(ConditionName)

SINK_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
_URL = re.compile(r"^https?://[^/\s]+")


_LONGEST = timedelta(days=3650)


def _period(value: object) -> timedelta:
    """The configuration's duration syntax (:mod:`rotator.durations`), above zero and within
    ten years."""
    period = parse_duration(value)
    assert isinstance(period, timedelta)
    if not timedelta(0) < period <= _LONGEST:
        raise ValueError(
            f"{str(value)[:40]!r} must be above zero and at most ten years"
        )
    return period


Period = Annotated[timedelta, BeforeValidator(_period)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _from_env_or_file(env: str | None, file: Path | None, where: str, what: str) -> str:
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError(
                f"the environment variable {env} is not set",
                where=where,
                hint=f"export {env} with {what}",
            )
        return value
    assert file is not None
    try:
        value = file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} from {file}: {exc.strerror or type(exc).__name__}",
            where=where,
            hint="check the path and that this user may read it",
        ) from None
    if not value:
        raise ConfigError(f"{file} is empty", where=where, hint=f"write {what} into it")
    return value


class _Sink(_Model):
    name: str = Field(pattern=SINK_NAME, description="Names the sink in logs and metrics.")
    conditions: list[ConditionName] | None = Field(
        default=None, description="Only these conditions (default: every one)."
    )
    rate_limit: int = Field(
        default=30, ge=1, le=10_000, description="At most this many deliveries a minute."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    ca_file: Path | None = Field(
        default=None, description="A CA bundle to verify the peer with (a private CA)."
    )

    def wants(self, condition: str) -> bool:
        return self.conditions is None or condition in self.conditions


class WebhookSink(_Sink):
    """A generic HTTPS webhook: a JSON body, signed like Makini signs its own webhooks
    (HMAC-SHA256 of the raw body, base64 or hex, in ``header``)."""

    type: Literal["webhook"]
    url: str
    secret_env: str | None = None
    secret_file: Path | None = None
    header: str = Field(default="X-Rotator-Signature", pattern=r"^[A-Za-z0-9-]{1,64}$")
    encoding: Literal["base64", "hex"] = "base64"

    @model_validator(mode="after")
    def _checked(self) -> WebhookSink:
        if not self.url.startswith("https://") or not _URL.match(self.url):
            raise ValueError("url must be an https:// URL (the body is signed, not encrypted)")
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("set exactly one of 'secret_env' or 'secret_file'")
        return self

    def secret(self, where: str) -> bytes:
        value = _from_env_or_file(self.secret_env, self.secret_file, where, "the signing secret")
        return value.encode()


class SlackSink(_Sink):
    """A Slack-compatible incoming webhook (``{"text": ...}``). Its URL is a secret."""

    type: Literal["slack"]
    url_env: str | None = None
    url_file: Path | None = None

    @model_validator(mode="after")
    def _checked(self) -> SlackSink:
        if (self.url_env is None) == (self.url_file is None):
            raise ValueError("set exactly one of 'url_env' or 'url_file' (the URL is a secret)")
        return self

    def url(self, where: str) -> str:
        value = _from_env_or_file(self.url_env, self.url_file, where, "the incoming-webhook URL")
        if not _URL.match(value):
            raise ConfigError(
                "the incoming-webhook URL is not an http(s) URL",
                where=where,
                hint="set it to the URL Slack (or the compatible service) gave",
            )
        return value


class AlertmanagerSink(_Sink):
    """Alertmanager's v2 API: ``POST {url}/api/v2/alerts``; a resolve sends ``endsAt``."""

    type: Literal["alertmanager"]
    url: str
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels added to every alert (e.g. team, cluster)."
    )
    resend: Period = Field(
        default=timedelta(minutes=1),
        description="How often serve sends a firing alert again, so that Alertmanager keeps "
        "it firing.",
    )
    hold: Period = Field(
        default=timedelta(minutes=10),
        description="A firing alert's endsAt, from when it was last sent: Alertmanager "
        "resolves it then unless it is sent again. With run-due alone (no serve), set it above "
        "the CronJob's period.",
    )

    @model_validator(mode="after")
    def _checked(self) -> AlertmanagerSink:
        if not _URL.match(self.url):
            raise ValueError("url must be an http(s) URL such as http://alertmanager:9093")
        return self

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/api/v2/alerts"


Sink = Annotated[
    Union[WebhookSink, SlackSink, AlertmanagerSink],  # noqa: UP007
    Field(discriminator="type"),
]


class NotifySettings(_Model):
    """Where this environment's notifications go, and when a state becomes one."""

    sinks: list[Sink] = Field(default_factory=list)
    near_expiry: Period = Field(
        default=timedelta(days=3),
        description="A current token expiring within this, with no successful rotation since, "
        "is notified.",
    )
    evaluate_every: Period = Field(
        default=timedelta(seconds=60),
        description="How often serve looks at the states (attention, near expiry, drift, "
        "revokes); run-due looks once, at its end.",
    )
    drift_every: Period = Field(
        default=timedelta(minutes=15),
        description="How often serve reads every backend to find ones that disagree (each "
        "look reads each credential from each backend); run-due looks once, at its end.",
    )
    give_up_after: Period = Field(
        default=timedelta(days=1),
        description="A notification no sink attempt delivered for this long is dropped "
        "(logged, and counted as dead).",
    )

    @model_validator(mode="after")
    def _unique(self) -> NotifySettings:
        names = [s.name for s in self.sinks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"sink name {twice[0]!r} appears twice: give each a distinct name")
        return self

    def resolve_paths(self, base: Path) -> NotifySettings:
        sinks = []
        for sink in self.sinks:
            update = {}
            for field in ("ca_file", "secret_file", "url_file"):
                value = getattr(sink, field, None)
                if isinstance(value, Path) and not value.is_absolute():
                    update[field] = (base / value).resolve()
            sinks.append(sink.model_copy(update=update) if update else sink)
        return self.model_copy(update={"sinks": sinks})
