"""``rotator run-due``'s metrics, pushed to a Prometheus Pushgateway (``[metrics.pushgateway]``).

A one-shot run has nobody to scrape it, so it pushes what ``serve`` would expose: the journal's
gauges per credential (token expiry, last successful rotation, failing, attention, backend
agreement, readers on old versions, the webhook queue), the run's outcome counters and Makini
calls, build info, and ``rotator_run_due_last_run_timestamp_seconds`` (every run) and
``rotator_run_due_last_success_timestamp_seconds`` (per environment: a run in which nothing of
it failed).

One group per environment the run covers: ``job`` (``metrics.pushgateway.job``),
``environment`` and the configured ``grouping`` labels; each group holds that environment's
series and the ones without an environment. Pushed with ``pushadd`` (HTTP POST): a failed run
replaces what it pushes and leaves the last success's timestamp in place. A run that fails
before its results (the journal or a backend unreachable, a missing secret) still pushes its
build info and last run time when the process exits. A push that fails is a warning: it never
fails the run.

What a forked worker (``scheduler.processes``) sends to Makini is counted in that worker and
not pushed; its results are.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar
from urllib.error import HTTPError
from urllib.parse import urlsplit, urlunsplit

import structlog
from prometheus_client import Gauge, pushadd_to_gateway
from prometheus_client.metrics_core import Metric as MetricFamily
from prometheus_client.registry import Collector

import backends
from rotator.journal import Journal
from rotator.metrics import JournalGauges, Metrics
from rotator.observe import Observer
from rotator.scrub import mask

if TYPE_CHECKING:
    from backends.base import Backend
    from rotator.rotation.runtime import Runtime
    from rotator.rotation.work import RotationResult
    from rotator.settings import Config, PushgatewaySettings

log = structlog.get_logger("rotator.pushing")
T = TypeVar("T")


class RunDuePush:
    """One ``run-due``'s metrics. :meth:`start` it once the configuration is loaded, give it
    the runtime (:meth:`watching`) and the results (:meth:`finished`, which pushes); a
    process that exits before :meth:`finished` pushes what it has on its way out."""

    def __init__(self, config: Config, environments: Sequence[str] | None = None) -> None:
        self.config = config
        self.environments = list(environments or config.environments)
        self.metrics = Metrics()
        self.started = time.time()
        self._pid = os.getpid()
        self._pushed = False
        self.last_run = Gauge(
            "rotator_run_due_last_run_timestamp_seconds",
            "When the last run-due ended, whatever its outcome (Unix time).",
            registry=self.metrics.registry,
        )
        self.failed = Gauge(
            "rotator_run_due_failed_credentials",
            "Credentials the last run-due failed to rotate, retire or resume.",
            registry=self.metrics.registry,
        )
        self.duration = Gauge(
            "rotator_run_due_duration_seconds",
            "Wall time of the last run-due.",
            registry=self.metrics.registry,
        )

    @classmethod
    def start(cls, config: Config, environments: Sequence[str] | None = None) -> RunDuePush:
        """A run's metrics; without ``metrics.pushgateway`` they are kept and never pushed."""
        push = cls(config, environments)
        if config.metrics.pushgateway is not None:
            atexit.register(push.on_exit)
        return push

    def watching(
        self, work: Callable[[Runtime], Awaitable[T]]
    ) -> Callable[[Runtime], Awaitable[T]]:
        """``work``, with the runtime's Makini calls and revokes counted."""

        @functools.wraps(work)
        async def watched(runtime: Runtime) -> T:
            for rt in runtime.environments.values():
                if rt.makini_client is not None:
                    rt.makini_client.on_call = self.metrics.makini_call
            runtime.engine.events.revoked.subscribe(self.metrics.revoked_version)
            try:
                return await work(runtime)
            finally:
                runtime.engine.events.revoked.unsubscribe(self.metrics.revoked_version)

        return watched

    def finished(self, results: Sequence[RotationResult]) -> None:
        """Count the run's results and push, with the journal's gauges."""
        for result in results:
            self.metrics.rotation(result)
        self.failed.set(sum(1 for r in results if not r.ok))
        self._push(results, with_journal=True)

    # --- plumbing --------------------------------------------------------------------------

    def on_exit(self) -> None:
        """Push, at the process's exit, a run that never reached :meth:`finished` (as failed;
        without the journal: no thread may start this late). Not in forked workers, which
        inherit the handler."""
        if os.getpid() == self._pid and not self._pushed:
            self._push(None, with_journal=False)

    def _push(self, results: Sequence[RotationResult] | None, *, with_journal: bool) -> None:
        """Push every environment's group; ``results`` None: the run never got to any."""
        self._pushed = True
        gateway = self.config.metrics.pushgateway
        if gateway is None:
            return
        now = time.time()
        self.last_run.set(now)
        self.duration.set(now - self.started)
        if results is not None:
            # an environment that failed gets no sample: its group keeps the last success's
            self.metrics.run_due_done(self.environments, results, now)
        families = [
            f
            for f in self.metrics.registry.collect()
            # a run that got to no results has no count of failed credentials to give
            if results is not None or f.name != "rotator_run_due_failed_credentials"
        ]
        if with_journal:
            families += self._journal_families()
        for env in self.environments:
            _push_group(gateway, env, families)

    def _journal_families(self) -> list[MetricFamily]:
        """The journal's gauges (what serve exposes at every scrape), read once now."""
        journal: Journal | None = None
        built: dict[str, list[Backend]] = {}
        try:
            journal = Journal.open(self.config.journal)
            for env in self.environments:
                settings = self.config.environments[env]
                built[env] = [backends.build(b, env) for b in settings.backend_settings]
            probes = Observer(self.config, journal, built).probes()
            gauges = JournalGauges(self.config, journal, lambda: probes).collect()
            # ages relative to now would freeze at the push: timestamps say the same, truly
            return [f for f in gauges if f.name not in _RELATIVE]
        except Exception as exc:  # noqa: BLE001 - the run's own figures still go out
            log.warning(
                "metrics.journal_unavailable",
                error=type(exc).__name__,
                detail="pushing the run's figures without the journal's gauges",
            )
            return []
        finally:
            for items in built.values():
                for backend in items:
                    backend.close()
            if journal is not None:
                journal.close()


