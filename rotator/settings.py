"""Configuration: one TOML file plus environment variables, validated up front.

The file names environments; each has its Makini settings, its backends, its sealing key, a
default schedule and its credentials. Secrets never sit in the file: it names the environment
variables (or key files) that hold them. Relative paths are relative to the file's folder.

Where the file is, its TOML and what the process's variables put over it: :mod:`rotator.configfile`.

Every validation error is turned into a :class:`~rotator.errors.ConfigError` that lists each
problem with its key path (``environments.prod.credentials[2].connection_id``).
"""

from __future__ import annotations

import functools
import os
import re
import string
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from backends import backend_class, kinds
from backends.base import NAME_PATTERN, BackendSettings
from rotator.apart import storage_conflicts
from rotator.configfile import ENV_NAME_PATTERN, LoggingSettings, read_file
from rotator.crypto import KeySource
from rotator.durations import format_duration, parse_duration
from rotator.errors import ConfigError, NotFound
from rotator.notify.settings import NotifySettings
from rotator.readconfig import resolve_storage


def _sign(*, positive: bool) -> AfterValidator:
    def check(value: timedelta) -> timedelta:
        if positive and value <= timedelta(0):
            raise ValueError(f"must be positive, not {format_duration(value)}")
        if value < timedelta(0):
            raise ValueError(f"must not be negative, not {format_duration(value)}")
        return value

    return AfterValidator(check)


def bounds(
    least: timedelta | None = None, most: timedelta | None = None, *, otherwise: str = ""
) -> AfterValidator:
    """Bounds of one duration key (beyond its sign and the century every duration stays
    within), said in the configuration's own syntax; ``otherwise`` names the key's other
    accepted value (a retention's ``"forever"``, held as None, which no bound applies to)."""
    alternative = f" (or {otherwise})" if otherwise else ""

    def check(value: timedelta | None) -> timedelta | None:
        if value is None:
            return value
        if least is not None and value < least:
            raise ValueError(
                f"must be at least {format_duration(least)}{alternative}, "
                f"not {format_duration(value)}"
            )
        if most is not None and value > most:
            raise ValueError(
                f"must be at most {format_duration(most)}, not {format_duration(value)}"
            )
        return value

    return AfterValidator(check)


Duration = Annotated[timedelta, BeforeValidator(parse_duration), _sign(positive=False)]
"""A duration key that may be zero: parsed by :func:`parse_duration`, zero to a century."""
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), _sign(positive=True)]
"""A duration key that must be above zero (ticks, intervals, TTLs, poll periods)."""

_SECOND = timedelta(seconds=1)
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """Rotations not forced by expiry start only inside this daily window (local ``timezone``)."""

    start: time
    end: time
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None

    def contains(self, moment: datetime, tz: ZoneInfo) -> bool:
        local = moment.astimezone(tz)
        day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[local.weekday()]
        t = local.time().replace(tzinfo=None)
        if self.start <= self.end:
            inside = self.start <= t < self.end
        else:  # wraps midnight, e.g. 22:00-04:00
            inside = t >= self.start or t < self.end
            if t < self.end:
                day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(local.weekday() - 1) % 7]
        return inside and (self.days is None or day in self.days)


class ScheduleOverride(_Model):
    """Any subset of the schedule keys, set on a credential over its environment's schedule."""

    interval: Annotated[PositiveDuration, bounds(least=_SECOND)] | None = None
    cron: str | None = None
    timezone: str | None = None
    jitter: Duration | None = None
    window: Window | None = None
    rotate_before_expiry: Duration | None = None
    grace_period: Duration | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value, timezone=UTC)
            except ValueError as exc:
                raise ValueError(f"not a crontab expression ({exc})") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (use e.g. 'UTC')") from None
        return value


