"""Notifications end to end against real peers: rotations against the simulator over a socket,
a real SQLite journal, a signed HTTPS webhook receiver, a Slack-shaped receiver, and a real
Alertmanager."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.clock import SYSTEM, Clock
from rotator.notify import outbox
from rotator.notify.notifier import Notifier
from rotator.notify.outbox import Change
from rotator.rotation.runtime import Runtime
from rotator.webhooks.signature import signature_valid
from tests.clock import FakeClock
from tests.factories import Runtimes, environment, make_config
from tests.notify.conftest import Receiver
from tests.wait import until

SECRET = "notify-test-signing-secret"


def webhook(receiver: Receiver, ca: Path, name: str = "hook", **extra: Any) -> dict[str, Any]:
    return {
        "type": "webhook",
        "name": name,
        "url": receiver.url,
        "secret_env": "NOTIFY_TEST_SECRET",
        "ca_file": str(ca),
        **extra,
    }


def open_runtime(
    runtimes: Runtimes,
    tmp_path: Path,
    sim: Any,
    sinks: dict[str, list[dict[str, Any]]],
    *,
    names: tuple[str, ...] = ("a",),
    clock: Clock = SYSTEM,
    notify: dict[str, Any] | None = None,
    journal_url: str | None = None,
) -> Runtime:
    """One runtime with an environment per key of ``sinks`` (``prod``, ``dev``), two memory
    backends each, notifying those sinks."""
    os.environ["NOTIFY_TEST_SECRET"] = SECRET
    envs = {}
    for env, env_sinks in sinks.items():
        table = environment(
            sim.url,
            f"test-{env}",
            [{"name": n, "connection_id": f"conn-{env}-{n}"} for n in names],
            sealing_env=f"SEAL_{env}",
            backends=[
                {"type": "memory", "name": "one", "namespace": f"{tmp_path}/one"},
                {"type": "memory", "name": "two", "namespace": f"{tmp_path}/two"},
            ],
        )
        table["notify"] = {"sinks": env_sinks, **(notify or {})}
        envs[env] = table
    url = journal_url or f"sqlite:///{tmp_path / 'journal.db'}"
    return runtimes.open(make_config(tmp_path, url, envs), clock=clock)


def set_attention(
    runtime: Runtime, message: str | None, env: str = "prod", cred: str = "a"
) -> None:
    runtime.journal.set_state(env, cred, attention=message)


def conditions(receiver: Receiver) -> list[tuple[str, str, str]]:
    return [(b["condition"], b["state"], b["credential"]) for b in receiver.bodies()]


async def test_webhook_is_signed_and_sent_once_when_a_condition_starts_and_once_when_it_ends(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    runtime = open_runtime(runtimes, tmp_path, sim, {"prod": [webhook(https_receiver, test_ca[1])]})
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    notifier = Notifier(runtime)
    try:
        set_attention(runtime, "Makini reported auth required: re-authorize the connection")
        for _ in range(3):  # still on: no flood
            await notifier.evaluate()
            await notifier.deliver()
        assert conditions(https_receiver) == [("attention", "firing", "a")]

        set_attention(runtime, None)
        for _ in range(3):
            await notifier.evaluate()
            await notifier.deliver()
        assert conditions(https_receiver) == [
            ("attention", "firing", "a"),
            ("attention", "resolved", "a"),
        ]
    finally:
        await notifier.aclose()
    for got in https_receiver.received:
        assert signature_valid(SECRET.encode(), got.body, got.headers["x-rotator-signature"])
        assert not signature_valid(b"another secret", got.body, got.headers["x-rotator-signature"])
    first, second = https_receiver.bodies()
    assert first["environment"] == "prod" and first["severity"] == "critical"
    assert "re-authorize" in first["detail"]
    assert first["id"] != second["id"] and second["resolved_at"] is not None
    rows = outbox.rows(runtime.journal)
    assert [r.status for r in rows] == ["delivered", "delivered"]


async def test_a_failed_rotation_notifies_from_the_engine_event_and_a_rotation_resolves_it(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    only_failures = webhook(https_receiver, test_ca[1], conditions=["rotation_failed"])
    runtime = open_runtime(runtimes, tmp_path, sim, {"prod": [only_failures]})
    notifier = Notifier(runtime)
    notifier.listen()
    try:
        sim.set(fail_next=[403])  # Makini refuses: a failure (and attention, not sent here)
        result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
        assert not result.ok
        await notifier.flush()
        [failed] = https_receiver.bodies()
        assert (failed["condition"], failed["state"]) == ("rotation_failed", "firing")
        assert result.outcome in failed["detail"].replace("rolled back", "rolled_back")

        ok = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
        assert ok.outcome == "rotated"
        await notifier.flush()
        await notifier.flush()  # the state agrees: nothing more
    finally:
        notifier.unlisten()
        await notifier.aclose()
    assert conditions(https_receiver) == [
        ("rotation_failed", "firing", "a"),
        ("rotation_failed", "resolved", "a"),
    ]
    assert ok.version_id is not None and ok.version_id in https_receiver.bodies()[1]["detail"]


async def test_near_expiry_and_drift_start_and_resolve(
    runtimes: Runtimes,
    tmp_path: Path,
    sim: Any,
    slack_receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SLACK_URL", slack_receiver.url)
    clock = FakeClock()
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {"prod": [{"type": "slack", "name": "chat", "url_env": "NOTIFY_SLACK_URL"}]},
        clock=clock,
        notify={"near_expiry": "2d"},
    )
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    notifier = Notifier(runtime)
    try:
        await notifier.flush()
        assert slack_receiver.count() == 0  # healthy: nothing to say

        state = runtime.journal.state("prod", "a")
        assert state is not None and state.expires_at is not None
        ahead = (state.expires_at - clock.now()).total_seconds() - 3600  # 1 h left
        clock.advance(ahead)
        sim.set(clock_offset_s=ahead)  # Makini's time moves too
        await notifier.flush()
        await notifier.flush()
        [near] = slack_receiver.bodies()
        assert list(near) == ["text"]
        assert "expires soon" in near["text"] and "prod/a" in near["text"]

        # one backend loses the credential: the backends disagree
        runtime.environments["prod"].backends[1].delete("a")
        await notifier.flush()
        await notifier.flush()
        assert "disagree" in slack_receiver.bodies()[1]["text"]

        # a rotation puts it everywhere with a fresh expiry: both resolve
        result = await runtime.engine.rotate("prod", "a", reason="t", actor="t")
        assert result.outcome == "rotated"
        await notifier.flush()
        await notifier.flush()
    finally:
        await notifier.aclose()
    texts = [b["text"] for b in slack_receiver.bodies()]
    assert len(texts) == 4, texts
    assert any("no longer near expiry" in t for t in texts[2:])
    assert any("agree again" in t for t in texts[2:])


async def test_alertmanager_shows_the_alert_firing_then_resolved(
    runtimes: Runtimes, tmp_path: Path, sim: Any, alertmanager: str
) -> None:
    # behind Alertmanager's clock: what the test moves stays in Alertmanager's past
    clock = FakeClock(datetime.now(UTC) - timedelta(minutes=5))
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {
            "prod": [
                {
                    "type": "alertmanager",
                    "name": "am",
                    "url": alertmanager,
                    "labels": {"team": "payments"},
                }
            ]
        },
        clock=clock,
    )
    await runtime.engine.rotate("prod", "a", reason="t", actor="t")
    notifier = Notifier(runtime)

    def alerts() -> list[dict[str, Any]]:
        found = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        return [a for a in found if a["labels"].get("credential") == "a"]

    try:
        set_attention(runtime, "the customer must re-authorize the connection")
        await notifier.flush()
        [alert] = await until("the alert in alertmanager", alerts, timeout_s=10)
        assert alert["labels"]["alertname"] == "MakiniRotatorAttention"
        assert alert["labels"]["environment"] == "prod"
        assert alert["labels"]["team"] == "payments"
        assert alert["status"]["state"] == "active"
        assert "re-authorize" in alert["annotations"]["description"]

        # still firing a while later: sent again, so Alertmanager keeps it past its endsAt
        clock.advance(120)
        await notifier.resend_firing()
        [later] = await until(
            "a later endsAt", lambda: [a for a in alerts() if a["endsAt"] > alert["endsAt"]]
        )
        assert later["startsAt"] == alert["startsAt"]

        set_attention(runtime, None)
        await notifier.flush()
        await until("the alert resolved", lambda: not alerts(), timeout_s=10)
    finally:
        await notifier.aclose()
    assert [(r.condition, r.firing, r.status) for r in outbox.rows(runtime.journal)] == [
        ("attention", True, "delivered"),
        ("attention", False, "delivered"),
    ]


async def test_each_sink_is_rate_limited(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    clock = FakeClock()
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {"prod": [webhook(https_receiver, test_ca[1], rate_limit=2)]},
        names=("a", "b", "c", "d", "e"),
        clock=clock,
    )
    notifier = Notifier(runtime)
    try:
        for name in ("a", "b", "c", "d", "e"):
            set_attention(runtime, f"{name} needs a person", cred=name)
        await notifier.flush()
        assert https_receiver.count() == 2
        pending = [r for r in outbox.rows(runtime.journal) if r.status == "pending"]
        assert len(pending) == 3 and all(r.attempts == 0 for r in pending)

        await notifier.flush()  # the same minute: still nothing more
        assert https_receiver.count() == 2
        clock.advance(61)
        await notifier.flush()
        assert https_receiver.count() == 4
        clock.advance(61)
        await notifier.flush()
    finally:
        await notifier.aclose()
    assert sorted(b["credential"] for b in https_receiver.bodies()) == ["a", "b", "c", "d", "e"]


async def test_a_failing_peer_is_retried_with_backoff_until_it_takes_it(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    clock = FakeClock()
    runtime = open_runtime(
        runtimes, tmp_path, sim, {"prod": [webhook(https_receiver, test_ca[1])]}, clock=clock
    )
    notifier = Notifier(runtime)
    try:
        https_receiver.answers = [503, 503, 503]  # one attempt's three tries
        set_attention(runtime, "a person, please")
        await notifier.flush()
        [row] = outbox.rows(runtime.journal)
        assert row.status == "pending" and row.attempts == 1
        assert row.last_error == "sink 'hook': the peer answered HTTP 503"
        assert row.next_at > clock.now()
        await notifier.deliver()
        assert https_receiver.count() == 0  # not before its backoff
        clock.advance((row.next_at - clock.now()).total_seconds() + 0.1)
        await notifier.deliver()
    finally:
        await notifier.aclose()
    assert https_receiver.count() == 1
    [row] = outbox.rows(runtime.journal)
    assert row.status == "delivered" and row.attempts == 2


async def test_dev_and_prod_notify_their_own_sinks(
    runtimes: Runtimes,
    tmp_path: Path,
    sim: Any,
    https_receiver: Receiver,
    https_receiver_2: Receiver,
    test_ca: Any,
) -> None:
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {
            "prod": [webhook(https_receiver, test_ca[1], name="oncall")],
            "dev": [webhook(https_receiver_2, test_ca[1], name="devchat")],
        },
    )
    notifier = Notifier(runtime)
    try:
        set_attention(runtime, "dev needs a person", env="dev")
        await notifier.flush()
        set_attention(runtime, "prod needs a person", env="prod")
        await notifier.flush()
    finally:
        await notifier.aclose()
    assert [b["environment"] for b in https_receiver.bodies()] == ["prod"]
    assert [b["environment"] for b in https_receiver_2.bodies()] == ["dev"]


async def test_a_claim_abandoned_by_a_dead_sender_is_delivered_after_its_window(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    clock = FakeClock()
    runtime = open_runtime(
        runtimes, tmp_path, sim, {"prod": [webhook(https_receiver, test_ca[1])]}, clock=clock
    )
    notifier = Notifier(runtime)
    try:
        notifier.record(Change("prod", "a", "attention", True, "a person, please"))
        # a sender claims it and dies before sending
        [taken] = outbox.claim(runtime.journal, clock.now(), notifier._window())
        assert await notifier.deliver() == 0  # held by the dead sender: not sent twice
        clock.advance(notifier._window().total_seconds() + 1)
        assert await notifier.deliver() == 1
    finally:
        await notifier.aclose()
    assert [b["id"] for b in https_receiver.bodies()] == [f"rotator-{taken.id}"]


RECORD_AND_DIE = """
import asyncio, os, signal, sys
from rotator.notify.notifier import Notifier
from rotator.notify.outbox import Change
from rotator.revoke import resume_held
from rotator.rotation.runtime import Runtime
from rotator.settings import load_config

