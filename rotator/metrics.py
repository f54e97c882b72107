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

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


@dataclass(frozen=True, slots=True)
class CredentialFigures:
    """What the per-credential gauges show of one credential's journal state (never a token):
    times as integer microseconds since the epoch, so that ages and timestamps come out exactly
    as ``timedelta.total_seconds()`` and ``datetime.timestamp()`` give them."""

    version: str | None
    rotated_us: int | None
    expires_us: int | None
    attention: bool
    failing: bool


@dataclass(frozen=True)
class Snapshot:
    """Every credential's figures as read now, and a number that changes whenever any of them
    changed since the previous snapshot of the same reader (rendered text is kept per number)."""

    generation: int
    figures: Mapping[CredentialKey, CredentialFigures]


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def epoch_us(at: datetime | None) -> int | None:
    return None if at is None else (at - EPOCH) // _US


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
    credentials: Callable[[], Snapshot] | None = None
    """every credential's figures (plain rows, only changed rows re-read); without it the
    journal's states are read whole at each collection"""


def go_float(value: float) -> str:
    """``prometheus_client.utils.floatToGoString`` for a finite value (what a journal time
    gives), without its checks for infinities: the text of one sample's value."""
    s = repr(value)
    dot = s.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _head(name: str, doc: str) -> str:
    """A gauge family's HELP and TYPE lines, as ``generate_latest`` writes them."""
    escaped = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {escaped}\n# TYPE {name} gauge\n"


_CRED = ["environment", "credential"]
_DOCS = {
    "rotator_token_age_seconds": "Seconds since the current token was promoted.",
    "rotator_token_expires_in_seconds": "Seconds until the current token expires at Makini.",
    "rotator_token_expiry_timestamp_seconds": (
        "When the current token expires at Makini (Unix time)."
    ),
    "rotator_last_rotation_success_timestamp_seconds": (
        "When the current token was promoted: the last successful rotation (Unix time)."
    ),
    "rotator_token_expiry_warning_seconds": (
        "metrics.expiry_warning: alert when a token expires sooner than this."
    ),
    "rotator_credential_attention": "1 where a credential needs a person (see rotator status).",
    "rotator_credential_failing": (
        "1 where the last attempt on a credential failed (rotation, retire or revoke)."
    ),
    "rotator_webhook_queue_depth": "Makini webhooks received and not yet processed.",
    "rotator_readers_on_old_version": (
        "Readers active within api.readers.active_window whose latest read is not the "
        "current version."
    ),
    "rotator_backends_agree": (
        "1 where every backend of the environment holds the journal's current version."
    ),
}


