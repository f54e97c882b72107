"""Prometheus metrics of one rotator process: scraped from ``rotator serve`` (``GET /metrics``),
pushed to a Pushgateway by ``rotator run-due`` (:mod:`rotator.pushing`).

Labels are environments, credentials, backends, Makini operations, HTTP routes, outcomes and
statuses: never a token, a key or a fingerprint. What the journal knows (each credential's
token times, failures, attention; the webhook queue; readers on old versions; backend
agreement) is read when the registry is collected, so every replica and every run reports the
same figures whichever process rotated. Times that alerts compare with ``time()`` are
exported as Unix timestamps: a pushed age would freeze at the value of the push.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rotator import __version__
from rotator.model import utcnow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from rotator.journal import Journal
    from rotator.rotation.work import RotationResult
    from rotator.settings import Config

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger("rotator.metrics")

CredentialKey = tuple[str, str]
"""(environment, credential)"""

_K = TypeVar("_K")
_V = TypeVar("_V")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Probes:
    """What the metrics read beyond the journal's credential state, each given by a layer that
    knows how (:mod:`rotator.observe`). A probe that raises leaves its metric out of that
    collection (and logs why); the others still report."""

    webhook_depth: Callable[[], Mapping[str, int]] | None = None
    """unprocessed Makini webhooks per environment"""
    stale_readers: Callable[[], Mapping[CredentialKey, int]] | None = None
    """readers active recently whose latest read is not the current version"""
    backends_agree: Callable[[], Mapping[CredentialKey, bool]] | None = None
    """whether every backend holds the journal's current version"""


class JournalGauges(Collector):
    """Per credential, from the journal's credential state and the probes."""

    def __init__(self, config: Config, journal: Journal, probes: Callable[[], Probes]) -> None:
        self.config = config
        self.journal = journal
        self.probes = probes

    NAMES = (
        "rotator_token_age_seconds",
        "rotator_token_expires_in_seconds",
        "rotator_token_expiry_timestamp_seconds",
        "rotator_last_rotation_success_timestamp_seconds",
        "rotator_token_expiry_warning_seconds",
        "rotator_credential_attention",
        "rotator_credential_failing",
        "rotator_webhook_queue_depth",
        "rotator_readers_on_old_version",
        "rotator_backends_agree",
    )
    """Every family :meth:`collect` may yield."""

    def describe(self) -> Iterator[Metric]:
        """The families' names alone: registering the collector must not read the journal (a
        registry with ``auto_describe`` calls :meth:`collect` otherwise, every credential's
        state before ``serve`` is ready)."""
        for name in self.NAMES:
            yield GaugeMetricFamily(name, name)

    def collect(self) -> Iterator[Metric]:
        cred = ["environment", "credential"]

        def gauge(name: str, doc: str, labels: list[str] = cred) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        age = gauge("rotator_token_age_seconds", "Seconds since the current token was promoted.")
        left = gauge(
            "rotator_token_expires_in_seconds", "Seconds until the current token expires at Makini."
        )
        expiry = gauge(
            "rotator_token_expiry_timestamp_seconds",
            "When the current token expires at Makini (Unix time).",
        )
        rotated = gauge(
            "rotator_last_rotation_success_timestamp_seconds",
            "When the current token was promoted: the last successful rotation (Unix time).",
        )
        warning = gauge(
            "rotator_token_expiry_warning_seconds",
            "metrics.expiry_warning: alert when a token expires sooner than this.",
        )
        attention = gauge(
            "rotator_credential_attention",
            "1 where a credential needs a person (see rotator status).",
        )
        failing = gauge(
            "rotator_credential_failing",
            "1 where the last attempt on a credential failed (rotation, retire or revoke).",
        )
        now = utcnow()
        states = self.journal.states()
        window_s = self.config.metrics.expiry_warning.total_seconds()
        for env, settings in self.config.environments.items():
            for c in settings.credentials:
                state = states.get((env, c.name))
                labels = [env, c.name]
                warning.add_metric(labels, window_s)
                if state is not None and state.rotated_at is not None:
                    age.add_metric(labels, (now - state.rotated_at).total_seconds())
                    rotated.add_metric(labels, state.rotated_at.timestamp())
                if state is not None and state.expires_at is not None:
                    left.add_metric(labels, (state.expires_at - now).total_seconds())
                    expiry.add_metric(labels, state.expires_at.timestamp())
                attention.add_metric(labels, 1.0 if state is not None and state.attention else 0.0)
                failing.add_metric(
                    labels, 1.0 if state is not None and state.last_error is not None else 0.0
                )
        yield from (age, left, expiry, rotated, warning, attention, failing)
        yield from self._probed()

    def _probed(self) -> Iterator[Metric]:
        probes = self.probes()
        depth = self._probe("webhook_depth", probes.webhook_depth)
        if depth is not None:
            family = GaugeMetricFamily(
                "rotator_webhook_queue_depth",
                "Makini webhooks received and not yet processed.",
                labels=["environment"],
            )
            for env in self.config.environments:
                family.add_metric([env], float(depth.get(env, 0)))
            yield family
        stale = self._probe("stale_readers", probes.stale_readers)
        if stale is not None:
            family = GaugeMetricFamily(
                "rotator_readers_on_old_version",
                "Readers active within api.readers.active_window whose latest read is not the "
                "current version.",
                labels=["environment", "credential"],
            )
            for env, settings in self.config.environments.items():
                for c in settings.credentials:
                    family.add_metric([env, c.name], float(stale.get((env, c.name), 0)))
            yield family
        agree = self._probe("backends_agree", probes.backends_agree)
        if agree is not None:
            family = GaugeMetricFamily(
                "rotator_backends_agree",
                "1 where every backend of the environment holds the journal's current version.",
                labels=["environment", "credential"],
            )
            for (env, credential), ok in sorted(agree.items()):
                family.add_metric([env, credential], 1.0 if ok else 0.0)
            yield family

    @staticmethod
    def _probe(name: str, probe: Callable[[], Mapping[_K, _V]] | None) -> Mapping[_K, _V] | None:
        if probe is None:
            return None
        try:
            return probe()
        except Exception as exc:  # noqa: BLE001 - one probe down leaves the others reporting
            log.warning("metrics.probe_failed", probe=name, error=type(exc).__name__)
            return None


