"""An off-boarded credential (its connection gone at Makini) is issued no token by any path:
``rotator rotate`` and ``verify`` refuse it, saying what, where and what to do next; the engine
refuses it whether asked by a person, the admin API or the schedule; a revoke kills and purges it
without a replacement. And ``rotator keys create`` takes enrolled credentials by name."""

from __future__ import annotations

import json
from pathlib import Path

from rotator.crypto import generate_key
from rotator.journal.schema import WebhookEvent
from rotator.keys import create_key
from rotator.makini.sim import SimServer
from rotator.revoke import Revoker, RevokeRequest
from rotator.rotation import discovery
from rotator.rotation.runtime import Runtime
from rotator.rotation.work import Work
from rotator.webhooks.queue import IGNORED, WebhookWorker, enqueue, parse_event
from tests.api.conftest import bearer, start_server, stop_server
from tests.cli import RotatorCli
from tests.discovery.test_discovery import _open
from tests.factories import Runtimes, config_toml, environment_table, file_backend

GONE = "simulated-c-gone"


async def _offboarded(sim: SimServer, runtimes: Runtimes, tmp_path: Path) -> Runtime:
    sim.add_connection("c-gone", "test-prod")
    sim.add_connection("c-kept", "test-prod")
    runtime = _open(runtimes, sim, tmp_path)
    await discovery.discover(runtime, "prod")
    sim.remove_connection("c-gone")
    change = await discovery.discover(runtime, "prod")
    assert [c.credential for c in change.gone] == [GONE]
    return runtime