class JournalGauges(Collector):
    """Per credential, from the journal's credential state and the probes.

    :meth:`collect` gives the families (a push); :meth:`render` gives the same families as
    exposition text, for a scrape: the text of what did not change since the last scrape is
    kept (a new :class:`Snapshot` number, or a probe's different answer, rebuilds it), and only
    the samples relative to now (ages, time left) are formatted at each scrape."""

    def __init__(self, config: Config, journal: Journal, probes: Callable[[], Probes]) -> None:
        self.config = config
        self.journal = journal
        self.probes = probes
        self.keys: list[CredentialKey] = [
            (env, c.name)
            for env, settings in config.environments.items()
            for c in settings.credentials
        ]
        self._labels = {
            key: f'{{credential="{_label_value(key[1])}",environment="{_label_value(key[0])}"}}'
            for key in self.keys
        }
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._static = ""
        self._aged: list[tuple[str, int]] = []
        self._lefts: list[tuple[str, int]] = []
        self._probe_text: dict[str, tuple[object, str]] = {}
        self._per_key: dict[CredentialKey, tuple[CredentialFigures | None, _Lines]] = {}
        name = "rotator_token_expiry_warning_seconds"
        window = go_float(config.metrics.expiry_warning.total_seconds())
        self._warning = _head(name, _DOCS[name]) + "".join(
            f"{name}{self._labels[key]} {window}\n" for key in self.keys
        )

    NAMES = tuple(_DOCS)
    """Every family :meth:`collect` may yield."""

    def describe(self) -> Iterator[Metric]:
        """The families' names alone: registering the collector must not read the journal (a
        registry with ``auto_describe`` calls :meth:`collect` otherwise, every credential's
        state before ``serve`` is ready)."""
        for name in self.NAMES:
            yield GaugeMetricFamily(name, name)

    def _figures(self, probes: Probes) -> Snapshot | None:
        """The figures from the probe, or (none given) from the journal's states, unnumbered."""
        if probes.credentials is not None:
            return probes.credentials()
        states = self.journal.states()
        figures = {
            key: CredentialFigures(
                version=st.current_version_id,
                rotated_us=epoch_us(st.rotated_at),
                expires_us=epoch_us(st.expires_at),
                attention=bool(st.attention),
                failing=st.last_error is not None,
            )
            for key, st in states.items()
        }
        return Snapshot(-1, figures)

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, _DOCS[name], labels=_CRED)

        age = gauge("rotator_token_age_seconds")
        left = gauge("rotator_token_expires_in_seconds")
        expiry = gauge("rotator_token_expiry_timestamp_seconds")
        rotated = gauge("rotator_last_rotation_success_timestamp_seconds")
        warning = gauge("rotator_token_expiry_warning_seconds")
        attention = gauge("rotator_credential_attention")
        failing = gauge("rotator_credential_failing")
        now_us = epoch_us(utcnow()) or 0
        probes = self.probes()
        snapshot = self._figures(probes)
        figures = snapshot.figures if snapshot is not None else {}
        window_s = self.config.metrics.expiry_warning.total_seconds()
        for key in self.keys:
            fig = figures.get(key)
            labels = list(key)
            warning.add_metric(labels, window_s)
            if fig is not None and fig.rotated_us is not None:
                age.add_metric(labels, (now_us - fig.rotated_us) / 1_000_000)
                rotated.add_metric(labels, fig.rotated_us / 1_000_000)
            if fig is not None and fig.expires_us is not None:
                left.add_metric(labels, (fig.expires_us - now_us) / 1_000_000)
                expiry.add_metric(labels, fig.expires_us / 1_000_000)
            attention.add_metric(labels, 1.0 if fig is not None and fig.attention else 0.0)
            failing.add_metric(labels, 1.0 if fig is not None and fig.failing else 0.0)
        yield from (age, left, expiry, rotated, warning, attention, failing)
        yield from self._probed(probes)

    def _probed(self, probes: Probes) -> Iterator[Metric]:
        depth = self._probe("webhook_depth", probes.webhook_depth)
        if depth is not None:
            yield self._depth_family(depth)
        stale = self._probe("stale_readers", probes.stale_readers)
        if stale is not None:
            yield self._stale_family(stale)
        agree = self._probe("backends_agree", probes.backends_agree)
        if agree is not None:
            yield self._agree_family(agree)

    def _depth_family(self, depth: Mapping[str, int]) -> GaugeMetricFamily:
        name = "rotator_webhook_queue_depth"
        family = GaugeMetricFamily(name, _DOCS[name], labels=["environment"])
        for env in self.config.environments:
            family.add_metric([env], float(depth.get(env, 0)))
        return family

    def _stale_family(self, stale: Mapping[CredentialKey, int]) -> GaugeMetricFamily:
        name = "rotator_readers_on_old_version"
        family = GaugeMetricFamily(name, _DOCS[name], labels=_CRED)
        for key in self.keys:
            family.add_metric(list(key), float(stale.get(key, 0)))
        return family

    def _agree_family(self, agree: Mapping[CredentialKey, bool]) -> GaugeMetricFamily:
        name = "rotator_backends_agree"
        family = GaugeMetricFamily(name, _DOCS[name], labels=_CRED)
        for (env, credential), ok in sorted(agree.items()):
            family.add_metric([env, credential], 1.0 if ok else 0.0)
        return family

    # --- a scrape's text ----------------------------------------------------------------------

    def render(self) -> str:
        """The text ``generate_latest`` would write for :meth:`collect`'s families, now."""
        probes = self.probes()
        snapshot = self._figures(probes)
        with self._lock:  # scrapes at once share the kept text
            if (
                snapshot is None
                or snapshot.generation < 0
                or snapshot.generation != self._generation
            ):
                self._rebuild(snapshot.figures if snapshot is not None else {})
                self._generation = (
                    None if snapshot is None or snapshot.generation < 0 else snapshot.generation
                )
            aged, lefts, static = self._aged, self._lefts, self._static
        now_us = epoch_us(utcnow()) or 0
        name = "rotator_token_age_seconds"
        out = [_head(name, _DOCS[name]), *_relative(aged, now_us, -1)]
        name = "rotator_token_expires_in_seconds"
        out += [_head(name, _DOCS[name]), *_relative(lefts, now_us, 1)]
        out.append(static)
        depth = self._probe("webhook_depth", probes.webhook_depth)
        if depth is not None:
            out.append(self._kept_text("depth", depth, self._depth_family))
        stale = self._probe("stale_readers", probes.stale_readers)
        if stale is not None:
            out.append(self._kept_text("stale", stale, self._stale_family))
        agree = self._probe("backends_agree", probes.backends_agree)
        if agree is not None:
            out.append(self._kept_text("agree", agree, self._agree_family))
        return "".join(out)

    def _rebuild(self, figures: Mapping[CredentialKey, CredentialFigures]) -> None:
        """The kept text, from ``figures``: a credential whose figures are the same object as at
        the last rebuild keeps its lines (a promotion rewrites a credential's lines, not all)."""
        expiry: list[str] = []
        rotated: list[str] = []
        attention: list[str] = []
        failing: list[str] = []
        aged: list[tuple[str, int]] = []
        lefts: list[tuple[str, int]] = []
        kept = self._per_key
        fresh: dict[CredentialKey, tuple[CredentialFigures | None, _Lines]] = {}
        for key in self.keys:
            fig = figures.get(key)
            old = kept.get(key)
            lines = old[1] if old is not None and old[0] is fig else self._lines(key, fig)
            fresh[key] = (fig, lines)
            if lines.aged is not None:
                aged.append(lines.aged)
                rotated.append(lines.rotated)
            if lines.left is not None:
                lefts.append(lines.left)
                expiry.append(lines.expiry)
            attention.append(lines.attention)
            failing.append(lines.failing)
        self._per_key = fresh
        parts = [_head(n, _DOCS[n]) for n in ("rotator_token_expiry_timestamp_seconds",)]
        parts += expiry
        name = "rotator_last_rotation_success_timestamp_seconds"
        parts += [_head(name, _DOCS[name]), *rotated, self._warning]
        name = "rotator_credential_attention"
        parts += [_head(name, _DOCS[name]), *attention]
        name = "rotator_credential_failing"
        parts += [_head(name, _DOCS[name]), *failing]
        self._static = "".join(parts)
        self._aged, self._lefts = aged, lefts

    def _lines(self, key: CredentialKey, fig: CredentialFigures | None) -> _Lines:
        lab = self._labels[key]
        lines = _Lines(
            attention=f"rotator_credential_attention{lab} {_flag(fig, 'attention')}\n",
            failing=f"rotator_credential_failing{lab} {_flag(fig, 'failing')}\n",
        )
        if fig is not None and fig.rotated_us is not None:
            lines.aged = (f"rotator_token_age_seconds{lab} ", fig.rotated_us)
            value = go_float(fig.rotated_us / 1_000_000)
            lines.rotated = f"rotator_last_rotation_success_timestamp_seconds{lab} {value}\n"
        if fig is not None and fig.expires_us is not None:
            lines.left = (f"rotator_token_expires_in_seconds{lab} ", fig.expires_us)
            value = go_float(fig.expires_us / 1_000_000)
            lines.expiry = f"rotator_token_expiry_timestamp_seconds{lab} {value}\n"
        return lines

    def _kept_text(
        self, slot: str, answer: Mapping[_K, _V], family: Callable[[Mapping[_K, _V]], Metric]
    ) -> str:
        """A probe's family as text, kept while the probe answers the same."""
        kept = self._probe_text.get(slot)
        if kept is not None and kept[0] == answer:
            return kept[1]
        text = generate_latest(_One(family(answer))).decode()
        self._probe_text[slot] = (dict(answer), text)
        return text

    @staticmethod
    def _probe(name: str, probe: Callable[[], Mapping[_K, _V]] | None) -> Mapping[_K, _V] | None:
        if probe is None:
            return None
        try:
            return probe()
        except Exception as exc:  # noqa: BLE001 - one probe down leaves the others reporting
            log.warning("metrics.probe_failed", probe=name, error=type(exc).__name__)
            return None


