"""Configuration: valid files load; every mistake is named by its key path."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from rotator.configfile import ProcessSettings
from rotator.durations import parse_duration
from rotator.errors import ConfigError, NotFound
from rotator.settings import load_config

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[environments.prod]
sealing_key = { env = "PROD_SEAL" }
[environments.prod.makini]
client_id = "p"
client_secret_env = "P_SECRET"
[[environments.prod.backends]]
type = "file"
path = "prod-files"
key = { file = "prod.key", generate = true }
[[environments.prod.credentials]]
name = "acme-sap"
connection_id = "c-1"

[environments.dev]
sealing_key = { env = "DEV_SEAL" }
[environments.dev.makini]
client_id = "d"
client_secret_env = "D_SECRET"
[[environments.dev.backends]]
type = "file"
path = "dev-files"
key = { file = "dev.key", generate = true }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.describe()


@pytest.mark.parametrize("name", ["local.toml", "example.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(REPO / "config" / name)
    assert {"prod", "dev"} <= set(config.environments)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    backend = config.environments["prod"].backend_settings[0]
    assert backend.path == tmp_path / "prod-files"  # type: ignore[attr-defined]
    assert backend.key.file == tmp_path / "prod.key"  # type: ignore[attr-defined]


def test_credential_schedule_overrides_environment(tmp_path: Path) -> None:
    text = GOOD.replace(
        'connection_id = "c-1"', 'connection_id = "c-1"\nschedule = { cron = "0 3 * * *" }'
    )
    text = text.replace(
        "[[environments.prod.backends]]",
        '[environments.prod.schedule]\ninterval = "7d"\njitter = "5m"\n'
        "[[environments.prod.backends]]",
    )
    config = load_config(write(tmp_path, text))
    env = config.environments["prod"]
    merged = env.schedule_for(env.credentials[0])
    assert merged.cron == "0 3 * * *" and merged.interval is None
    assert merged.jitter == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ('connection_id = "c-1"', "connection_id = 5"),
            "environments.prod.credentials[0].connection_id",
        ),
        (('name = "acme-sap"', 'name = "Acme SAP"'), "environments.prod.credentials[0].name"),
        (
            ('client_id = "p"', 'client_id = "p"\nbase_url = "ftp://x"'),
            "environments.prod.makini.base_url: must be an http(s) URL",
        ),
        (
            ('type = "file"\npath = "prod-files"', 'type = "s3"\npath = "prod-files"'),
            "environments.prod.backends[0]: unknown backend type",
        ),
        (
            ('client_secret_env = "P_SECRET"', ""),
            "environments.prod.makini: set exactly one of 'client_secret_env'",
        ),
        (
            ('connection_id = "c-1"', 'connection_id = "c-1"\ncolour = "red"'),
            "environments.prod.credentials[0].colour: unknown key",
        ),
        (
            ('connection_id = "c-1"', 'connection_id = "c-1"\nschedule = { interval = "often" }'),
            "'often' is not a duration",
        ),
        (
            ('connection_id = "c-1"', 'connection_id = "c-1"\nschedule = { cron = "61 * * * *" }'),
            "schedule.cron: not a crontab expression",
        ),
        (
            ('connection_id = "c-1"', 'connection_id = "c-1"\nmethod = "magic"'),
            "environments.prod.credentials[0].method",
        ),
        (('path = "dev-files"', 'path = "prod-files"'), "share the backend location"),
        (
            ('sealing_key = { env = "DEV_SEAL" }', 'sealing_key = { env = "PROD_SEAL" }'),
            "share the sealing key",
        ),
        (("[environments.dev]", "[environments.Dev]"), "environments.Dev"),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    text = GOOD.replace(*edit)
    assert text != GOOD
    assert expected in problems(tmp_path, text)


def test_duplicate_credentials_refused(tmp_path: Path) -> None:
    text = GOOD + '[[environments.prod.credentials]]\nname = "acme-sap"\nconnection_id = "c-2"\n'
    assert "appears twice" in problems(tmp_path, text)


def test_not_toml_names_line(tmp_path: Path) -> None:
    message = problems(tmp_path, GOOD + "\n[[[broken\n")
    assert "not valid TOML" in message and "line" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_environment_and_credential(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(NotFound) as env_info:
        config.environment("staging")
    assert "known environments: prod, dev" in env_info.value.describe()
    with pytest.raises(NotFound) as cred_info:
        config.environment("prod").credential("nope", "prod")
    assert "known credentials: acme-sap" in cred_info.value.describe()


def test_missing_secret_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P_SECRET", raising=False)
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError) as info:
        config.environments["prod"].makini.client_secret("environments.prod.makini")
    assert "P_SECRET" in info.value.describe() and "export" in info.value.describe()


def test_journal_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROTATOR_JOURNAL_URL", "postgresql+psycopg://u@h/db")
    assert load_config(write(tmp_path, GOOD)).journal.url == "postgresql+psycopg://u@h/db"


def test_process_settings_read_rotator_variables_only(tmp_path: Path) -> None:
    process = ProcessSettings.from_environ(
        {
            "ROTATOR_CONFIG": str(tmp_path / "r.toml"),
            "rotator_log_level": "DEBUG",  # any case, as before
            "ROTATOR_SOMETHING_ELSE": "ignored",
            "LOG_FORMAT": "json",  # not ours
        }
    )
    assert process.config == tmp_path / "r.toml"
    assert process.log_level == "DEBUG"
    assert process.log_format is None and process.journal_url is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25), ("2w", 14 * 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def test_config_file_is_not_needed_for_secrets() -> None:
    text = (REPO / "config" / "example.toml").read_text()
    assert "secret =" not in text.replace("client_secret_env", "")
    assert not any(v and v in text for k, v in os.environ.items() if "SECRET" in k and len(v) > 8)


def _set(text: str, table: str, line: str) -> str:
    """``line`` added to ``table`` of ``text`` (the table is opened at the end if absent)."""
    header = f"[{table}]\n"
    if header in text:
        return text.replace(header, header + line + "\n", 1)
    return text + "\n" + header + line + "\n"


@pytest.mark.parametrize(
    ("table", "line", "expected"),
    [
        # too large for a timedelta: a configuration error, never an OverflowError
        ("scheduler", 'tick = "99999999999999999999999d"', "scheduler.tick: '9999"),
        ("scheduler", "tick = 1e300", "scheduler.tick: '1e+300' is far too long"),
        ("scheduler", 'tick = "P99999999999D"', "scheduler.tick: "),
        ("journal", 'lock_ttl = "999999999999w"', "journal.lock_ttl: '999999999999w' is far too"),
        ("scheduler", "tick = nan", "scheduler.tick: 'nan' is not a duration"),
        # what must be positive says so, and the bounds that make sense are named
        ("scheduler", 'tick = "0s"', "scheduler.tick: must be positive, not 0s"),
        ("scheduler", "tick = -5", "scheduler.tick: must be positive, not -5s"),
        ("scheduler", 'tick = "250ms"', "scheduler.tick: must be at least 1s, not 250ms"),
        ("scheduler", 'tick = "2d"', "scheduler.tick: must be at most 1d, not 2d"),
        ("scheduler", "retry_after_failure = -1", "scheduler.retry_after_failure: must not be"),
        ("journal", 'lock_ttl = "0s"', "journal.lock_ttl: must be positive"),
        ("api", "replica_poll = 0", "api.replica_poll: must be positive"),
        ("api", 'long_poll_max = "2h"', "api.long_poll_max: must be at most 1h"),
        ("api.readers", 'flush_interval = "0s"', "api.readers.flush_interval: must be positive"),
        ("environments.prod.schedule", "grace_period = -1",
         "environments.prod.schedule.grace_period: must not be negative"),
        ("environments.prod.schedule", 'interval = "0s"',
         "environments.prod.schedule.interval: must be positive"),
        ("environments.prod.makini", "default_token_lifetime = -86400",
         "environments.prod.makini.default_token_lifetime: must be positive, not -1d"),
    ],
)
def test_duration_keys_say_what_is_wrong(
    tmp_path: Path, table: str, line: str, expected: str
) -> None:
    message = problems(tmp_path, _set(GOOD, table, line))
    assert expected in message, message
    assert "timedelta" not in message.lower()  # said in the file's terms, not pydantic's


def test_a_credential_override_interval_is_checked_where_it_is_written(tmp_path: Path) -> None:
    # before: accepted at load time, then a ValidationError (a traceback) when merged at run time
    text = GOOD.replace(
        'connection_id = "c-1"', 'connection_id = "c-1"\nschedule = { interval = "0s" }'
    )
    message = problems(tmp_path, text)
    assert "environments.prod.credentials[0].schedule.interval: must be positive" in message


def test_durations_at_their_bounds_load(tmp_path: Path) -> None:
    text = _set(GOOD, "scheduler", 'tick = "1d"\nretry_after_failure = "0s"')
    text = _set(text, "journal", 'lock_ttl = "1s"')
    config = load_config(write(tmp_path, text))
    assert config.scheduler.tick == timedelta(days=1)
    assert config.scheduler.retry_after_failure == timedelta(0)
    assert config.journal.lock_ttl == timedelta(seconds=1)
