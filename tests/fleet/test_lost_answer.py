"""A process killed while Makini answers its request for a new token, where Makini kills a
connection's older tokens when it issues one (``issue_invalidates_previous = true``): the run
that resumes the rotation records the lost answer as an unaccounted token, and its own issue
kills that token at Makini. The entry must then be resolved by that same issue, or ``rotator
status`` raises an alarm (exit 3, "unaccounted") about a token that is dead already, until the
credential's next rotation, days later.

Found by the fleet test: today the entry stays open, because it is recorded (``recorded_at``)
a moment *after* the timestamp the resumed request is stamped with (``asked_at``), and
``unaccounted.after_issue`` resolves only entries recorded at or before it. The fix belongs to
the issue step (``RotationEngine._issue``) or ``rotator.rotation.unaccounted``: see the report of
branch issue13-fleet."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from rotator.crypto import generate_key
from rotator.journal import Journal
from rotator.rotation import unaccounted
from tests.fleet.harness import Proc, Simulator
from tests.wait import wait_until

pytestmark = pytest.mark.e2e

CONFIG = """
[journal]
url = "sqlite:///journal.db"
lock_ttl = "1s"

[environments.prod]
sealing_key = {{ env = "LOST_SEAL" }}
[environments.prod.makini]
base_url = "{url}"
client_id = "lost-prod"
client_secret_env = "LOST_SECRET"
issue_invalidates_previous = true
[environments.prod.schedule]
interval = "1h"
grace_period = "0s"
[[environments.prod.backends]]
type = "file"
path = "files/prod"
key = {{ env = "LOST_FILE" }}
[[environments.prod.credentials]]
name = "a"
connection_id = "conn-lost-a"
"""


def test_a_lost_token_killed_by_the_resumed_issue_is_resolved(tmp_path: Path) -> None:
    sim = Simulator(tmp_path, "lost", "lost-prod:lost-prod-secret", invalidates=True,
                    latency_ms=1500)
    env = {
        **os.environ,
        "LOST_SEAL": generate_key(),
        "LOST_FILE": generate_key(),
        "LOST_SECRET": "lost-prod-secret",
        "ROTATOR_CONFIG": str(tmp_path / "rotator.toml"),
    }
    env.pop("ROTATOR_FAULT_KILL_AFTER", None)
    (tmp_path / "rotator.toml").write_text(CONFIG.format(url=sim.url))
    procs: list[Proc] = []
    try:
        first = Proc("run-due-1", tmp_path, ["run-due"], env)
        procs.append(first)
        wait_until("the request inside Makini", lambda: "conn-lost-a" in sim.asked(), 30, 0.01)
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        # at once: run-due waits for the killed run's lease itself
        second = Proc("run-due-2", tmp_path, ["run-due", "--json"], env)
        procs.append(second)
        assert second.wait(60) == 0, second.stderr()
        assert [r["outcome"] for r in json.loads(second.stdout())] == ["rotated"]

        tokens = {t["status"] for t in sim.tokens(connection_id="conn-lost-a", kind="access")}
        assert tokens == {"revoked", "active"}  # the lost one, killed by the resumed issue
        journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
        try:
            [entry] = unaccounted.entries(journal, include_closed=True)
        finally:
            journal.close()
        assert entry.credential == "a"

        assert entry.status == unaccounted.RESOLVED  # fails today: it stays open
        status = Proc("status", tmp_path, ["status", "--json"], env)
        procs.append(status)
        code = status.wait(60)
        rows: list[dict[str, Any]] = json.loads(status.stdout())
        assert rows[0]["unaccounted"] == 0 and code == 0
    finally:
        for proc in procs:
            proc.stop()
        sim.close()
