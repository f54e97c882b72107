"""Discovery against the simulator over a socket: enrol what the admin client lists, off-board
what is gone (unreadable after the grace), filters, pages, dry runs, config wins, and never
another environment's connections."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.errors import ConfigError
from rotator.journal.schema import AuditEntry, WebhookEvent
from rotator.makini.sim import SimServer
from rotator.model import Stage
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from rotator.rotation.schedule import plan
from rotator.rotation.status import collect
from rotator.webhooks.queue import DONE, WebhookWorker, enqueue, parse_event
from tests.api.conftest import start_server, stop_server
from tests.clock import FakeClock
from tests.factories import Runtimes, environment, make_config
from tests.wait import until

DAY = 86400.0


def _env(sim: SimServer, name: str, client: str, tmp_path: Path, *,
         discover: dict[str, Any] | None, credentials: list[dict[str, Any]] | None = None,
         ) -> dict[str, Any]:
    table = environment(
        sim.url, client, credentials or [], sealing_env=f"SEAL_DISC_{name.upper()}",
        backends=[{"type": "file", "name": "file", "path": f"files-{name}",
                   "key": {"file": f"{name}.key", "generate": True}}],
    )
    if discover is not None:
        table["discover"] = discover
    return table


def _open(runtimes: Runtimes, sim: SimServer, tmp_path: Path, *,
          discover: dict[str, Any] | None = None, dev: dict[str, Any] | None = None,
          credentials: list[dict[str, Any]] | None = None,
          clock: FakeClock | None = None) -> Runtime:
    envs = {"prod": _env(sim, "prod", "test-prod", tmp_path,
                         discover={"enabled": True, **(discover or {})},
                         credentials=credentials)}
    if dev is not None:
        envs["dev"] = _env(sim, "dev", "test-dev", tmp_path, discover={"enabled": True, **dev})
    config = make_config(tmp_path, f"sqlite:///{tmp_path / 'journal.db'}", envs)
    return runtimes.open(config, clock=clock) if clock else runtimes.open(config)


def _audits(runtime: Runtime, action: str) -> list[AuditEntry]:
    return runtime.journal.audit_entries(action=action)


def _names(runtime: Runtime, env: str = "prod") -> set[str]:
    return {c.name for c in runtime.environments[env].settings.credentials}


async def test_a_new_connection_is_enrolled_and_gets_its_first_token_at_once(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("c-1", "test-prod", platform="SAP", company="Acme")
    runtime = _open(runtimes, sim, tmp_path)
    change = await discovery.discover(runtime, "prod")
    assert [c.credential for c in change.new] == ["sap-c-1"]
    assert [r.outcome for r in change.results] == ["rotated"]
    assert "sap-c-1" in _names(runtime)
    assert runtime.environments["prod"].primary.read("sap-c-1", Stage.CURRENT) is not None
    assert sim.tokens("c-1", kind="access", status="active")
    [entry] = _audits(runtime, "discovery.enrolled")
    assert entry.credential == "sap-c-1"
    # status and the schedule see it like a configured credential
    statuses = await collect(runtime, "prod")
    assert [s.credential for s in statuses] == ["sap-c-1"]
    # a second run changes nothing
    again = await discovery.discover(runtime, "prod")
    assert not again.changed and again.kept == ["sap-c-1"]


async def test_a_gone_connection_is_offboarded_then_unreadable_after_the_grace(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    clock = FakeClock()
    sim.add_connection("c-gone", "test-prod")
    runtime = _open(runtimes, sim, tmp_path, discover={"offboard_grace": "1d"}, clock=clock)
    await discovery.discover(runtime, "prod")
    name = "simulated-c-gone"
    backend = runtime.environments["prod"].primary
    assert backend.read(name, Stage.CURRENT) is not None
    issued = len(sim.tokens("c-gone", kind="access"))
    sim.remove_connection("c-gone")
    change = await discovery.discover(runtime, "prod")
    assert [c.credential for c in change.gone] == [name]
    assert _audits(runtime, "discovery.offboarded")
    # no more rotations, but still readable during the grace
    items = plan(runtime.config, runtime.journal, clock.now() + timedelta(days=60))
    assert name not in {i.credential for i in items}
    assert backend.read(name, Stage.CURRENT) is not None
    clock.advance(DAY / 2)
    assert not (await discovery.discover(runtime, "prod")).purge
    clock.advance(DAY / 2 + 1)
    change = await discovery.discover(runtime, "prod")
    assert [c.credential for c in change.purge] == [name]
    assert backend.read(name, Stage.CURRENT) is None
    assert all(not v.readable for v in backend.versions(name))
    assert name not in _names(runtime)
    assert _audits(runtime, "discovery.purged")
    assert len(sim.tokens("c-gone", kind="access")) == issued  # nothing more asked of Makini


async def test_filters_and_the_name_template(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("p-1", "test-prod", platform="sap", company="Acme",
                       metadata={"tier": "gold"})
    sim.add_connection("p-2", "test-prod", platform="sap", company="Beta",
                       metadata={"tier": "free"})
    sim.add_connection("p-3", "test-prod", platform="maximo", company="Acme",
                       metadata={"tier": "gold"})
    sim.add_connection("test-4", "test-prod", platform="sap", company="Acme",
                       metadata={"tier": "gold"})
    runtime = _open(runtimes, sim, tmp_path, discover={
        "include": {"platform": ["SAP"], "metadata": {"tier": "g*"}},
        "exclude": {"id": ["test-*"]},
        "name_template": "{company}-{id}",
    })
    change = await discovery.discover(runtime, "prod", first_tokens=False)
    assert [c.credential for c in change.new] == ["acme-p-1"]
    assert change.filtered == 3


async def test_more_than_one_page(sim: SimServer, runtimes: Runtimes, tmp_path: Path) -> None:
    sim.set(page_size=7)
    sim.add_connections(30, prefix="pg-", client_id="test-prod")
    runtime = _open(runtimes, sim, tmp_path)
    change = await discovery.discover(runtime, "prod", first_tokens=False)
    assert len(change.new) == 30 and change.complete
    assert sim.stats()["received"]["GET /api/system/connections"] == 5


async def test_a_dry_run_changes_nothing(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("d-1", "test-prod")
    runtime = _open(runtimes, sim, tmp_path)
    change = await discovery.discover(runtime, "prod", dry_run=True)
    assert [c.credential for c in change.new] == ["simulated-d-1"]
    assert not discovery.rows(runtime.journal, "prod")
    assert "simulated-d-1" not in _names(runtime)
    assert not _audits(runtime, "discovery.enrolled")
    assert not sim.tokens("d-1")


async def test_never_crossing_environments(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("prod-only", "test-prod")
    sim.add_connection("dev-only", "test-dev")
    runtime = _open(runtimes, sim, tmp_path, dev={})
    prod = await discovery.discover(runtime, "prod", first_tokens=False)
    dev = await discovery.discover(runtime, "dev", first_tokens=False)
    assert [c.connection_id for c in prod.new] == ["prod-only"]
    assert [c.connection_id for c in dev.new] == ["dev-only"]
    assert "simulated-dev-only" not in _names(runtime, "prod")
    assert "simulated-prod-only" not in _names(runtime, "dev")


async def test_the_configuration_wins(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("cfg-1", "test-prod")
    sim.add_connection("new-1", "test-prod")
    runtime = _open(runtimes, sim, tmp_path, credentials=[
        {"name": "hand-made", "connection_id": "cfg-1", "schedule": {"interval": "2d"}},
        {"name": "simulated-new-1", "connection_id": "elsewhere"},
    ])
    change = await discovery.discover(runtime, "prod", first_tokens=False)
    assert change.configured == ["cfg-1"]
    assert not change.new  # its name is a configured credential's
    assert change.skipped and change.skipped[0][0] == "new-1"
    cred = runtime.environments["prod"].settings.credential("hand-made", "prod")
    assert cred.schedule is not None and cred.schedule.interval is not None


async def test_discovery_off_is_an_error_that_says_where(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    envs = {"prod": _env(sim, "prod", "test-prod", tmp_path, discover=None)}
    runtime = runtimes.open(make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", envs))
    with pytest.raises(ConfigError, match="not enabled") as caught:
        await discovery.discover(runtime, "prod")
    assert caught.value.where == "environments.prod.discover.enabled"


async def test_a_webhook_about_a_new_connection_enrols_it(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    os.environ["DISC_WEBHOOK_SECRET"] = "disc-webhook-secret"
    envs = {"prod": _env(sim, "prod", "test-prod", tmp_path, discover={"enabled": True})}
    envs["prod"]["webhook"] = {"secret_env": "DISC_WEBHOOK_SECRET"}
    runtime = runtimes.open(make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", envs))
    served = await start_server(runtime)
    try:
        assert "simulated-hooked" not in served.app.state.credentials["prod"]
        sim.add_connection("hooked", "test-prod")
        body = json.dumps({"id": "w1", "event": "connection.created",
                           "connection_id": "hooked"}).encode()
        sig = hmac.new(b"disc-webhook-secret", body, hashlib.sha256).hexdigest()
        answer = await served.http.post("/v1/webhooks/makini/prod", content=body, headers={
            "content-type": "application/json", "X-Webhook-Signature": sig})
        assert answer.status_code == 200

        def done() -> WebhookEvent | None:
            with runtime.journal.reader() as s:
                row = s.query(WebhookEvent).filter_by(webhook_id="w1").one_or_none()
            return row if row is not None and row.status == DONE else None

        row = await until("the webhook processed", done, timeout_s=20)
        assert "1 new" in (row.outcome or "")
        assert "simulated-hooked" in served.app.state.credentials["prod"]
        assert sim.tokens("hooked", kind="access", status="active")
    finally:
        await stop_server(served)


async def test_one_discovery_at_a_time_across_processes(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    sim.add_connection("l-1", "test-prod")
    runtime = _open(runtimes, sim, tmp_path)
    assert runtime.journal.acquire("discover:prod", "another-replica")
    busy = await discovery.discover(runtime, "prod")
    assert busy.busy and not busy.new
    assert not discovery.rows(runtime.journal, "prod")
    runtime.journal.release("discover:prod", "another-replica")
    done = await discovery.discover(runtime, "prod", first_tokens=False)
    assert [c.connection_id for c in done.new] == ["l-1"]
    assert runtime.journal.lock_holder("discover:prod") is None


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("{platform}", "must contain {id}"),
        ("{id}-{customer}", "unknown field {customer}"),
        ("X{id}", "not a valid credential name"),
    ],
)
def test_a_bad_name_template_is_named_by_its_key(
    sim: SimServer, tmp_path: Path, template: str, said: str
) -> None:
    envs = {"prod": _env(sim, "prod", "test-prod", tmp_path,
                         discover={"enabled": True, "name_template": template})}
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", envs)
    assert "environments.prod.discover.name_template: " in caught.value.message
    assert said in caught.value.message


def test_the_discovered_schedule_is_checked_against_the_token_lifetime(
    sim: SimServer, tmp_path: Path
) -> None:
    envs = {"prod": _env(sim, "prod", "test-prod", tmp_path, discover={
        "enabled": True, "schedule": {"rotate_before_expiry": "40d"}})}
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, f"sqlite:///{tmp_path / 'j.db'}", envs)
    assert "environments.prod.discover.schedule.rotate_before_expiry" in caught.value.message


async def test_a_burst_of_connection_webhooks_lists_once(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = _open(runtimes, sim, tmp_path)
    for n in range(3):
        sim.add_connection(f"burst-{n}", "test-prod")
        body = json.dumps({"id": f"b{n}", "event": "connection.created",
                           "connection_id": f"burst-{n}"}).encode()
        assert enqueue(runtime.journal, "prod", parse_event(body), body)
    worker = WebhookWorker(runtime.config, runtime.journal, runtime.engine, runtime=runtime)
    assert await worker.run_once() == 3
    assert sim.stats()["received"]["GET /api/system/connections"] == 1
    with runtime.journal.reader() as s:
        outcomes = [r.outcome for r in s.query(WebhookEvent).order_by(WebhookEvent.id)]
    assert outcomes[0] is not None and "3 new" in outcomes[0]
    assert not any("discovered" in (o or "") for o in outcomes[1:]), outcomes
    assert {f"simulated-burst-{n}" for n in range(3)} <= _names(runtime)
    # two connections go away: two events, one listing, both off-boarded
    for n in range(2):
        sim.remove_connection(f"burst-{n}")
        body = json.dumps({"id": f"d{n}", "event": "connection.deleted",
                           "connection_id": f"burst-{n}"}).encode()
        assert enqueue(runtime.journal, "prod", parse_event(body), body)
    assert await worker.run_once() == 2
    assert sim.stats()["received"]["GET /api/system/connections"] == 2
    with runtime.journal.reader() as s:
        rows = list(s.query(WebhookEvent).filter(WebhookEvent.webhook_id.in_(["d0", "d1"]))
                    .order_by(WebhookEvent.id))
    assert "2 gone" in (rows[0].outcome or "") and "covered" in (rows[1].outcome or "")
    assert runtime.environments["prod"].settings.offboarded == {
        "simulated-burst-0", "simulated-burst-1"}