class Schedule(ScheduleOverride):
    """When a credential rotates. Set ``interval`` or ``cron`` (or neither: expiry only)."""

    timezone: str | None = "UTC"
    jitter: Duration | None = timedelta(0)
    rotate_before_expiry: Duration | None = timedelta(days=7)
    grace_period: Duration | None = timedelta(hours=1)

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if self.interval is not None and self.cron is not None:
            raise ValueError("set either 'interval' or 'cron', not both")
        return self

    def merged(self, override: ScheduleOverride | None) -> Schedule:
        if override is None:
            return self
        data = self.model_dump()
        data.update(override.model_dump(exclude_unset=True))
        if "cron" in override.model_fields_set:
            data["interval"] = None if override.cron else data["interval"]
        if "interval" in override.model_fields_set and override.interval:
            data["cron"] = None
        return Schedule.model_validate(data)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone or "UTC")


class RetrySettings(_Model):
    """How the Makini client retries transient failures (429, 5xx, timeouts)."""

    max_attempts: int = Field(default=5, ge=1, le=20)
    base_delay_s: float = Field(default=0.5, gt=0, le=60)
    max_delay_s: float = Field(default=30.0, gt=0, le=600)
    total_timeout_s: float = Field(default=60.0, gt=0, le=3600)


class MakiniSettings(_Model):
    base_url: str = "https://api.makini.io"
    client_id: str = Field(min_length=1)
    client_secret_env: str | None = Field(
        default=None,
        min_length=1,
        description="Name of the environment variable holding the client secret.",
    )
    client_secret_file: Path | None = Field(
        default=None,
        description="Or a file holding it (a mounted secret; `make run` writes its own under "
        ".run/). Relative to the configuration file's folder.",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    retry: RetrySettings = RetrySettings()
    issue_invalidates_previous: bool | None = Field(
        default=None,
        description="Whether issuing a token kills the previous one at once (undocumented). "
        "None: unknown; the engine verifies and keeps the grace period.",
    )
    expires_in: Literal["auto", "timestamp", "seconds"] = Field(
        default="auto",
        description="How to read expires_in: Unix timestamp, a duration, or guess by size.",
    )
    default_token_lifetime: Annotated[PositiveDuration, bounds(least=_SECOND)] = Field(
        default=timedelta(days=30),
        description="How long this environment's access tokens live (Makini documents 30 "
        "days): assumed when Makini gives no expiry, and the bound the schedule's "
        "rotate_before_expiry and grace_period must stay below.",
    )
    revoke_path: str | None = Field(
        default=None,
        description="An undocumented token revocation endpoint, if the account has one, "
        "e.g. '/api/system/tokens/revoke'. Without it a token can only die by expiry, by a "
        "newer token (where issuing invalidates), or by disconnecting the connection.",
    )
    max_concurrency: int = Field(default=32, ge=1, le=1000)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL such as https://api.makini.io")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_secret_source(self) -> MakiniSettings:
        if (self.client_secret_env is None) == (self.client_secret_file is None):
            raise ValueError(
                "set exactly one of 'client_secret_env' (the variable's name) or "
                "'client_secret_file' (a file holding the Makini client secret)"
            )
        return self

    def client_secret(self, where: str) -> str:
        """The Makini client secret, from its variable or its file. ``where``: the key path
        of this table's secret key (``environments.prod.makini.client_secret_env``); a
        ConfigError names the key actually set, the variable or file, and what to do."""
        base = where.rsplit(".", 1)[0] if where.endswith(".client_secret_env") else where
        if self.client_secret_file is not None:
            return _read_secret_file(self.client_secret_file, f"{base}.client_secret_file")
        assert self.client_secret_env is not None
        secret = os.environ.get(self.client_secret_env)
        if not secret:
            raise ConfigError(
                f"the environment variable {self.client_secret_env} is not set",
                where=f"{base}.client_secret_env",
                hint=f"export {self.client_secret_env} with the Makini client secret "
                "(read it from where it is kept, e.g. `read -rs`, not typed into a command "
                "line), or name a file with client_secret_file",
            )
        return secret

    def resolve_paths(self, base: Path) -> MakiniSettings:
        path = self.client_secret_file
        if path is not None and not path.is_absolute():
            return self.model_copy(update={"client_secret_file": (base / path).resolve()})
        return self


_MAX_SECRET_FILE = 64 * 1024


def _read_secret_file(path: Path, where: str) -> str:
    """A secret kept in a file (surrounding whitespace dropped); never shown in an error."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"the Makini client secret file {path} does not exist",
            where=where,
            hint=f"put the client secret in it (`chmod 600 {path}`); for config/local.toml, "
            "start `make run` once: it writes it",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read the Makini client secret file {path}: "
            f"{exc.strerror or type(exc).__name__}",
            where=where,
            hint="run as the user that owns the file, or point the key at a readable file",
        ) from None
    text = data.decode("utf-8", "replace").strip()
    if not text or len(data) > _MAX_SECRET_FILE or "\n" in text:
        raise ConfigError(
            f"the Makini client secret file {path} does not hold one secret on one line",
            where=where,
            hint="write the client secret alone into the file",
        )
    return text


class CredentialSettings(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    connection_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    method: Literal["issue", "refresh"] = Field(
        default="issue",
        description="issue: the admin API issues a new token; refresh: the OAuth refresh grant.",
    )
    schedule: ScheduleOverride | None = None
    description: str | None = None
    revoke_strategy: Literal["issue", "refresh", "disconnect", "auto"] = Field(
        default="auto",
        description="How an emergency revoke makes the compromised token invalid at Makini. "
        "issue: have the admin API issue a new token (where that invalidates the old one); "
        "refresh: the OAuth refresh grant; disconnect: delete the connection (every token dies, "
        "the customer must reconnect); auto: makini.revoke_path where configured, else refresh "
        "or issue per 'method', and disconnect as the last resort when the old token survives.",
    )


class WebhookSettings(_Model):
    """The Makini webhook receiver of one environment (``POST /v1/webhooks/makini/{env}``).

    Without ``secret_env`` the receiver answers 404 for the environment. Event types are matched
    with shell patterns (``fnmatch``, case-insensitive) because Makini does not document them.
    """

    secret_env: str | None = Field(
        default=None,
        min_length=1,
        description="Name of the environment variable holding the webhook signing secret.",
    )
    header: str = Field(
        default="X-Webhook-Signature",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="Header carrying the HMAC-SHA256 of the raw body (base64 or hex).",
    )
    max_body_bytes: int = Field(default=65536, ge=256, le=10 * 1024 * 1024)
    attention_events: list[str] = Field(
        default_factory=lambda: ["*auth*required*", "*reauth*"],
        description="Events that mark the credential as needing a person.",
    )
    verify_events: list[str] = Field(
        default_factory=lambda: ["*token*", "*auth*", "*connection*status*", "*credential*"],
        description="Events after which the current token is verified with Makini.",
    )

    def secret(self, where: str) -> bytes | None:
        """The signing secret, ``None`` when webhooks are off; ConfigError when unset."""
        if self.secret_env is None:
            return None
        value = os.environ.get(self.secret_env)
        if not value:
            raise ConfigError(
                f"the environment variable {self.secret_env} is not set",
                where=where,
                hint=f"export {self.secret_env} with the Makini webhook secret",
            )
        return value.encode()


_TEMPLATE_FIELDS = frozenset({"id", "platform", "company", "name"})
_NOT_IN_NAME = re.compile(r"[^a-z0-9_]+")
_SAMPLE = {"id": "conn-1", "platform": "sap", "company": "acme", "name": "acme-sap"}


@functools.lru_cache(maxsize=64)
def _template_fields(template: str) -> frozenset[str]:
    return frozenset(
        f for _, f, _, _ in string.Formatter().parse(template) if f
    ) & _TEMPLATE_FIELDS


def credential_name(template: str, fields: Mapping[str, str | None]) -> str:
    """The credential name ``template`` gives a connection: each field lower-cased, every run
    of characters a credential name may not hold made one ``-``, cut to 63 characters."""
    slugs = {
        key: _NOT_IN_NAME.sub("-", (fields.get(key) or "none").lower()).strip("-") or "none"
        for key in _template_fields(template)
    }
    return template.format_map(slugs)[:63].rstrip("-_")


class DiscoverFilter(_Model):
    """Shell patterns (``fnmatch``, case-insensitive) a connection is matched against. Each
    key given must match (one of its patterns); ``metadata`` maps a key of the connection's
    metadata to a pattern of its value."""

    id: list[str] = Field(default_factory=list)
    name: list[str] = Field(default_factory=list)
    platform: list[str] = Field(default_factory=list)
    company: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.id or self.name or self.platform or self.company or self.metadata)


class DiscoverSettings(_Model):
    """``[environments.X.discover]``: enrol the connections Makini lists for this
    environment's admin client as credentials, and off-board those that are gone."""

    enabled: bool = False
    interval: Annotated[PositiveDuration, bounds(least=timedelta(seconds=10))] = Field(
        default=timedelta(minutes=15),
        description="How often serve lists the connections (and at start; run-due at start).",
    )
    include: DiscoverFilter = Field(
        default_factory=DiscoverFilter,
        description="Only connections matching every key given here (nothing given: all).",
    )
    exclude: DiscoverFilter = Field(
        default_factory=DiscoverFilter,
        description="Connections matching any one key given here are left out.",
    )
    name_template: str = Field(
        default="{platform}-{id}",
        description="The credential name of a discovered connection, from {id}, {platform}, "
        "{company} and {name} (each lower-cased, other characters made '-').",
    )
    schedule: ScheduleOverride | None = None
    events: list[str] = Field(
        default_factory=lambda: [
            "*connection*created*", "*connection*added*", "*connection*connected*",
            "*connection*updated*", "*connection*changed*", "*connection*status*",
            "*connection*deleted*", "*connection*disconnected*", "*connection*removed*",
        ],
        description="Makini webhook event types (shell patterns, case-insensitive) that run "
        "discovery at once: for a connection no credential has, or one that went away.",
    )
    offboard_grace: Annotated[Duration, bounds(most=timedelta(days=366))] = Field(
        default=timedelta(days=7),
        description="A connection gone at Makini stops rotating at once; its tokens are made "
        "unreadable this long after (readers have time to move). Nothing is deleted at Makini.",
    )

    @field_validator("name_template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a template ({exc})") from None
        unknown = used - _TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"unknown field {{{sorted(unknown)[0]}}}: use {{id}}, {{platform}}, "
                "{company} or {name}"
            )
        if "id" not in used:
            raise ValueError("must contain {id}: two connections would get one name")
        sample = credential_name(value, _SAMPLE)
        if not re.match(NAME_PATTERN, sample):
            raise ValueError(
                f"gives {sample!r} for a connection, not a valid credential name (lower-case "
                "letters, digits, '-' and '_', starting with a letter or digit)"
            )
        return value


