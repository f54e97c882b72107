"""The ``[environments.X.notify]`` table: validated up front, every problem named by its key
path; a sink whose secret is missing at run time is a recorded, retried failure, not a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rotator.errors import ConfigError
from rotator.notify import outbox
from rotator.notify.notifier import Notifier
from rotator.notify.outbox import Change
from rotator.settings import parse_config
from tests.factories import Runtimes, environment, make_config


def config(tmp_path: Path, notify: dict[str, Any]) -> dict[str, Any]:
    return {
        "journal": {"url": f"sqlite:///{tmp_path / 'j.db'}"},
        "environments": {
            "prod": {
                "sealing_key": {"env": "SEAL"},
                "makini": {"client_id": "c", "client_secret_env": "S"},
                "backends": [{"type": "file", "path": "files", "key": {"env": "K"}}],
                "notify": notify,
            }
        },
    }


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (
            {"sinks": [{"type": "webhook", "name": "a", "url": "http://x", "secret_env": "S"}]},
            "environments.prod.notify.sinks[0].webhook: url must be an https:// URL",
        ),
        (
            {"sinks": [{"type": "webhook", "name": "a", "url": "https://x"}]},
            "set exactly one of 'secret_env' or 'secret_file'",
        ),
        (
            {"sinks": [{"type": "slack", "name": "a", "url_env": "U"}] * 2},
            "sink name 'a' appears twice",
        ),
        ({"sinks": [{"type": "pager", "name": "a"}]}, "environments.prod.notify.sinks[0]"),
        ({"near_expiry": "soon"}, "environments.prod.notify.near_expiry: 'soon' is not a duration"),
        ({"near_expiry": 1e300}, "environments.prod.notify.near_expiry: '1e+300' is far too long"),
        (
            {"sinks": [{"type": "alertmanager", "name": "am", "url": "am:9093"}]},
            "url must be an http(s) URL",
        ),
    ],
)
def test_problems_are_named_by_key_path(
    tmp_path: Path, notify: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(tmp_path, notify), source=tmp_path / "rotator.toml")
    assert expected in caught.value.message


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    sink = {
        "type": "webhook",
        "name": "a",
        "url": "https://x",
        "secret_file": "hook.secret",
        "ca_file": "ca.pem",
    }
    parsed = parse_config(config(tmp_path, {"sinks": [sink]}), source=tmp_path / "rotator.toml")
    [built] = parsed.environments["prod"].notify.sinks
    assert built.ca_file == tmp_path / "ca.pem"
    assert getattr(built, "secret_file", None) == tmp_path / "hook.secret"


async def test_a_missing_secret_is_a_recorded_failure_that_names_the_variable(
    runtimes: Runtimes, tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_UNSET_SECRET", raising=False)
    table = environment(
        sim.url, "test-prod", [{"name": "a", "connection_id": "c-a"}], sealing_env="SEAL_prod"
    )
    table["notify"] = {
        "sinks": [
            {
                "type": "webhook",
                "name": "hook",
                "url": "https://127.0.0.1:9",
                "secret_env": "NOTIFY_UNSET_SECRET",
            }
        ]
    }
    runtime = runtimes.open(
        make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", {"prod": table})
    )
    notifier = Notifier(runtime)
    try:
        notifier.record(Change("prod", "a", "attention", True, "a person, please"))
        assert await notifier.deliver() == 1
    finally:
        await notifier.aclose()
    [row] = outbox.rows(runtime.journal)
    assert row.status == "pending" and row.attempts == 1
    assert row.last_error is not None and "NOTIFY_UNSET_SECRET is not set" in row.last_error


async def test_an_unreadable_ca_bundle_is_a_recorded_failure_that_names_the_key(
    runtimes: Runtimes, tmp_path: Path, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_CA_TEST_SECRET", "s3cret-for-the-test")
    table = environment(
        sim.url, "test-prod", [{"name": "a", "connection_id": "c-a"}], sealing_env="SEAL_prod"
    )
    table["notify"] = {
        "sinks": [
            {
                "type": "webhook",
                "name": "hook",
                "url": "https://127.0.0.1:9",
                "secret_env": "NOTIFY_CA_TEST_SECRET",
                "ca_file": "missing-ca.pem",
            }
        ]
    }
    runtime = runtimes.open(
        make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", {"prod": table})
    )
    notifier = Notifier(runtime)
    try:
        notifier.record(Change("prod", "a", "attention", True, "a person, please"))
        assert await notifier.deliver() == 1
    finally:
        await notifier.aclose()
    [row] = outbox.rows(runtime.journal)
    assert row.status == "pending" and row.last_error is not None
    assert "cannot load the CA bundle" in row.last_error
    assert str(tmp_path / "missing-ca.pem") in row.last_error