async def test_the_engine_issues_no_token_for_an_offboarded_credential(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await _offboarded(sim, runtimes, tmp_path)
    issued = len(sim.tokens("c-gone"))
    manual, scheduled, returned = await runtime.engine.rotate_many(
        [Work("prod", GONE, "manual", forced=True), Work("prod", GONE, "scheduled"),
         Work("prod", GONE, "discovered again", forced=True)],
        actor="someone",
    )
    for result in (manual, scheduled, returned):
        assert result.outcome == "failed" and not result.ok
        assert result.error is not None
        assert "off-boarded" in result.error and "c-gone" in result.error
        assert "gone at Makini since" in result.error
        assert "rotator discover prod" in result.error
    assert len(sim.tokens("c-gone")) == issued  # Makini was not asked
    assert runtime.journal.open_rotations() == []
    # the one still listed rotates as ever
    [kept] = await runtime.engine.rotate_many(
        [Work("prod", "simulated-c-kept", "manual", forced=True)], actor="someone")
    assert kept.outcome == "rotated"


async def test_another_process_offboarded_it_meanwhile(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    """This runtime last saw it enrolled; the journal says it is off-boarded now."""
    runtime = await _offboarded(sim, runtimes, tmp_path)
    rt = runtime.environments["prod"]
    cred = rt.settings.credential(GONE, "prod")
    # as a replica that refreshed before the off-boarding would hold it
    rt.settings = rt.settings.with_discovered(
        [c for c in rt.settings.credentials if c not in rt.settings.configured_credentials],
        set(),
    )
    assert GONE not in rt.settings.offboarded
    assert rt.settings.credential(GONE, "prod") == cred
    [result] = await runtime.engine.rotate_many([Work("prod", GONE, "api", forced=True)],
                                                actor="admin")
    assert result.outcome == "failed" and "off-boarded" in (result.error or "")


async def test_the_admin_api_refuses_it_with_409(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await _offboarded(sim, runtimes, tmp_path)
    _, key = create_key(runtime.journal, "prod", "ops", admin=True)
    issued = len(sim.tokens("c-gone"))
    served = await start_server(runtime)
    try:
        answer = await served.http.post(f"/v1/admin/rotate/prod/{GONE}", headers=bearer(key))
        assert answer.status_code == 409, answer.text
        body = answer.json()
        text = json.dumps(body)
        assert "offboarded" in text and "gone at Makini" in text
        assert "rotator discover prod" in text
        kept = await served.http.post("/v1/admin/rotate/prod/simulated-c-kept",
                                      headers=bearer(key))
        assert kept.status_code == 200 and kept.json()["outcome"] == "rotated"
    finally:
        await stop_server(served)
    assert len(sim.tokens("c-gone")) == issued


async def test_a_revoke_asks_for_no_replacement(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await _offboarded(sim, runtimes, tmp_path)
    service = Revoker(runtime.engine)
    req = RevokeRequest(environment="prod", names=(GONE,), reason="leaked", actor="someone")
    [p] = await service.plan(req)
    assert not p.replace
    assert any("off-boarded" in w and "no replacement is asked for" in w for w in p.warnings)
    # the kill (issuing by default) is all Makini is asked: it refuses a deleted connection
    [report] = await service.run(req, [p])
    assert report.outcome != "done" and "Connection not found" in (report.error or "")
    assert report.replacement_version is None
    [kept] = await service.plan(RevokeRequest(
        environment="prod", names=("simulated-c-kept",), reason="leaked", actor="someone"))
    assert kept.replace


def _cli(tmp_path: Path, sim: SimServer) -> RotatorCli:
    prod = environment_table(
        sim.url, "test-prod", [{"name": "configured", "connection_id": "c-conf"}],
        sealing_env="DISC_SEAL", secret_env="DISC_SECRET",
        backends=[file_backend("files/prod", "keys/prod-file.key")],
    )
    prod["discover"] = {"enabled": True, "name_template": "{company}-{id}"}
    text = config_toml({"url": "sqlite:///journal.db"}, {"prod": prod})
    return RotatorCli(tmp_path, text, {"DISC_SEAL": generate_key(),
                                       "DISC_SECRET": "test-prod-secret"})


def test_rotate_and_verify_refuse_an_offboarded_credential(
    tmp_path: Path, sim: SimServer
) -> None:
    sim.add_connection("cli-gone", "test-prod", company="Acme")
    sim.add_connection("cli-kept", "test-prod", company="Acme")
    sim.add_connection("c-conf", "test-prod", company="Conf")
    cli = _cli(tmp_path, sim)
    assert cli("discover", "prod").returncode == 0
    sim.remove_connection("cli-gone")
    assert cli("discover", "prod").returncode == 0
    issued = len(sim.tokens("cli-gone"))
    for command in (("rotate", "prod", "acme-cli-gone"), ("verify", "prod", "acme-cli-gone")):
        out = cli(*command)
        assert out.returncode != 0, out.stdout
        said = " ".join(out.stderr.split())
        assert "'acme-cli-gone' is off-boarded" in said
        assert "connection cli-gone is gone at Makini since" in said
        assert "prod/acme-cli-gone" in said  # where
        assert "rotator discover prod" in said  # what next
        assert "Traceback" not in out.stderr
    assert len(sim.tokens("cli-gone")) == issued
    rotated = cli("rotate", "prod", "acme-cli-kept", "--json")
    assert rotated.returncode == 0, rotated.stderr
    # still readable during its grace
    assert cli("get", "prod", "acme-cli-gone").returncode == 0


def test_keys_create_takes_enrolled_credentials_and_names_the_known_ones(
    tmp_path: Path, sim: SimServer
) -> None:
    sim.add_connection("k-1", "test-prod", company="Acme")
    sim.add_connection("c-conf", "test-prod", company="Conf")
    cli = _cli(tmp_path, sim)
    assert cli("discover", "prod").returncode == 0
    made = cli("keys", "create", "prod", "--name", "svc", "--credentials",
               "acme-k-1,configured", "--json")
    assert made.returncode == 0, made.stderr
    assert sorted(json.loads(made.stdout)["credentials"]) == ["acme-k-1", "configured"]
    wrong = cli("keys", "create", "prod", "--name", "svc2", "--credentials", "acme-k-2,configured")
    assert wrong.returncode != 0
    said = " ".join(wrong.stderr.split())
    assert "has no credential 'acme-k-2'" in said
    assert "did you mean acme-k-1?" in said
    assert "known credentials: configured, acme-k-1" in said
    assert "Traceback" not in wrong.stderr
    listed = cli("keys", "list", "--json")
    assert [k["name"] for k in json.loads(listed.stdout)] == ["svc"]


async def test_a_webhook_about_an_offboarded_connection_does_nothing(
    sim: SimServer, runtimes: Runtimes, tmp_path: Path
) -> None:
    runtime = await _offboarded(sim, runtimes, tmp_path)
    calls = sim.stats()["received"]
    worker = WebhookWorker(runtime.config, runtime.journal, runtime.engine, runtime=runtime)
    for n, event in enumerate(("connection.token.failed", "connection.auth_required")):
        body = json.dumps({"id": f"o{n}", "event": event, "connection_id": "c-gone"}).encode()
        assert enqueue(runtime.journal, "prod", parse_event(body), body)
    assert await worker.run_once() == 2
    with runtime.journal.reader() as s:
        rows = list(s.query(WebhookEvent).order_by(WebhookEvent.id))
    assert [r.status for r in rows] == [IGNORED, IGNORED]
    assert all("'simulated-c-gone' is off-boarded" in (r.outcome or "") for r in rows)
    state = runtime.journal.state("prod", GONE)
    assert state is None or state.attention is None  # no person is called for a gone one
    assert sim.stats()["received"] == calls  # Makini was not asked anything