_INDEXES: dict[int, tuple[list[CredentialSettings], dict[str, CredentialSettings]]] = {}


def _by_name(creds: list[CredentialSettings]) -> dict[str, CredentialSettings]:
    """``creds`` by name, built once per list (status and the engine look a credential up per
    row; a scan made 10,000 credentials quadratic). Kept outside the frozen model, whose
    equality would otherwise depend on the cache; each entry holds its list, so an id is
    never reused while cached, and a handful of lists are cached at most."""
    entry = _INDEXES.get(id(creds))
    if entry is None or entry[0] is not creds:
        if len(_INDEXES) >= 32:
            _INDEXES.clear()
        entry = (creds, {c.name: c for c in creds})
        _INDEXES[id(creds)] = entry
    return entry[1]


class EnvironmentSettings(_Model):
    makini: MakiniSettings
    sealing_key: KeySource
    backends: list[Any] = Field(min_length=1)
    schedule: Schedule = Schedule()
    credentials: list[CredentialSettings] = Field(default_factory=list)
    webhook: WebhookSettings = WebhookSettings()
    notify: NotifySettings = NotifySettings()
    discover: DiscoverSettings = DiscoverSettings()
    _configured: list[CredentialSettings] | None = PrivateAttr(default=None)
    _offboarded: frozenset[str] = PrivateAttr(default=frozenset())

    @field_validator("credentials")
    @classmethod
    def _unique(cls, creds: list[CredentialSettings]) -> list[CredentialSettings]:
        seen: set[str] = set()
        for cred in creds:
            if cred.name in seen:
                raise ValueError(f"credential name {cred.name!r} appears twice")
            seen.add(cred.name)
        return creds

    @property
    def backend_settings(self) -> list[BackendSettings]:
        return list(self.backends)

    def credential(self, name: str, env: str) -> CredentialSettings:
        found = _by_name(self.credentials).get(name)
        if found is not None:
            return found
        known = ", ".join(c.name for c in self.credentials) or "none"
        raise NotFound(
            f"environment {env!r} has no credential {name!r}",
            where=f"environments.{env}.credentials",
            hint=f"known credentials: {known}",
        )

    @property
    def configured_credentials(self) -> list[CredentialSettings]:
        """The credentials the configuration file lists (``credentials`` adds the ones
        discovery enrolled, see :meth:`with_discovered`)."""
        return self.credentials if self._configured is None else self._configured

    @property
    def offboarded(self) -> frozenset[str]:
        """Discovered credentials gone at Makini: readable for the grace, never rotated."""
        return self._offboarded

    def with_discovered(
        self, enrolled: list[CredentialSettings], offboarded: set[str]
    ) -> EnvironmentSettings:
        """These settings with ``enrolled`` (discovery's credentials, already kept clear of
        the configured ones) after the configured credentials."""
        configured = self.configured_credentials
        copy = self.model_copy(update={"credentials": [*configured, *enrolled]})
        copy.mark_discovered(configured, offboarded)
        return copy

    def mark_discovered(
        self, configured: list[CredentialSettings], offboarded: set[str]
    ) -> None:
        """Record which credentials the file lists and which are off-boarded (a fresh copy's
        private attributes: the fields stay frozen)."""
        self._configured = configured
        self._offboarded = frozenset(offboarded)

    def schedule_for(self, cred: CredentialSettings) -> Schedule:
        return self.schedule.merged(cred.schedule)


