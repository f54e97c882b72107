"""Prometheus metrics of one ``rotator serve`` process (``GET /metrics``).

Labels are environments, credentials, backends, outcomes and statuses: never a token, a key or
a fingerprint. Token age and time to expiry are read from the journal at scrape time, so every
replica reports the same figures whichever of them rotated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rotator.model import utcnow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from rotator.journal import Journal
    from rotator.rotation.work import RotationResult
    from rotator.settings import Config

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _TokenTimes(Collector):
    """Token age and time to expiry per credential, from the journal's credential state."""

    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "rotator_token_age_seconds",
            "Seconds since the current token was promoted.",
            labels=["environment", "credential"],
        )
        left = GaugeMetricFamily(
            "rotator_token_expires_in_seconds",
            "Seconds until the current token expires at Makini.",
            labels=["environment", "credential"],
        )
        attention = GaugeMetricFamily(
            "rotator_credential_attention",
            "1 where a credential needs a person (see rotator status).",
            labels=["environment", "credential"],
        )
        now = utcnow()
        states = self.journal.states()
        for env, settings in self.config.environments.items():
            for cred in settings.credentials:
                state = states.get((env, cred.name))
                labels = [env, cred.name]
                if state is not None and state.rotated_at is not None:
                    age.add_metric(labels, (now - state.rotated_at).total_seconds())
                if state is not None and state.expires_at is not None:
                    left.add_metric(labels, (state.expires_at - now).total_seconds())
                attention.add_metric(labels, 1.0 if state is not None and state.attention else 0.0)
        yield age
        yield left
        yield attention


class Metrics:
    """Every metric of the process, on a registry of its own (two apps in one test process
    never collide)."""

    def __init__(self, config: Config | None = None, journal: Journal | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self._read_children: dict[tuple[str, int], Counter] = {}
        if config is not None and journal is not None:
            self.registry.register(_TokenTimes(config, journal))

    def read(self, environment: str, status: int) -> None:
        """Count a read (the hot path: the labelled child is looked up once)."""
        child = self._read_children.get((environment, status))
        if child is None:
            child = self.reads.labels(environment, str(status))
            self._read_children[(environment, status)] = child
        child.inc()

    def rotation(self, result: RotationResult) -> None:
        """An engine result listener: count the outcome and time the drive."""
        self.rotations.labels(result.environment, result.credential, result.outcome).inc()
        self.rotation_duration.labels(result.environment).observe(result.duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
