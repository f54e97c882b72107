"""End to end: one environment fanned out to the three cloud backends at once (AWS Secrets
Manager primary on moto, Vault replica on a real OpenBao, Azure Key Vault replica on the HTTPS
emulator), rotated by the engine against the Makini simulator over a real socket.

The configuration goes through :func:`rotator.settings.parse_config`, and the backends are
built by :meth:`rotator.rotation.runtime.Runtime.open` exactly as in production; what cannot
come from the file comes the way production gets it: AWS keys from the environment (boto3's
chain), the Vault token from ``VAULT_TOKEN``, the Azure credential from
:data:`backends.azure.credential_factory`.

A backend "going down" is a TCP gate in front of OpenBao that refuses connections (and cuts the
open ones) until it is switched on again, on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import backends.azure as azure_module
from backends.base import Backend
from backends.vault import VaultBackend, VaultSettings
from rotator.makini.sim import SimServer
from rotator.model import Stage, StoredVersion
from rotator.rotation.repair import PROBE_CREDENTIAL, probe, sync
from rotator.rotation.runtime import Runtime
from rotator.rotation.status import CredentialStatus, collect
from rotator.rotation.work import RotationResult, Work
from rotator.service import run_due_once
from tests.factories import Runtimes, environment, make_config
from tests.servers.aws_server import MotoServer
from tests.servers.keyvault_emulator import KeyVaultEmulator
from tests.servers.openbao_server import OpenBaoServer

pytestmark = pytest.mark.e2e

ENV = "prod"
CREDENTIALS = {"acme-sap": "fan-acme-sap", "beta_erp": "fan-beta-erp", "gamma": "fan-gamma"}
BACKENDS = ("aws", "vault", "azure")


# --- a switchable TCP gate ------------------------------------------------------------------


class Gate:
    """Forwards 127.0.0.1:<port> to a server. ``down()`` closes the listener and cuts every open
    connection (clients then get "connection refused"); ``up()`` listens on the same port again.
    ``down_when(marker)`` goes down just before forwarding a request that contains ``marker``
    (that request never reaches the server)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self.tripped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept, name="gate", daemon=True)
        self._thread.start()

    def down(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def down_when(self, marker: bytes) -> None:
        self.tripped.clear()
        self._marker = marker

    def _accept(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open |= {client, server}
            for src, dst, inspect in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, inspect), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if inspect and self._marker is not None and self._marker in chunk:
                    self._marker = None
                    self.tripped.set()
                    threading.Thread(target=self.down, daemon=True).start()
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# --- the fan-out environment ----------------------------------------------------------------


@dataclass
class Fanout:
    tmp_path: Path
    sim: SimServer
    moto: MotoServer
    openbao: OpenBaoServer
    keyvault: KeyVaultEmulator
    prefix: str
    runtimes: Runtimes
    clients: list[Any] = field(default_factory=list)

    def backend_tables(self, vault_url: str) -> list[dict[str, Any]]:
        """The three backends as they would be written in TOML."""
        return [
            {
                "type": "aws",
                "name": "aws",
                "region": "eu-west-1",
                "endpoint_url": self.moto.endpoint,
                "prefix": f"{self.prefix}/makini/{{environment}}/",
                "max_attempts": 1,
                "timeout_s": 5,
            },
            {
                "type": "vault",
                "name": "vault",
                "url": vault_url,
                "path_prefix": f"{self.prefix}/makini/{{environment}}",
                "timeout_s": 2,
            },
            {
                "type": "azure",
                "name": "azure",
                "vault_url": self.keyvault.url,
                "name_prefix": f"{self.prefix}-{{environment}}-",
                "connection_verify": str(self.keyvault.ca_path),
                "verify_challenge_resource": False,
                "retry_total": 0,
                "timeout_s": 5,
            },
        ]

    def runtime(self, vault_url: str | None = None) -> Runtime:
        envs = {
            ENV: environment(
                self.sim.url,
                "test-prod",
                [{"name": n, "connection_id": c} for n, c in CREDENTIALS.items()],
                sealing_env="SEAL_FANOUT_PROD",
                backends=self.backend_tables(vault_url or self.openbao.url),
                schedule={"interval": "1h", "grace_period": "0s"},
            )
        }
        config = make_config(
            self.tmp_path,
            f"sqlite:///{self.tmp_path / 'journal.db'}",
            envs,
            scheduler={"retry_after_failure": "0s", "concurrency": 8},
        )
        return self.runtimes.open(config)

    def direct_vault(self) -> VaultBackend:
        """The Vault replica's location, reached without the gate (to look behind it)."""
        settings = VaultSettings(
            url=self.openbao.url, name="vault", path_prefix=f"{self.prefix}/makini/{{environment}}"
        )
        client = self.openbao.client()
        self.clients.append(client)
        return VaultBackend(settings, ENV, client=client)


@pytest.fixture
async def fanout(
    tmp_path: Path,
    sim: SimServer,
    moto_server: MotoServer,
    aws_credentials: None,
    openbao: OpenBaoServer,
    keyvault: KeyVaultEmulator,
    unique_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    runtimes: Runtimes,
) -> AsyncIterator[Fanout]:
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)

    def credential(settings: azure_module.AzureSettings) -> Any:
        return keyvault.credential()

    monkeypatch.setattr(azure_module, "credential_factory", credential)
    made = Fanout(tmp_path, sim, moto_server, openbao, keyvault, unique_prefix, runtimes)
    yield made
    for client in made.clients:
        client.adapter.close()