_FOREVER = ("forever", "off", "never")


def _retention(value: object) -> object:
    """A retention: a duration, or ``"forever"`` (also ``"off"``, ``"never"``: never pruned)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _FOREVER):
        return None
    return parse_duration(value)


Retention = Annotated[timedelta | None, BeforeValidator(_retention)]
"""How long history is kept: a duration, or ``"forever"`` (``None``: never pruned)."""


class RetentionSettings(_Model):
    """How long the journal keeps its history; ``serve`` prunes what is older every
    ``interval``, ``run-due`` at its end, ``rotator db prune`` on demand. Open rotations and
    revokes, what they need, each credential's latest rotation and revoke, open unaccounted
    tokens and undelivered notifications are never pruned (see rotator/journal/retention.py)."""

    audit: Annotated[Retention, bounds(timedelta(days=30), otherwise='"forever"')] = Field(
        default=timedelta(days=400),
        description="Audit entries older than this are deleted (\"forever\": never). The "
        "default keeps 13 months: a year of history, as PCI DSS and most security teams ask, "
        "plus a month to ship it to a SIEM (`rotator audit --jsonl --cursor-file`).",
    )
    rotations: Annotated[Retention, bounds(timedelta(days=7), otherwise='"forever"')] = Field(
        default=timedelta(days=90),
        description="Finished rotations and revokes (and processed webhooks, closed "
        "unaccounted tokens, old reader records) older than this are deleted (\"forever\": "
        "never). Each credential keeps its latest rotation and revoke whatever their age.",
    )
    interval: Annotated[PositiveDuration, bounds(least=timedelta(minutes=1), most=_DAY)] = Field(
        default=_HOUR, description="How often serve prunes (one replica at a time)."
    )
    batch: int = Field(
        default=1000,
        ge=10,
        le=10_000,
        description="Rows deleted per transaction: the journal stays free for other writers "
        "between batches.",
    )
    budget: Annotated[PositiveDuration, bounds(least=_SECOND, most=_HOUR)] = Field(
        default=timedelta(seconds=30),
        description="How long one pass of serve or run-due may prune; what is left waits "
        "for the next pass (`rotator db prune` runs to the end).",
    )

    @property
    def enabled(self) -> bool:
        return self.audit is not None or self.rotations is not None


class JournalSettings(_Model):
    url: str = "sqlite:///rotator-journal.db"
    lock_ttl: Annotated[PositiveDuration, bounds(least=_SECOND, most=_HOUR)] = Field(
        default=timedelta(seconds=15),
        description="A credential's lease lasts this long unless its holder renews it (every "
        "third of it, by a heartbeat): after a crash, another replica or the next run takes the "
        "credential over within it.",
    )
    sqlite_synchronous: Literal["full", "normal"] = "full"
    migrate: Literal["auto", "manual"] = Field(
        default="auto",
        description="auto: a process brings the journal's schema up to date at start (one at a "
        "time, under a lock); manual: it refuses a journal that is behind, and `rotator db "
        "upgrade` migrates it.",
    )
    retention: RetentionSettings = RetentionSettings()


class SchedulerSettings(_Model):
    tick: Annotated[PositiveDuration, bounds(least=_SECOND, most=_DAY)] = Field(
        default=timedelta(seconds=10), description="How often serve looks."
    )
    drain: Annotated[Duration, bounds(most=_HOUR)] = Field(
        default=timedelta(seconds=20),
        description="On SIGTERM or Ctrl-C, how long rotations in flight get to finish before "
        "what is left is parked at its last journaled step (and its lease given back). Keep "
        "it below the pod's terminationGracePeriodSeconds.",
    )
    concurrency: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Rotations in flight at once. Their calls to Makini are bounded apart, by "
        "each environment's makini.max_concurrency: a rotation spends most of its time on "
        "its journal and backend writes, when it leaves its turn at Makini to another.",
    )
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Processes run-due forks to use more than one core; the concurrency limits "
        "are shared among them. auto: one per CPU the container may use (at most 4), once "
        "there are 200 rotations for each; 1: never fork.",
    )
    retry_after_failure: Annotated[Duration, bounds(most=_DAY)] = Field(
        default=timedelta(minutes=10),
        description="After a failed attempt, wait this long before trying the credential again.",
    )


class ReaderSettings(_Model):
    """Who read which version: recorded in memory, flushed to the journal in batches."""

    flush_interval: Annotated[PositiveDuration, bounds(most=_HOUR)] = Field(
        default=timedelta(seconds=5)
    )
    active_window: Annotated[PositiveDuration, bounds(most=timedelta(days=366))] = Field(
        default=timedelta(hours=24),
        description="A reader that read a credential within this window counts as using it.",
    )
    early_end_grace: bool = Field(
        default=False,
        description="End a grace period early once every active reader has the new version.",
    )


class ApiSettings(_Model):
    """The HTTP API of ``rotator serve``."""

    long_poll_max: Annotated[Duration, bounds(most=_HOUR)] = Field(
        default=timedelta(seconds=60), description="Upper bound of ?wait= on token reads."
    )
    cache_max_age: Annotated[Duration, bounds(most=_DAY)] = Field(
        default=timedelta(minutes=5),
        description="A cached token older than this is re-read from the primary backend.",
    )
    replica_poll: Annotated[PositiveDuration, bounds(most=_HOUR)] = Field(
        default=timedelta(milliseconds=250),
        description="How often a replica checks the journal for promotions, drops and key "
        "changes (with PostgreSQL, LISTEN/NOTIFY wakes it at once; this is the safety net).",
    )
    webhook_poll: Annotated[PositiveDuration, bounds(most=_HOUR)] = Field(
        default=timedelta(seconds=2)
    )
    readers: ReaderSettings = ReaderSettings()


class PushgatewaySettings(_Model):
    """Where ``rotator run-due`` pushes its metrics (a Prometheus Pushgateway)."""

    url: str = Field(
        min_length=1,
        pattern=r"^https?://",
        description="The Pushgateway's address, e.g. http://pushgateway.monitoring:9091.",
    )
    job: str = Field(default="rotator-run-due", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    grouping: dict[str, str] = Field(
        default_factory=dict,
        description="More grouping labels (the job and the environments a run covers are "
        "always there), e.g. {cluster = \"eu-1\"}.",
    )
    timeout_s: float = Field(default=5.0, gt=0, le=60)


class MetricsSettings(_Model):
    """Prometheus metrics: scraped from ``serve`` (``GET /metrics``), pushed by ``run-due``."""

    expiry_warning: PositiveDuration = Field(
        default=timedelta(days=3),
        description="Exported per credential as rotator_token_expiry_warning_seconds: the "
        "shipped alert fires when a token expires sooner than this with no successful rotation.",
    )
    backend_check_interval: Annotated[PositiveDuration, bounds(least=_SECOND, most=_DAY)] = (
        Field(
            default=timedelta(minutes=5),
            description="How often serve reads every backend's current version for "
            "rotator_backends_agree (at most once per this, on a scrape).",
        )
    )
    pushgateway: PushgatewaySettings | None = None


class Config(_Model):
    """The whole configuration, after validation and path resolution."""

    journal: JournalSettings = JournalSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    logging: LoggingSettings = LoggingSettings()
    api: ApiSettings = ApiSettings()
    metrics: MetricsSettings = MetricsSettings()
    environments: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], EnvironmentSettings] = (
        Field(min_length=1)
    )
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _apart(self) -> Config:
        for env_name, env in self.environments.items():
            names: set[str] = set()
            for backend in env.backend_settings:
                name = backend.display_name()
                if name in names:
                    raise ValueError(
                        f"environment {env_name!r} has two backends named {name!r}: give each "
                        "a distinct 'name'"
                    )
                names.add(name)
        problems = [
            line
            for name, env in self.environments.items()
            for line in _schedule_problems(name, env)
        ]
        if problems:
            raise ValueError("\n".join(problems))
        resolved = {
            name: _resolved_environment(name, env, self.base_dir)
            for name, env in self.environments.items()
        }
        problems = storage_conflicts(resolved)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def environment(self, name: str) -> EnvironmentSettings:
        try:
            return self.environments[name]
        except KeyError:
            raise NotFound(
                f"no environment named {name!r}",
                where=str(self.source or "configuration"),
                hint=f"known environments: {', '.join(self.environments)}",
            ) from None

    @property
    def base_dir(self) -> Path:
        return self.source.resolve().parent if self.source else Path.cwd()


def _schedule_problems(name: str, env: EnvironmentSettings) -> list[str]:
    """The schedule keys that make no sense against each other or against the environment's
    token lifetime, each named by its key path (where it is written: the environment's schedule
    or a credential's override) with what to do."""
    lifetime = env.makini.default_token_lifetime
    life = format_duration(lifetime)
    schedules = [(f"environments.{name}.schedule", env.schedule, env.schedule.model_fields_set)]
    for index, cred in enumerate(env.configured_credentials):
        if cred.schedule is not None:
            schedules.append(
                (
                    f"environments.{name}.credentials[{index}].schedule",
                    env.schedule_for(cred),
                    cred.schedule.model_fields_set,
                )
            )
    if env.discover.schedule is not None:  # every discovered credential's
        schedules.append(
            (
                f"environments.{name}.discover.schedule",
                env.schedule.merged(env.discover.schedule),
                env.discover.schedule.model_fields_set,
            )
        )
    problems: list[str] = []
    seen: set[str] = set()
    for where, sched, written in schedules:

        def at(key: str, where: str = where, written: set[str] = written) -> str:
            return f"{where if key in written else f'environments.{name}.schedule'}.{key}"

        lines = []
        before = sched.rotate_before_expiry or timedelta(0)
        if before >= lifetime:
            lines.append(
                f"{at('rotate_before_expiry')}: {format_duration(before)} is not below the "
                f"token lifetime ({life}, environments.{name}.makini.default_token_lifetime): "
                "every token would be due as soon as it is issued; set it well below "
                f"{life} (e.g. a quarter of it), or set the lifetime your Makini tokens have"
            )
        grace = sched.grace_period or timedelta(0)
        if grace >= lifetime:
            lines.append(
                f"{at('grace_period')}: {format_duration(grace)} is not below the token "
                f"lifetime ({life}, environments.{name}.makini.default_token_lifetime): the "
                "old token dies before its grace period ends; make it shorter (hours, not days)"
            )
        jitter = sched.jitter or timedelta(0)
        if sched.interval is not None and jitter >= sched.interval:
            lines.append(
                f"{at('jitter')}: {format_duration(jitter)} is not below the interval "
                f"({format_duration(sched.interval)}, {at('interval')}): rotations would "
                "drift past their period; make the jitter a fraction of the interval"
            )
        for line in lines:
            if line not in seen:
                seen.add(line)
                problems.append(line)
    return problems


def _used_kinds(data: Mapping[str, Any]) -> list[str]:
    """The backend types ``data`` names, when each is a known one; otherwise every kind (the
    errors then name them all)."""
    known = kinds()
    used: set[str] = set()
    envs = data.get("environments")
    for env in envs.values() if isinstance(envs, dict) else ():
        entries = env.get("backends") if isinstance(env, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind not in known:
                return known
            used.add(kind)
    return sorted(used) or known


def _config_model(data: Mapping[str, Any]) -> type[Config]:
    """Config with the settings model of each backend type ``data`` uses in the backends
    lists: a file-backend configuration imports no cloud backend's module."""
    return _config_model_of(tuple(backend_class(kind).Settings for kind in _used_kinds(data)))


@functools.lru_cache(maxsize=8)
def _config_model_of(classes: tuple[type[BackendSettings], ...]) -> type[Config]:
    union: Any = Annotated[Union[classes], Field(discriminator="type")]  # noqa: UP007
    env_model: Any = create_model(
        "EnvironmentSettings",
        __base__=EnvironmentSettings,
        backends=(list[union], Field(min_length=1)),
    )
    env_map: Any = dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], env_model]
    return create_model(
        "Config", __base__=Config, environments=(env_map, Field(min_length=1))
    )