class Metrics:
    """Every metric of the process, on a registry of its own (two apps in one test process
    never collide). ``config`` and ``journal`` add the journal's per-credential gauges, and
    ``probes`` (replaceable later) what they read beyond it."""

    def __init__(
        self,
        config: Config | None = None,
        journal: Journal | None = None,
        probes: Probes | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.probes = probes or Probes()
        Gauge(
            "rotator_build_info",
            "The rotator's release (always 1).",
            ["version"],
            registry=self.registry,
        ).labels(__version__).set(1)
        self.rotations = Counter(
            "rotator_rotations",
            "Rotation drives by outcome.",
            ["environment", "credential", "outcome"],
            registry=self.registry,
        )
        self.rotation_duration = Histogram(
            "rotator_rotation_duration_seconds",
            "Wall time of a rotation drive.",
            ["environment"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.makini_requests = Histogram(
            "rotator_makini_request_duration_seconds",
            "Makini API requests (each attempt) by operation and outcome: ok, 4xx, 5xx, 429 "
            "or network.",
            ["environment", "operation", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.revoked = Counter(
            "rotator_revoked_versions",
            "Versions an emergency revoke made unreadable.",
            ["environment"],
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "rotator_backend_errors",
            "Errors from secret backends seen by this process.",
            ["environment", "backend"],
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "rotator_webhook_events",
            "Makini webhooks: received (accepted, duplicate, rejected) and processed outcomes.",
            ["environment", "outcome"],
            registry=self.registry,
        )
        self.reads = Counter(
            "rotator_token_reads",
            "Token reads by HTTP status.",
            ["environment", "status"],
            registry=self.registry,
        )
        self.http_requests = Histogram(
            "rotator_http_request_duration_seconds",
            "HTTP requests served, by method, route template and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_due_last_success = Gauge(
            "rotator_run_due_last_success_timestamp_seconds",
            "When a run over what is due (run-due, or a tick of serve's scheduler) last ended "
            "with nothing failed in the environment (Unix time).",
            ["environment"],
            registry=self.registry,
        )
        self.journal_pruned = Counter(
            "rotator_journal_pruned_rows",
            "Rows the journal's retention deleted, by table (rotator db prune, serve, run-due).",
            ["table"],
            registry=self.registry,
        )
        self._read_children: dict[tuple[str, int], Counter] = {}
        self._http_children: dict[tuple[str, str, int], Histogram] = {}
        if config is not None and journal is not None:
            self.registry.register(JournalGauges(config, journal, lambda: self.probes))

    def read(self, environment: str, status: int) -> None:
        """Count a read (the hot path: the labelled child is looked up once)."""
        child = self._read_children.get((environment, status))
        if child is None:
            child = self.reads.labels(environment, str(status))
            self._read_children[(environment, status)] = child
        child.inc()

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Time one HTTP request (``route`` is the route's template, never the raw path)."""
        key = (method, route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self.http_requests.labels(method, route, str(status))
            self._http_children[key] = child
        child.observe(seconds)

    def makini_call(self, environment: str, operation: str, outcome: str, seconds: float) -> None:
        """A Makini client's call hook (:attr:`rotator.makini.MakiniClient.on_call`)."""
        self.makini_requests.labels(environment, operation, outcome).observe(seconds)

    def revoked_version(self, environment: str, _credential: str, _version_id: str) -> None:
        """An engine ``revoked`` listener."""
        self.revoked.labels(environment).inc()

    def rotation(self, result: RotationResult) -> None:
        """An engine result listener: count the outcome and time the drive."""
        self.rotations.labels(result.environment, result.credential, result.outcome).inc()
        self.rotation_duration.labels(result.environment).observe(result.duration_s)

    def run_due_done(
        self, environments: Iterable[str], results: Iterable[RotationResult], now: float
    ) -> None:
        """A run over what is due ended: each environment none of whose ``results`` failed
        succeeded at ``now``."""
        failed = {r.environment for r in results if not r.ok}
        for env in environments:
            if env not in failed:
                self.run_due_last_success.labels(env).set(now)

    def pruned(self, counts: Mapping[str, int]) -> None:
        """A retention batch committed: count the rows it deleted, per table."""
        for table, rows in counts.items():
            if rows:
                self.journal_pruned.labels(table).inc(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