def by_name(runtime: Runtime) -> dict[str, Backend]:
    found = {b.name: b for b in runtime.environments[ENV].backends}
    assert tuple(found) == BACKENDS, "aws is the primary, vault and azure the replicas"
    return found


async def rotate_all(runtime: Runtime) -> dict[str, RotationResult]:
    results = await runtime.engine.rotate_many(
        [Work(ENV, name, "fan-out test", forced=True) for name in CREDENTIALS], actor="test"
    )
    return {r.credential: r for r in results}


def currents(backends: list[Backend], credential: str) -> list[StoredVersion | None]:
    return [b.read(credential, Stage.CURRENT) for b in backends]


def assert_everywhere_current(
    sim: SimServer, backends: list[Backend], credential: str, version_id: str
) -> StoredVersion:
    """Every backend holds ``version_id`` as current with one and the same token, which Makini
    accepts for the credential's connection."""
    held = currents(backends, credential)
    assert all(v is not None for v in held), f"{credential}: {held}"
    versions = [v for v in held if v is not None]
    assert {v.version_id for v in versions} == {version_id}, credential
    assert len({v.tokens.access.reveal() for v in versions}) == 1, "one token everywhere"
    assert len({v.tokens.expires_at for v in versions}) == 1
    assert all(v.stage is Stage.CURRENT for v in versions)
    view = sim.token(versions[0].tokens.access.fingerprint)
    assert view is not None, "Makini issued this token"
    assert view["status"] == "active"
    assert view["kind"] == "access"
    assert view["connection_id"] == CREDENTIALS[credential]
    return versions[0]


def assert_unreadable_everywhere(
    sim: SimServer, backends: list[Backend], credential: str, old: StoredVersion
) -> None:
    for b in backends:
        assert b.read_version(credential, old.version_id) is None, b.name
        listed = {i.version_id: i for i in b.versions(credential)}
        if old.version_id in listed:  # a backend may forget it entirely; if listed, unreadable
            assert not listed[old.version_id].readable, b.name
    view = sim.token(old.tokens.access.fingerprint)
    assert view is not None and view["status"] != "active", "the old token is dead at Makini"


