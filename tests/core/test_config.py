"""Configuration: valid files load; every mistake is named by its key path."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from rotator.errors import ConfigError, NotFound
from rotator.settings import load_config, parse_duration

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
            "environments.prod.makini.client_secret_env: required key is missing",
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
