"""The per-credential gauges of a scrape (``Metrics.render``): the text kept across scrapes is
the text ``generate_latest`` gives for the journal's state read whole (same series, values and
label sets), and it is fresh: whatever another process writes to the journal (a promotion, a
failure, attention) is in the next scrape. SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString

from backends import build
from rotator.journal import Journal
from rotator.metrics import JournalGauges, Metrics, Probes, go_float
from rotator.model import utcnow
from rotator.observe import Observer
from rotator.settings import Config
from tests.factories import credentials, environment, make_config

RELATIVE = ("rotator_token_age_seconds", "rotator_token_expires_in_seconds")
NAMES = ("a", "b", "c", "d", "e", "f")


def _config(tmp_path: Path, url: str) -> Config:
    envs = {
        "prod": environment("http://127.0.0.1:9", "m-prod", credentials(*NAMES), sealing_env="S1"),
        "dev": environment("http://127.0.0.1:9", "m-dev", credentials("a", "z"), sealing_env="S2"),
    }
    return make_config(tmp_path, url, envs)


def _fill(journal: Journal) -> None:
    now = utcnow()
    journal.set_state(
        "prod",
        "a",
        current_version_id="v-a1",
        rotated_at=now - timedelta(days=40, microseconds=7),
        expires_at=now - timedelta(hours=1),  # expired: time left below zero
    )
    journal.set_state(
        "prod", "b", current_version_id="v-b1", rotated_at=now, expires_at=now + timedelta(days=9)
    )
    journal.set_state("prod", "c", attention="look at me", last_error="boom")
    journal.set_state("prod", "d", current_version_id="v-d1", rotated_at=now, last_error="x")
    journal.set_state("dev", "z", current_version_id="v-z1", expires_at=now + timedelta(days=1))
    # e, f and dev/a have no row: no age, zeros elsewhere


def _lines(text: str) -> dict[str, list[tuple[str, float]]]:
    """family -> [(labels, value)], in order; HELP/TYPE lines under their own keys."""
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            out.setdefault(line, [])
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        out.setdefault(name, []).append((labels, float(value)))
    return out


def _journal_part(text: str) -> str:
    return text[text.index("# HELP rotator_token_age_seconds") :]


def _reference(config: Config, journal: Journal, probes: Probes) -> str:
    """The journal's gauges as before scrapes kept anything: every state read whole, through
    the registry and ``generate_latest``."""
    whole = Probes(probes.webhook_depth, probes.stale_readers, probes.backends_agree)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JournalGauges(config, journal, lambda: whole))
    return generate_latest(registry).decode()


def _same(kept: str, reference: str) -> None:
    """Equal text, but for the samples relative to now (the two were taken moments apart):
    those have the same series, in order, and values within a minute."""
    assert "\n".join(
        line for line in kept.splitlines() if not line.startswith(RELATIVE)
    ) == "\n".join(line for line in reference.splitlines() if not line.startswith(RELATIVE))
    ours, theirs = _lines(kept), _lines(reference)
    for name in RELATIVE:
        assert [labels for labels, _ in ours[name]] == [labels for labels, _ in theirs[name]]
        for (_, mine), (_, other) in zip(ours[name], theirs[name], strict=True):
            assert abs(mine - other) < 60


def test_scrape_text_is_the_registry_text_and_fresh(tmp_path: Path, journal_url: str) -> None:
    config = _config(tmp_path, journal_url)
    journal = Journal.open(config.journal)
    other = Journal.open(config.journal)  # another process's connections
    built = {
        env: [build(b, env) for b in settings.backend_settings]
        for env, settings in config.environments.items()
    }
    try:
        _fill(journal)
        observer = Observer(config, journal, built)
        metrics = Metrics(config, journal, observer.probes())
        first = metrics.render().decode()
        assert "rotator_build_info" in first  # the registry's families come first
        _same(_journal_part(first), _reference(config, journal, observer.probes()))
        parsed = _lines(first)
        labels_a = 'credential="a",environment="prod"}'
        assert (labels_a, 0.0) in parsed["rotator_credential_failing"]
        assert ('credential="d",environment="prod"}', 1.0) in parsed["rotator_credential_failing"]
        assert ('credential="c",environment="prod"}', 1.0) in parsed["rotator_credential_attention"]
        assert ('credential="c",environment="prod"}', 1.0) in parsed["rotator_credential_failing"]
        assert ('credential="e",environment="prod"}', 0.0) in parsed["rotator_credential_failing"]
        ages = dict(parsed["rotator_token_age_seconds"])
        assert set(ages) == {
            labels_a,
            'credential="b",environment="prod"}',
            'credential="d",environment="prod"}',
        }
        assert ages[labels_a] > 40 * 86400
        assert dict(parsed["rotator_token_expires_in_seconds"])[labels_a] < 0

        # nothing changed: the same figures' number, the same text but for ages
        assert observer.credentials().generation == observer.credentials().generation
        _same(_journal_part(metrics.render().decode()), _journal_part(first))

        # another process promotes one, fails another, clears attention on a third
        before = observer.credentials().generation
        promoted = utcnow().replace(microsecond=123456)
        other.set_state("prod", "b", current_version_id="v-b2", rotated_at=promoted)
        other.set_state("prod", "d", last_error=None)
        other.set_state("prod", "c", attention=None)
        other.set_state("dev", "a", current_version_id="v-da1", rotated_at=promoted)
        after = metrics.render().decode()
        assert observer.credentials().generation > before
        parsed = _lines(after)
        rotated = dict(parsed["rotator_last_rotation_success_timestamp_seconds"])
        assert rotated['credential="b",environment="prod"}'] == promoted.timestamp()
        assert rotated['credential="a",environment="dev"}'] == promoted.timestamp()
        assert ('credential="d",environment="prod"}', 0.0) in parsed["rotator_credential_failing"]
        assert ('credential="c",environment="prod"}', 0.0) in parsed["rotator_credential_attention"]
        _same(_journal_part(after), _reference(config, journal, observer.probes()))
    finally:
        for items in built.values():
            for backend in items:
                backend.close()
        other.close()
        journal.close()


def test_sample_values_are_written_as_prometheus_client_writes_them() -> None:
    rng = random.Random(18)
    values = [0.0, 1.0, -1.0, 1e6, 999999.999999, 1765075459.123456, -3600.5, 259200.0]
    values += [rng.randrange(-(10**15), 10**16) / 1_000_000 for _ in range(20_000)]
    values += [rng.randrange(0, 10**9) / 1_000_000 for _ in range(5_000)]
    for value in values:
        assert go_float(value) == floatToGoString(value), value  # type: ignore[no-untyped-call]