def assert_retired_in_each_store(fanout: Fanout, credential: str, old: StoredVersion) -> None:
    """Behind the backends, in each store's own terms: AWS keeps the version without any
    staging label, Vault has destroyed the KV version, Key Vault has disabled it."""
    import boto3

    aws = boto3.client("secretsmanager", endpoint_url=fanout.moto.endpoint, region_name="eu-west-1")
    name = f"{fanout.prefix}/makini/{ENV}/{credential}"
    listed = aws.list_secret_version_ids(SecretId=name, IncludeDeprecated=True)["Versions"]
    labels = {v["VersionId"]: v.get("VersionStages") or [] for v in listed}
    assert labels[old.version_id] == [], "kept, with no staging label"
    aws.close()

    root = fanout.openbao.client()
    meta = root.secrets.kv.v2.read_secret_metadata(path=name)["data"]
    destroyed = [
        n
        for n in meta["versions"]
        if meta["custom_metadata"].get(f"makini-rotator:version:{n}") == old.version_id
    ]
    assert destroyed and all(meta["versions"][n]["destroyed"] for n in destroyed)
    root.adapter.close()

    kv_name = f"{fanout.prefix}-{ENV}-{credential.replace('_', '-')}"
    held = [
        v
        for v in fanout.keyvault.raw_versions(kv_name)
        if v["tags"].get("makini-rotator:version") == old.version_id
    ]
    assert held and not any(v["enabled"] for v in held)


def status_of(statuses: list[CredentialStatus]) -> dict[str, CredentialStatus]:
    return {s.credential: s for s in statuses}


# --- the tests ------------------------------------------------------------------------------


async def test_rotating_twice_leaves_every_backend_with_the_same_current_token(
    fanout: Fanout, sim: SimServer
) -> None:
    runtime = fanout.runtime()
    backends = list(by_name(runtime).values())

    first = await rotate_all(runtime)
    assert {r.outcome for r in first.values()} == {"rotated"}, first
    olds = {
        name: assert_everywhere_current(sim, backends, name, str(r.version_id))
        for name, r in first.items()
    }

    second = await rotate_all(runtime)
    assert {r.outcome for r in second.values()} == {"rotated"}, second
    states = runtime.journal.states(ENV)
    for name, result in second.items():
        assert result.version_id != first[name].version_id
        assert result.step == "done", "retired at once: no grace period"
        new = assert_everywhere_current(sim, backends, name, str(result.version_id))
        assert states[(ENV, name)].current_version_id == new.version_id
        assert states[(ENV, name)].current_fingerprint == new.tokens.access.fingerprint
        assert new.tokens.access != olds[name].tokens.access
        assert_unreadable_everywhere(sim, backends, name, olds[name])
        assert_retired_in_each_store(fanout, name, olds[name])
        # what the primary says is previous is no version anyone can read any more
        for b in backends:
            previous = b.read(name, Stage.PREVIOUS)
            assert previous is None or previous.version_id != olds[name].version_id, b.name

    report = status_of(await collect(runtime, ENV))
    assert set(report) == set(CREDENTIALS)
    for name, s in report.items():
        assert s.backends == dict.fromkeys(BACKENDS, second[name].version_id)
        assert s.backends_agree and s.healthy, s


async def test_sync_repairs_a_backend_that_lost_a_credential(
    fanout: Fanout, sim: SimServer
) -> None:
    runtime = fanout.runtime()
    backends = by_name(runtime)
    results = await rotate_all(runtime)
    assert {r.outcome for r in results.values()} == {"rotated"}
    truth = str(results["acme-sap"].version_id)

    # drift: someone deletes the credential in Vault behind the rotator's back
    root = fanout.openbao.client()
    root.secrets.kv.v2.delete_metadata_and_all_versions(
        path=f"{fanout.prefix}/makini/{ENV}/acme-sap"
    )
    assert backends["vault"].read("acme-sap", Stage.CURRENT) is None

    before = status_of(await collect(runtime, ENV))
    assert not before["acme-sap"].backends_agree
    assert before["acme-sap"].backends == {"aws": truth, "vault": None, "azure": truth}
    assert before["beta_erp"].backends_agree and before["gamma"].backends_agree

    changes = await sync(runtime, ENV, actor="test")
    acted = {(c.credential, c.backend): c.action for c in changes if c.action != "in-sync"}
    assert acted == {("acme-sap", "vault"): "copied+promoted"}, changes
    assert runtime.journal.audit_entries(action="backend.synced")

    after = status_of(await collect(runtime, ENV))
    assert all(s.backends_agree and s.healthy for s in after.values()), after
    assert_everywhere_current(sim, list(backends.values()), "acme-sap", truth)
    again = await sync(runtime, ENV, actor="test")
    assert {c.action for c in again} == {"in-sync"}


