"""``rotator status`` and the lease of a process that died mid-drive ("STALLED", exit 3).

A stopped holder's lease stays in the journal, expired, until another worker takes the
credential over. That is worth an alarm while it holds up work that is due (a rotation to
resume: readers may be served a token Makini killed). A lease that holds up nothing is not:
the process died after the rotation was promoted, and the old version is retired only when
its grace period ends, or it died between taking a credential's lease and giving it back with
nothing to do (every replica of a fleet looks at every due credential, most find it done by
another). Nobody takes such a lease over until the credential is next due, hours or days
later, and status must not cry wolf until then."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from rotator.crypto import generate_key
from rotator.makini.sim import SimServer
from tests.cli import RotatorCli
from tests.wait import lease_free, wait_until

pytestmark = pytest.mark.e2e

CONFIG = """
[journal]
url = "sqlite:///journal.db"
lock_ttl = "1s"

[environments.prod]
sealing_key = {{ env = "STALLED_SEAL" }}
[environments.prod.makini]
base_url = "{url}"
client_id = "test-prod"
client_secret_env = "STALLED_SECRET"
issue_invalidates_previous = false
[environments.prod.schedule]
interval = "1d"
grace_period = "1h"
[[environments.prod.backends]]
type = "file"
path = "files/prod"
key = {{ env = "STALLED_FILE" }}
[[environments.prod.credentials]]
name = "a"
connection_id = "conn-stalled-a"
[[environments.prod.credentials]]
name = "b"
connection_id = "conn-stalled-b"
"""


def test_only_a_lease_that_holds_up_due_work_is_stalled(tmp_path: Path, sim: SimServer) -> None:
    sim.set(issue_invalidates_previous=False)
    rotator = RotatorCli(
        tmp_path,
        CONFIG.format(url=sim.url),
        {
            "STALLED_SEAL": generate_key(),
            "STALLED_FILE": generate_key(),
            "STALLED_SECRET": "test-prod-secret",
        },
    )
    assert rotator("rotate", "prod", "a", "b").returncode == 0
    # a: killed right after its second rotation was promoted; the old version is retired in
    # an hour (grace period). b: killed right after Makini issued its new token.
    for name, step in (("a", "promoted"), ("b", "issued")):
        killed = rotator("rotate", "prod", name, env={"ROTATOR_FAULT_KILL_AFTER": f"{step}:{name}"})
        assert killed.returncode == -signal.SIGKILL
    # both leases expire (and stay in the journal: nobody takes them over)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    wait_until("the killed holders' leases to expire", lambda: lease_free(url, "prod/a", "prod/b"))

    proc = rotator("status", "--json")
    rows: dict[str, dict[str, Any]] = {r["credential"]: r for r in json.loads(proc.stdout)}
    plan = {i["credential"]: i for i in json.loads(rotator("plan", "--json").stdout)}
    # b's rotation is due to resume, and the dead holder's lease holds it up
    assert plan["b"]["action"] == "resume"
    assert "stopped renewing" in (rows["b"]["stalled_lease"] or "")
    # a is rotated and agreed everywhere; its retire is not due for an hour: nothing to say
    assert plan["a"]["action"] == "wait"
    assert rows["a"]["open_step"] == "promoted" and rows["a"]["backends_agree"]
    assert rows["a"]["stalled_lease"] is None, rows["a"]["stalled_lease"]
    assert proc.returncode == 3  # for b

    # once b is resumed, the only lease left is a's, which holds up nothing: healthy
    assert rotator("run-due", "--json").returncode == 0
    proc = rotator("status", "--json")
    rows = {r["credential"]: r for r in json.loads(proc.stdout)}
    assert rows["b"]["open_step"] == "promoted"  # resumed and promoted, retired in an hour
    assert rows["b"]["stalled_lease"] is None and rows["b"]["backends_agree"]
    assert rows["a"]["stalled_lease"] is None
    assert proc.returncode == 0, proc.stdout