def format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        # drop the discriminator tag pydantic inserts after a backend's index
        cleaned: list[int | str] = []
        for i, part in enumerate(loc):
            tag = i >= 2 and loc[i - 2] == "backends" and isinstance(loc[i - 1], int)
            if tag and isinstance(part, str) and part in kinds():
                continue
            cleaned.append(part)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config/example.toml)"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown backend type; known types: {', '.join(kinds())}"
        elif err["type"] == "union_tag_not_found":
            msg = f"a backend needs a 'type' ({', '.join(kinds())})"
        if cleaned:
            lines.append(f"  {format_location(tuple(cleaned))}: {msg}")
        else:  # a check across keys (environments kept apart): each line names its keys
            lines.extend(f"  {line}" for line in msg.splitlines())
    return ConfigError(
        f"the configuration has {len(lines)} problem{'s' if len(lines) != 1 else ''}:\n"
        + "\n".join(lines),
        where=source,
        hint="fix the keys named above; `rotator config check` re-validates",
    )


def load_config(
    path: Path | str | None = None, *, overrides: dict[str, Any] | None = None
) -> Config:
    """Read, validate and resolve the configuration at ``path`` (or ``$ROTATOR_CONFIG``)."""
    chosen, data = read_file(path)
    for key, value in (overrides or {}).items():
        data[key] = value
    return parse_config(data, source=chosen)


