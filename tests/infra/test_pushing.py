"""``rotator run-due`` pushes its metrics to a real Pushgateway: grouped by job and environment,
on failure too (keeping the last success's time), and a push that fails never fails the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rotator import __version__
from tests.infra._monitoring import Monitored, run, scrape, value
from tests.infra._peers import free_port, pushgateway

GROUP = {"job": "rotator-run-due", "environment": "prod", "cluster": "eu-test"}
ALWAYS_DUE = {"interval": "1h", "grace_period": "0s", "rotate_before_expiry": "2h"}
"""With the simulator's tokens living 1 h, every run rotates every credential."""


def metrics(gateway: str) -> dict[str, Any]:
    return {
        "pushgateway": {
            "url": gateway,
            "job": "rotator-run-due",
            "grouping": {"cluster": "eu-test"},
        }
    }


def test_run_due_pushes_per_environment_and_a_failed_run_keeps_the_last_success(
    tmp_path: Path, sim: Any
) -> None:
    sim.set(token_lifetime_s=3600)
    with pushgateway(tmp_path) as gateway:
        rig = Monitored(tmp_path, sim, metrics(gateway), schedule=ALWAYS_DUE)
        before = time.time()
        assert run(rig, "run-due").returncode == 0
        text, found = scrape(gateway)

        success = value(found, "rotator_run_due_last_success_timestamp_seconds", **GROUP)
        assert success is not None and success >= before
        assert value(found, "rotator_run_due_failed_credentials", **GROUP) == 0
        assert value(found, "rotator_build_info", version=__version__, **GROUP) == 1
        for name in ("alpha", "beta"):
            cred = {**GROUP, "credential": name}
            assert value(found, "rotator_rotations_total", outcome="rotated", **cred) == 1
            expiry = value(found, "rotator_token_expiry_timestamp_seconds", **cred)
            assert expiry is not None and before + 3000 < expiry < time.time() + 3700
            rotated = value(found, "rotator_last_rotation_success_timestamp_seconds", **cred)
            assert rotated is not None and rotated >= before
            assert value(found, "rotator_backends_agree", **cred) == 1
            assert value(found, "rotator_credential_failing", **cred) == 0
            assert value(found, "rotator_readers_on_old_version", **cred) == 0
            assert value(found, "rotator_token_expires_in_seconds", **cred) is None  # frozen
        assert value(found, "rotator_webhook_queue_depth", **GROUP) == 0
        issued = value(
            found,
            "rotator_makini_request_duration_seconds_count",
            operation="issue",
            outcome="ok",
            **GROUP,
        )
        assert issued == 2
        tokens = [rig.token("alpha"), rig.token("beta")]
        assert not any(t in text for t in tokens)

        # Makini refuses every new token: the run fails, and says so without losing the last
        # success
        sim.set(fail_next=[400] * 20)
        failed_run = run(rig, "run-due")
        assert failed_run.returncode == 1, failed_run.stdout + failed_run.stderr
        _, found = scrape(gateway)
        assert value(found, "rotator_run_due_last_success_timestamp_seconds", **GROUP) == success
        last_run = value(found, "rotator_run_due_last_run_timestamp_seconds", **GROUP)
        assert last_run is not None and last_run > success
        assert value(found, "rotator_run_due_failed_credentials", **GROUP) == 2
        cred = {**GROUP, "credential": "alpha"}
        assert value(found, "rotator_credential_failing", **cred) == 1
        assert value(found, "rotator_rotations_total", outcome="rotated", **cred) is None
        assert value(found, "rotator_rotations_total", outcome="failed", **cred) == 1
        refused = [
            v
            for n, labels, v in found
            if n == "rotator_makini_request_duration_seconds_count"
            and labels.get("outcome") == "4xx"
            and GROUP.items() <= labels.items()
        ]
        assert sum(refused) >= 1, found
        assert not any(t in text for t in tokens for text in rig.outputs)


def test_a_run_that_cannot_start_still_pushes_its_time(tmp_path: Path, sim: Any) -> None:
    with pushgateway(tmp_path) as gateway:
        (tmp_path / "blocker").write_text("a file where the journal's folder should be")
        journal = f"sqlite:///{tmp_path}/blocker/journal.db"
        rig = Monitored(tmp_path, sim, metrics(gateway), journal=journal)
        proc = run(rig, "run-due")
        assert proc.returncode != 0
        _, found = scrape(gateway)
        assert value(found, "rotator_run_due_last_run_timestamp_seconds", **GROUP) is not None
        assert value(found, "rotator_build_info", **GROUP) == 1
        assert value(found, "rotator_run_due_last_success_timestamp_seconds", **GROUP) is None
        assert value(found, "rotator_run_due_failed_credentials", **GROUP) is None


def test_a_push_that_fails_is_a_warning_and_the_run_succeeds(tmp_path: Path, sim: Any) -> None:
    nobody = f"http://user:pw@127.0.0.1:{free_port()}"
    rig = Monitored(tmp_path, sim, metrics(nobody))
    proc = run(rig, "run-due")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "metrics.push_failed" in out
    assert "pw" not in out.replace("push_failed", "")


def test_the_metrics_section_is_validated(tmp_path: Path, sim: Any) -> None:
    bad = Monitored(tmp_path, sim, {"pushgateway": {"url": "pushgateway:9091"}})
    proc = run(bad, "config", "check")
    assert proc.returncode != 0
    assert "metrics.pushgateway.url" in proc.stdout + proc.stderr