async def test_doctor_probe_passes_on_all_three_backends(fanout: Fanout) -> None:
    runtime = fanout.runtime()
    results = await probe(runtime)
    assert sorted(r.backend for r in results) == sorted(BACKENDS)
    for r in results:
        assert r.ok, r.as_dict()
        assert list(r.steps) == ["reach", "write", "read", "promote", "make unreadable", "delete"]
        assert all(text.startswith("ok (") for text in r.steps.values()), r.steps
    for b in runtime.environments[ENV].backends:
        assert PROBE_CREDENTIAL not in b.credentials(), f"{b.name} kept the probe credential"


async def test_probe_with_a_vault_token_of_another_environment_reports_permission_denied(
    fanout: Fanout, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = f"{fanout.prefix}/makini/dev"
    policy = f"""
path "secret/data/{dev}/*"     {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/{dev}/*" {{ capabilities = ["create", "read", "update", "patch", "list",
                                                 "delete"] }}
path "secret/destroy/{dev}/*"  {{ capabilities = ["update"] }}
"""
    token = fanout.openbao.token_with_policy(f"fanout-dev-{fanout.prefix}", policy)
    monkeypatch.setenv("VAULT_TOKEN", token)
    runtime = fanout.runtime()

    results = {r.backend: r for r in await probe(runtime)}
    assert results["aws"].ok and results["azure"].ok
    vault = results["vault"]
    assert not vault.ok
    assert list(vault.steps) == ["reach"], "nothing is written where access is refused"
    said = vault.steps["reach"]
    assert said.startswith("FAILED: ")
    assert "Vault refused access to" in said and "permission denied" in said
    assert f"/v1/secret/data/{fanout.prefix}/makini/prod" in said, "names where"
    assert "policies do not allow this path" in said, "says what to do"
    assert token not in said and token not in str(vault.as_dict())


async def test_a_backend_down_at_staging_blocks_promotion_until_a_later_run(
    fanout: Fanout, sim: SimServer
) -> None:
    """Vault is unreachable when a rotation of every credential starts: each rotation issues,
    seals, stages to AWS and Azure, fails to stage to Vault and stops there, promoting nowhere;
    the next ``run-due`` resumes the same rotations once Vault answers again."""
    gate = Gate(("127.0.0.1", int(fanout.openbao.url.rsplit(":", 1)[1])))
    gate.up()
    try:
        runtime = fanout.runtime(vault_url=gate.url)
        first = await rotate_all(runtime)
        assert {r.outcome for r in first.values()} == {"rotated"}
        aws, _, azure = by_name(runtime).values()
        behind: list[Backend] = [aws, fanout.direct_vault(), azure]  # vault read past the gate
        olds = {
            n: assert_everywhere_current(sim, behind, n, str(r.version_id))
            for n, r in first.items()
        }

        gate.down()
        blocked = await rotate_all(runtime)
        for name, r in blocked.items():
            assert r.outcome == "deferred", r
            assert r.step == "issued", "stopped at staging"
            assert r.error and "cannot reach Vault" in r.error
            assert r.version_id is not None and r.version_id != first[name].version_id
            held = currents(behind, name)
            assert [v.version_id if v else None for v in held] == [olds[name].version_id] * 3, (
                "no backend promoted the new version"
            )
            open_rotation = runtime.journal.open_rotation(ENV, name)
            assert open_rotation is not None and open_rotation.version_id == r.version_id
            assert (
                runtime.journal.states(ENV)[(ENV, name)].current_version_id == olds[name].version_id
            )
            # the price of refusing to promote anywhere: this simulator's Makini invalidated the
            # old token when it issued the new one, so every backend now serves a dead token
            # until Vault is back (status says the backends disagree and why; no attention)
            dead = sim.token(olds[name].tokens.access.fingerprint)
            assert dead is not None and dead["status"] == "revoked"
        report = status_of(await collect(runtime, ENV))
        assert all(not s.backends_agree and not s.healthy for s in report.values())
        assert all("cannot reach Vault" in str(s.last_error) for s in report.values())
        assert all(str(s.backends["vault"]).startswith("error: ") for s in report.values())

        gate.up()
        later = {r.credential: r for r in await run_due_once(runtime)}
        assert set(later) == set(CREDENTIALS)
        for name, r in later.items():
            assert r.outcome == "rotated", r
            assert r.version_id == blocked[name].version_id, "the same rotation, resumed"
            assert_everywhere_current(sim, list(by_name(runtime).values()), name, str(r.version_id))
            assert_unreadable_everywhere(sim, behind, name, olds[name])
            assert runtime.journal.open_rotation(ENV, name) is None
        report = status_of(await collect(runtime, ENV))
        assert all(s.backends_agree and s.healthy for s in report.values()), report
    finally:
        gate.down()


async def test_a_backend_down_at_promotion_is_finished_by_a_later_run(
    fanout: Fanout, sim: SimServer
) -> None:
    """Vault goes down the moment the promotion reaches it (after staging and verify succeeded
    everywhere). The rotation stays open at ``verified``, the journal keeps the old current, the
    backends reached keep the new version as current (promotion cannot be atomic across three
    stores), status shows the disagreement, and a later run promotes it everywhere."""
    gate = Gate(("127.0.0.1", int(fanout.openbao.url.rsplit(":", 1)[1])))
    gate.up()
    try:
        runtime = fanout.runtime(vault_url=gate.url)
        first = await rotate_all(runtime)
        assert {r.outcome for r in first.values()} == {"rotated"}
        aws, _, azure = by_name(runtime).values()
        behind: list[Backend] = [aws, fanout.direct_vault(), azure]

        gate.down_when(b"makini-rotator:promoted:")
        result = await runtime.engine.rotate(ENV, "acme-sap", reason="t", actor="test")
        assert gate.tripped.is_set(), "vault went down at promotion"
        assert result.outcome == "deferred" and result.step == "verified", result
        assert (
            runtime.journal.states(ENV)[(ENV, "acme-sap")].current_version_id
            == first["acme-sap"].version_id
        ), "the journal records a promotion only once complete"
        held = {
            b.name: (v.version_id if v else None)
            for b, v in zip(behind, currents(behind, "acme-sap"), strict=True)
        }
        # promotion is not atomic across backends: the two that were reached keep the new
        # version as current (it is the one Makini accepts); Vault keeps the old one
        assert held == {
            "aws": result.version_id,
            "vault": first["acme-sap"].version_id,
            "azure": result.version_id,
        }
        report = status_of(await collect(runtime, ENV))["acme-sap"]
        assert not report.backends_agree

        gate.up()
        later = {r.credential: r for r in await run_due_once(runtime)}
        assert later["acme-sap"].outcome == "rotated", later
        assert later["acme-sap"].version_id == result.version_id
        assert_everywhere_current(sim, behind, "acme-sap", str(result.version_id))
        report = status_of(await collect(runtime, ENV))["acme-sap"]
        assert report.backends_agree and report.healthy
    finally:
        gate.down()


async def test_run_due_workers_store_into_all_three_backends(
    fanout: Fanout, sim: SimServer
) -> None:
    # run-due's forked workers (exactly what `rotator run-due` forks) each build their own AWS,
    # Vault and Azure clients after the fork, and rotate their share into all three
    from rotator.cli.rotating import rotate_share
    from rotator.rotation.workers import Shares
    from rotator.service import due_work

    runtime = fanout.runtime()
    work = await due_work(runtime)
    assert sorted(w.credential for w in work) == sorted(CREDENTIALS)
    with Shares(runtime.config, work, 2, rotate_share(None)) as shares:
        results = {r.credential: r for r in shares.gather(None)}
    assert {r.outcome for r in results.values()} == {"rotated"}, results
    backends = list(by_name(runtime).values())
    for name, result in results.items():
        assert_everywhere_current(sim, backends, name, str(result.version_id))