def parse_config(data: dict[str, Any], *, source: Path | None = None) -> Config:
    model = _config_model(data)
    where = str(source) if source else "configuration"
    try:
        config = model.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise _explain(exc, where) from None
    base = source.resolve().parent if source else Path.cwd()
    return _resolve_paths(config, base)


def _resolved_environment(name: str, env: EnvironmentSettings, base: Path) -> EnvironmentSettings:
    """``env`` with its paths made absolute against ``base`` and each key named with its key
    path and role, for the errors it may cause."""
    backends, sealing = resolve_storage(name, env.backend_settings, env.sealing_key, base)
    makini = env.makini.resolve_paths(base)
    notify = env.notify.resolve_paths(base)
    return env.model_copy(
        update={"backends": backends, "sealing_key": sealing, "makini": makini, "notify": notify}
    )


def _resolve_paths(config: Config, base: Path) -> Config:
    envs = {
        name: _resolved_environment(name, env, base) for name, env in config.environments.items()
    }
    journal = config.journal
    if journal.url.startswith("sqlite:///") and not journal.url.startswith("sqlite:////"):
        rel = journal.url.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            journal = journal.model_copy(update={"url": f"sqlite:///{(base / rel).resolve()}"})
    return config.model_copy(update={"environments": envs, "journal": journal})