_RELATIVE = frozenset({"rotator_token_age_seconds", "rotator_token_expires_in_seconds"})


class _Group(Collector):
    """The families as one environment's group: its own series and those without an
    environment label. A family with no sample is left out, so that ``pushadd`` keeps its
    earlier values (an environment whose run failed keeps its last success's time)."""

    def __init__(self, env: str, families: list[MetricFamily]) -> None:
        self.env = env
        self.families = families

    def collect(self) -> Iterator[MetricFamily]:
        for family in self.families:
            kept = [s for s in family.samples if s.labels.get("environment", self.env) == self.env]
            if not kept:  # nothing this run: the group keeps what an earlier run pushed
                continue
            copy = MetricFamily(family.name, family.documentation, family.type, family.unit)
            copy.samples = kept
            yield copy


def _push_group(gateway: PushgatewaySettings, env: str, families: list[MetricFamily]) -> None:
    grouping = {**gateway.grouping, "environment": env}
    try:
        pushadd_to_gateway(
            gateway.url,
            job=gateway.job,
            registry=_Group(env, families),
            grouping_key=grouping,
            timeout=gateway.timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 - a push never fails the run
        log.warning(
            "metrics.push_failed",
            pushgateway=_shown(gateway.url),
            environment=env,
            error=type(exc).__name__,
            detail=mask(_described(exc).replace(gateway.url, _shown(gateway.url)))[:300],
            hint="check metrics.pushgateway.url and that the Pushgateway is up; the run's "
            "outcome is unchanged",
        )
    else:
        log.info(
            "metrics.pushed", pushgateway=_shown(gateway.url), environment=env, job=gateway.job
        )


def _shown(url: str) -> str:
    """The address without any user or password in it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _described(exc: Exception) -> str:
    """The error, with the Pushgateway's own explanation where it answered one."""
    if isinstance(exc, HTTPError):
        with contextlib.suppress(Exception):
            return f"{exc}: {exc.read().decode('utf-8', 'replace').strip()}"
    return str(exc)