runtime = Runtime.open(load_config(sys.argv[1]), resume_revoke=resume_held)
runtime.journal.set_state("prod", "a", attention="recorded, then killed")
Notifier(runtime).record(Change("prod", "a", "attention", True, "recorded, then killed"))
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_process_killed_before_delivery_loses_nothing(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    from tests.factories import config_toml

    os.environ["NOTIFY_TEST_SECRET"] = SECRET
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    table = environment(
        sim.url,
        "test-prod",
        [{"name": "a", "connection_id": "conn-a"}],
        sealing_env="SEAL_prod",
        backends=[
            {
                "type": "file",
                "name": "f",
                "path": "files",
                "key": {"file": "file.key", "generate": True},
            }
        ],
    )
    table["notify"] = {"sinks": [webhook(https_receiver, test_ca[1])]}
    path = tmp_path / "rotator.toml"
    path.write_text(config_toml(url, {"prod": table}))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", RECORD_AND_DIE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr
    assert https_receiver.count() == 0

    runtime = runtimes.open(make_config(tmp_path, url, {"prod": table}))
    notifier = Notifier(runtime)  # the restart
    try:
        await notifier.flush()
    finally:
        await notifier.aclose()
    [body] = https_receiver.bodies()
    assert (body["condition"], body["state"], body["detail"]) == (
        "attention",
        "firing",
        "recorded, then killed",
    )


async def test_serve_loop_delivers_as_soon_as_something_is_recorded(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    only_failures = webhook(https_receiver, test_ca[1], conditions=["rotation_failed"])
    runtime = open_runtime(runtimes, tmp_path, sim, {"prod": [only_failures]})
    notifier = Notifier(runtime, poll_s=30)  # only the wake can make it this quick
    notifier.listen()
    task = asyncio.ensure_future(notifier.run())
    try:
        await until("the loop's first look", lambda: notifier._wake is not None)
        sim.set(fail_next=[403])
        await runtime.engine.rotate("prod", "a", reason="t", actor="t")
        await until("the notification", https_receiver.count, timeout_s=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.unlisten()
        await notifier.aclose()
    assert conditions(https_receiver) == [("rotation_failed", "firing", "a")]


async def test_no_token_in_any_notification(
    runtimes: Runtimes,
    tmp_path: Path,
    sim: Any,
    https_receiver: Receiver,
    slack_receiver: Receiver,
    test_ca: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SLACK_URL", slack_receiver.url)
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {
            "prod": [
                webhook(https_receiver, test_ca[1]),
                {"type": "slack", "name": "chat", "url_env": "NOTIFY_SLACK_URL"},
            ]
        },
        names=("a", "b"),
        notify={"near_expiry": "3650d"},  # every token is "near expiry": a body for each
    )
    notifier = Notifier(runtime)
    notifier.listen()
    try:
        for name in ("a", "b"):
            await runtime.engine.rotate("prod", name, reason="t", actor="t")
        sim.set(fail_next=[403])
        await runtime.engine.rotate("prod", "b", reason="t", actor="t")
        set_attention(runtime, "the customer must re-authorize", cred="a")
        runtime.environments["prod"].backends[1].delete("a")
        await notifier.flush()
        await notifier.flush()
    finally:
        notifier.unlisten()
        await notifier.aclose()
    bodies = [r.body.decode() for r in https_receiver.received + slack_receiver.received]
    assert len(bodies) >= 8  # near expiry x2, failed, attention, drift: on both sinks
    tokens = list(sim.state.tokens)
    assert tokens
    for body in bodies:
        for token in tokens:
            assert token not in body


async def test_an_emergency_revoke_is_notified_started_finished_and_unconfirmed(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    from rotator.revoke import Revoker
    from rotator.revoke.model import RevokeRequest

    sink = webhook(https_receiver, test_ca[1], conditions=["revoke", "revoke_unconfirmed"])
    runtime = open_runtime(runtimes, tmp_path, sim, {"prod": [sink]}, names=("a", "b"))
    for name in ("a", "b"):
        await runtime.engine.rotate("prod", name, reason="t", actor="t")
    notifier = Notifier(runtime)
    revoker = Revoker(runtime.engine)
    try:
        req = RevokeRequest("prod", ("a",), reason="leaked in a log", actor="alice")
        [report] = await revoker.run(req, await revoker.plan(req))
        assert report.outcome == "revoked"
        await notifier.flush()
        await notifier.flush()
        # Makini keeps the old token alive when it issues a new one: the revoke cannot confirm
        sim.set(issue_invalidates_previous=False)
        req = RevokeRequest("prod", ("b",), reason="leaked", actor="bob", strategy="issue")
        [report] = await revoker.run(req, await revoker.plan(req))
        assert report.outcome == "unconfirmed"
        await notifier.flush()
        await notifier.flush()
    finally:
        await notifier.aclose()
    got = [(b["credential"], b["condition"], b["state"]) for b in https_receiver.bodies()]
    # in order per condition (each resolve after its start)
    assert got[:2] == [("a", "revoke", "firing"), ("a", "revoke", "resolved")]
    assert [g for g in got[2:] if g[1] == "revoke"] == [
        ("b", "revoke", "firing"),
        ("b", "revoke", "resolved"),
    ]
    assert [g for g in got[2:] if g[1] != "revoke"] == [("b", "revoke_unconfirmed", "firing")]
    bodies = https_receiver.bodies()
    assert "alice" in bodies[0]["detail"] and "leaked in a log" in bodies[0]["detail"]
    assert "confirmed invalid" in bodies[1]["detail"]
    [finished_b] = [
        b for b in bodies[2:] if b["condition"] == "revoke" and b["state"] == "resolved"
    ]
    assert "UNCONFIRMED" in finished_b["detail"]


@pytest.mark.postgres
async def test_replicas_on_postgresql_record_once_and_deliver_once(
    runtimes: Runtimes,
    tmp_path: Path,
    sim: Any,
    https_receiver: Receiver,
    test_ca: Any,
    pg_url: str,
) -> None:
    names = tuple(f"c{i}" for i in range(12))
    sinks = {"prod": [webhook(https_receiver, test_ca[1], rate_limit=1000)]}
    replicas = [
        open_runtime(runtimes, tmp_path, sim, sinks, names=names, journal_url=pg_url)
        for _ in range(2)
    ]
    notifiers = [Notifier(r) for r in replicas]
    try:
        changes = [Change("prod", n, "attention", True, f"{n} needs a person") for n in names]
        for change in changes:
            set_attention(replicas[0], change.detail, cred=change.credential)
        # both replicas see every condition start at the same moment
        recorded = await asyncio.gather(
            *(asyncio.to_thread(n.record, c) for c in changes for n in notifiers)
        )
        assert sum(recorded) == len(names)
        # and both deliver at once
        await asyncio.gather(*(n.flush() for n in notifiers))
    finally:
        for n in notifiers:
            await n.aclose()
    assert sorted(b["credential"] for b in https_receiver.bodies()) == sorted(names)
    assert {r.status for r in outbox.rows(replicas[0].journal)} == {"delivered"}


async def test_a_resolve_never_overtakes_its_start_and_a_down_sink_is_tried_once_a_round(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    clock = FakeClock()
    runtime = open_runtime(
        runtimes,
        tmp_path,
        sim,
        {"prod": [webhook(https_receiver, test_ca[1])]},
        names=("a", "b", "c"),
        clock=clock,
    )
    notifier = Notifier(runtime)
    try:
        https_receiver.answers = [503, 503, 503]  # the first attempt's three tries
        for name in ("a", "b", "c"):
            notifier.record(Change("prod", name, "attention", True, f"{name}: a person"))
        assert await notifier.deliver() == 1  # the sink is down: one attempt, the rest wait
        rows = outbox.rows(runtime.journal)
        assert [r.attempts for r in rows] == [1, 0, 0]
        assert len({r.next_at for r in rows}) == 1 and rows[0].next_at > clock.now()

        # "a" resolves meanwhile; the resolve is due at once, but waits for the start
        notifier.record(Change("prod", "a", "attention", False, "cleared"))
        assert await notifier.deliver() == 0
        clock.advance((rows[0].next_at - clock.now()).total_seconds() + 0.1)
        while await notifier.deliver():
            pass
    finally:
        await notifier.aclose()
    got = [(b["credential"], b["state"]) for b in https_receiver.bodies()]
    assert got == [("a", "firing"), ("b", "firing"), ("c", "firing"), ("a", "resolved")]


async def test_delivered_notifications_are_forgotten_after_a_week(
    runtimes: Runtimes, tmp_path: Path, sim: Any, https_receiver: Receiver, test_ca: Any
) -> None:
    clock = FakeClock()
    runtime = open_runtime(
        runtimes, tmp_path, sim, {"prod": [webhook(https_receiver, test_ca[1])]}, clock=clock
    )
    notifier = Notifier(runtime)
    try:
        set_attention(runtime, "a person, please")
        await notifier.flush()
        assert [r.status for r in outbox.rows(runtime.journal)] == ["delivered"]
        clock.advance(6 * 86400)
        await notifier.evaluate(drift=False)
        assert len(outbox.rows(runtime.journal)) == 1
        clock.advance(2 * 86400)
        await notifier.evaluate(drift=False)
    finally:
        await notifier.aclose()
    assert outbox.rows(runtime.journal) == []
    assert https_receiver.count() == 1  # still on: not notified again