@dataclass(slots=True)
class _Lines:
    """One credential's kept sample lines (and the prefixes and times of its relative ones)."""

    attention: str
    failing: str
    aged: tuple[str, int] | None = None
    rotated: str = ""
    left: tuple[str, int] | None = None
    expiry: str = ""


def _flag(fig: CredentialFigures | None, field: str) -> str:
    return "1.0" if fig is not None and getattr(fig, field) else "0.0"


def _relative(rows: list[tuple[str, int]], now_us: int, sign: int) -> list[str]:
    """Samples of seconds from now (``sign`` -1: since a time; 1: until it), formatted as
    :func:`go_float` does: ``repr`` alone below 1e6, where Go's format is the same."""
    lines: list[str] = []
    append = lines.append
    for prefix, at in rows:
        value = sign * (at - now_us) / 1_000_000
        append(f"{prefix}{repr(value) if value < 1e6 else go_float(value)}\n")
    return lines


class _One(Collector):
    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


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
        self.journal_gauges: JournalGauges | None = None
        """Not on the registry: :meth:`render` writes its text itself (kept across scrapes)."""
        if config is not None and journal is not None:
            self.journal_gauges = JournalGauges(config, journal, lambda: self.probes)

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
        """One scrape: the registry's families, then the journal's gauges (the same text as
        one registry holding both would give)."""
        body = generate_latest(self.registry)
        if self.journal_gauges is not None:
            body += self.journal_gauges.render().encode()
        return body
