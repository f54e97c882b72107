"""What is due follows from the configuration and the journal alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotator.journal import Journal, Rotation, Step
from rotator.rotation.schedule import RESUME, RETIRE, ROTATE, WAIT, plan
from tests.factories import environment, make_config

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)  # a Friday


def _config(tmp_path: Path, url: str, schedule: dict, cred_schedule: dict | None = None):  # type: ignore[no-untyped-def]
    cred = {"name": "a", "connection_id": "c-a"}
    if cred_schedule:
        cred["schedule"] = cred_schedule
    env = environment(
        "http://127.0.0.1:1", "sched", [cred], sealing_env="SCHED_SEAL", schedule=schedule
    )
    return make_config(tmp_path, url, {"prod": env})


def _item(tmp_path: Path, schedule: dict, **state: object):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'j.db'}"
    config = _config(tmp_path, url, schedule)
    journal = Journal(url)
    if state:
        journal.set_state("prod", "a", current_version_id="v1", **state)
    [item] = plan(config, journal, NOW)
    journal.close()
    return item


def test_never_rotated_is_due_now(tmp_path: Path) -> None:
    item = _item(tmp_path, {"interval": "1d"})
    assert item.action == ROTATE and item.urgent


def test_interval_elapsed_or_not(tmp_path: Path) -> None:
    assert _item(tmp_path, {"interval": "1d"}, rotated_at=NOW - timedelta(days=2)).action == ROTATE
    item = _item(tmp_path, {"interval": "1d"}, rotated_at=NOW - timedelta(hours=1))
    assert item.action == WAIT and item.due_at == NOW + timedelta(hours=23)


def test_jitter_is_stable_and_bounded(tmp_path: Path) -> None:
    sched = {"interval": "1d", "jitter": "1h"}
    a = _item(tmp_path, sched, rotated_at=NOW - timedelta(hours=1))
    b = _item(tmp_path, sched, rotated_at=NOW - timedelta(hours=1))
    assert a.due_at == b.due_at
    assert a.due_at is not None
    assert NOW + timedelta(hours=23) <= a.due_at < NOW + timedelta(hours=24)


def test_expiry_overrides_schedule_and_window(tmp_path: Path) -> None:
    sched = {
        "interval": "30d",
        "window": {"start": "02:00", "end": "03:00"},
        "rotate_before_expiry": "7d",
    }
    item = _item(
        tmp_path, sched, rotated_at=NOW - timedelta(hours=1), expires_at=NOW + timedelta(days=3)
    )
    assert item.action == ROTATE and item.urgent and "expires in 3d" in item.reason


def test_window_defers_to_next_opening(tmp_path: Path) -> None:
    sched = {"interval": "1d", "window": {"start": "02:00", "end": "03:00"}}
    item = _item(tmp_path, sched, rotated_at=NOW - timedelta(days=2))
    assert item.action == WAIT
    assert item.due_at == datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def test_window_days(tmp_path: Path) -> None:
    sched = {"interval": "1d", "window": {"start": "00:00", "end": "23:59", "days": ["mon"]}}
    item = _item(tmp_path, sched, rotated_at=NOW - timedelta(days=2))
    assert item.action == WAIT and item.due_at is not None and item.due_at.weekday() == 0


def test_cron(tmp_path: Path) -> None:
    item = _item(tmp_path, {"cron": "0 3 * * *"}, rotated_at=NOW - timedelta(hours=1))
    assert item.due_at == datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    overdue = _item(tmp_path, {"cron": "0 3 * * *"}, rotated_at=NOW - timedelta(days=1, hours=10))
    assert overdue.action == ROTATE


def test_failure_backs_off(tmp_path: Path) -> None:
    item = _item(
        tmp_path,
        {"interval": "1d"},
        rotated_at=NOW - timedelta(days=2),
        last_outcome="error",
        last_attempt_at=NOW - timedelta(minutes=1),
    )
    assert item.action == WAIT and item.due_at == NOW + timedelta(minutes=9)


@pytest.mark.parametrize(("step", "action"), [(Step.STAGED, RESUME), (Step.PROMOTED, RETIRE)])
def test_open_rotations_resume_and_retire(tmp_path: Path, step: str, action: str) -> None:
    url = f"sqlite:///{tmp_path / 'j.db'}"
    config = _config(tmp_path, url, {"interval": "1d"})
    journal = Journal(url)
    journal.set_state("prod", "a", current_version_id="v1", rotated_at=NOW)
    journal.add_rotation(
        Rotation(
            id=str(uuid.uuid4()),
            environment="prod",
            credential="a",
            kind="rotate",
            step=step,
            version_id="v2",
            started_at=NOW,
            updated_at=NOW,
            attempts=1,
            notes="[]",
            retire_after=NOW - timedelta(seconds=1),
        )
    )
    [item] = plan(config, journal, NOW)
    assert item.action == action
    journal.close()
