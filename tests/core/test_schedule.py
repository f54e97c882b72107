"""What is due follows from the configuration and the journal alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotator.journal import Journal, Rotation, Step
from rotator.rotation.schedule import RESUME, RETIRE, ROTATE, WAIT, Planner, plan
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


# Planner: serve's ticks plan again only when the plan can have changed ----------------------


def _rotation(step: str, **values: object) -> Rotation:
    return Rotation(
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
        **values,
    )


def _waiting(tmp_path: Path, url: str) -> tuple[object, Journal, Journal, Planner]:
    """A credential rotated an hour ago (due in 23 h), a planner that planned once, and a
    second journal object on the same database: another replica."""
    config = _config(tmp_path, url, {"interval": "1d", "rotate_before_expiry": "1d"})
    journal = Journal(url)
    journal.set_state("prod", "a", current_version_id="v1", rotated_at=NOW - timedelta(hours=1))
    planner = Planner()
    assert planner.due(config, journal, NOW) == []
    assert planner.planned == 1
    return config, journal, Journal(url), planner


def test_planner_skips_while_nothing_changed_and_is_on_time(
    tmp_path: Path, journal_url: str
) -> None:
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    for minutes in (1, 60, 23 * 60 - 1):
        assert planner.due(config, journal, NOW + timedelta(minutes=minutes)) == []  # type: ignore[arg-type]
    assert planner.planned == 1  # nothing read but the raw inputs
    [item] = planner.due(config, journal, NOW + timedelta(hours=23))  # type: ignore[arg-type]
    assert item.action == ROTATE and planner.planned == 2
    journal.close()
    other.close()


@pytest.mark.parametrize(
    "change",
    [
        {"current_version_id": "v0", "rotated_at": NOW - timedelta(days=2)},  # a rotation
        {"expires_at": NOW + timedelta(hours=1)},  # no version change: near expiry
    ],
)
def test_planner_sees_another_replicas_state_change_at_the_next_tick(
    tmp_path: Path, journal_url: str, change: dict[str, object]
) -> None:
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    other.set_state("prod", "a", **change)
    [item] = planner.due(config, journal, NOW + timedelta(seconds=10))  # type: ignore[arg-type]
    assert item.action == ROTATE
    journal.close()
    other.close()


def test_planner_sees_a_failure_and_its_retry_time(tmp_path: Path, journal_url: str) -> None:
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    other.set_state("prod", "a", expires_at=NOW + timedelta(hours=1))
    assert planner.due(config, journal, NOW)  # type: ignore[arg-type]
    # the attempt fails (no version change): wait for retry_after_failure (10 min), then due
    other.set_state("prod", "a", last_outcome="error", last_attempt_at=NOW)
    assert planner.due(config, journal, NOW + timedelta(seconds=10)) == []  # type: ignore[arg-type]
    planned = planner.planned
    assert planner.due(config, journal, NOW + timedelta(minutes=9)) == []  # type: ignore[arg-type]
    assert planner.planned == planned
    [item] = planner.due(config, journal, NOW + timedelta(minutes=10))  # type: ignore[arg-type]
    assert item.action == ROTATE and item.urgent
    journal.close()
    other.close()


def test_planner_sees_open_rotations_and_retire_times(tmp_path: Path, journal_url: str) -> None:
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    promoted = _rotation(Step.PROMOTED, retire_after=NOW + timedelta(hours=2))
    other.add_rotation(promoted)
    assert planner.due(config, journal, NOW + timedelta(seconds=10)) == []  # type: ignore[arg-type]
    # another replica ends the grace period early (readers caught up): retire at the next tick
    other.update_rotation(promoted.id, retire_after=NOW + timedelta(seconds=10))
    [item] = planner.due(config, journal, NOW + timedelta(seconds=20))  # type: ignore[arg-type]
    assert item.action == RETIRE
    other.update_rotation(promoted.id, step=Step.DONE, finished_at=NOW)
    assert planner.due(config, journal, NOW + timedelta(seconds=30)) == []  # type: ignore[arg-type]
    other.add_rotation(_rotation(Step.STAGED))  # a replica died mid-rotation
    [item] = planner.due(config, journal, NOW + timedelta(seconds=40))  # type: ignore[arg-type]
    assert item.action == RESUME
    journal.close()
    other.close()


def test_planner_drives_due_work_again_at_every_tick(tmp_path: Path, journal_url: str) -> None:
    """Due work found busy (a dead holder's lease) changes nothing the plan reads: the next
    tick plans again and hands it to the engine again, until the lease is taken over."""
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    other.add_rotation(_rotation(Step.STAGED))
    for seconds in (10, 20, 30):
        [item] = planner.due(config, journal, NOW + timedelta(seconds=seconds))  # type: ignore[arg-type]
        assert item.action == RESUME
    assert planner.planned == 4
    journal.close()
    other.close()


def test_planner_sees_replaced_settings_and_skips_offboarded(
    tmp_path: Path, journal_url: str
) -> None:
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    env = config.environments["prod"]  # type: ignore[attr-defined]
    extra = env.credentials[0].model_copy(update={"name": "b", "connection_id": "c-b"})
    config.environments["prod"] = env.with_discovered([extra], set())  # type: ignore[attr-defined]
    [item] = planner.due(config, journal, NOW + timedelta(seconds=10))  # type: ignore[arg-type]
    assert (item.credential, item.action) == ("b", ROTATE)
    config.environments["prod"] = env.with_discovered([extra], {"b"})  # type: ignore[attr-defined]
    assert planner.due(config, journal, NOW + timedelta(seconds=20)) == []  # type: ignore[arg-type]
    journal.close()
    other.close()


def test_planner_sees_its_own_journals_writes(tmp_path: Path, journal_url: str) -> None:
    """The process's own writes (its engine's) count as changes too."""
    config, journal, other, planner = _waiting(tmp_path, journal_url)
    journal.set_state("prod", "a", last_outcome="error", last_attempt_at=NOW)
    journal.set_state("prod", "a", expires_at=NOW + timedelta(hours=1))
    [item] = planner.due(config, journal, NOW + timedelta(minutes=10))  # type: ignore[arg-type]
    assert item.action == ROTATE and planner.planned == 2
    journal.close()
    other.close()
