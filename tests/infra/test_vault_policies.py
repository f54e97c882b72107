"""The shipped Vault policies, for real: ``infra/policies/vault/{prod,dev}.hcl`` are loaded into
an OpenBao dev server under the names their headers give (``makini-rotator-<env>``), a token is
minted holding each one (plus ``default``, as the Kubernetes auth role in the header hands out),
and the ``vault`` backend runs with that token on its *default* mount and ``path_prefix``, so
the paths are the ones the backend really uses.

Each environment's token must be able to do everything the rotator does in its own location
(stage, promote, read, make unreadable, list, check, delete) and nothing at all in the other
environment's location (every operation: :class:`~rotator.errors.BackendPermissionDenied`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from backends.vault import VaultBackend, VaultSettings
from rotator.errors import BackendPermissionDenied
from rotator.model import Stage
from tests.backends.contract import error_texts, make_version
from tests.infra._infra import ENVS, POLICIES
from tests.servers.openbao_server import OpenBaoServer

VAULT_POLICIES = POLICIES / "vault"

# What the vault backend calls, per KV v2 path family (backends/vault.py, module docstring):
# data: write a version with check-and-set (create/update), read one; metadata: create it with
# max_versions and ownership (create/update), read, merge-patch the stage records (patch), list,
# delete the credential; destroy: make a version unreadable.
NEEDS: dict[str, set[str]] = {
    "data": {"create", "read", "update"},
    "metadata": {"create", "read", "update", "patch", "list", "delete"},
    "destroy": {"update"},
}


def other(env: str) -> str:
    return next(e for e in ENVS if e != env)


def policy_name(env: str) -> str:
    return f"makini-rotator-{env}"


@dataclass
class EnvToken:
    env: str
    token: str
    token_env: str
    url: str

    def backend(self, environment: str) -> VaultBackend:
        """The vault backend as configured in production (default mount and path_prefix), for
        ``environment``, authenticating with this token."""
        settings = VaultSettings(
            url=self.url, name="vault", auth={"method": "token", "token_env": self.token_env}
        )
        return VaultBackend(settings, environment)


@pytest.fixture
def tokens(openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, EnvToken]:
    root = openbao.client()
    out = {}
    for env in ENVS:
        text = (VAULT_POLICIES / f"{env}.hcl").read_text()
        root.sys.create_or_update_policy(name=policy_name(env), policy=text)
        created = root.auth.token.create(policies=[policy_name(env)], ttl="15m")
        token = str(created["auth"]["client_token"])
        token_env = f"TEST_VAULT_TOKEN_{env.upper()}"
        monkeypatch.setenv(token_env, token)
        out[env] = EnvToken(env, token, token_env, openbao.url)
    return out


@pytest.fixture
def root_backends(openbao: OpenBaoServer) -> Iterator[Callable[[str], VaultBackend]]:
    """The backend with the root token (to set up and look behind the policies)."""
    client = openbao.client()

    def make(environment: str) -> VaultBackend:
        return VaultBackend(
            VaultSettings(url=openbao.url, name="vault"), environment, client=client
        )

    yield make
    client.adapter.close()


@pytest.fixture
def cred(unique_prefix: str) -> str:
    return f"{unique_prefix}-acme-sap"


def capabilities(openbao: OpenBaoServer, token: str, paths: list[str]) -> dict[str, set[str]]:
    """What the server says ``token`` may do on each path (``sys/capabilities``)."""
    root = openbao.client()
    try:
        answer: dict[str, Any] = root.adapter.post(
            "/v1/sys/capabilities", json={"token": token, "paths": paths}
        )
    finally:
        root.adapter.close()
    return {p: set(answer[p]) for p in paths}


def missing_capabilities(openbao: OpenBaoServer, token: str, env: str, cred: str) -> list[str]:
    paths = {family: f"secret/{family}/makini/{env}/{cred}" for family in NEEDS}
    held = capabilities(openbao, token, list(paths.values()))
    out = []
    for family, path in paths.items():
        lacking = NEEDS[family] - held[path]
        if lacking:
            out.append(f"{path}: {', '.join(sorted(lacking))}")
    return out


@pytest.mark.parametrize("env", ENVS)
def test_the_policy_loads_and_the_token_holds_it(
    env: str, tokens: dict[str, EnvToken], openbao: OpenBaoServer
) -> None:
    root = openbao.client()
    stored = root.sys.read_policy(name=policy_name(env))["data"]["rules"]
    assert stored == (VAULT_POLICIES / f"{env}.hcl").read_text()
    looked_up = root.auth.token.lookup(tokens[env].token)["data"]
    assert sorted(looked_up["policies"]) == ["default", policy_name(env)]
    # the backend's default location is the one the policy names
    settings = VaultSettings(url=openbao.url)
    assert settings.location(env) == f"{openbao.url}/v1/secret/data/makini/{env}"
    root.adapter.close()


@pytest.mark.parametrize("env", ENVS)
def test_the_policy_grants_every_capability_the_backend_uses(
    env: str, tokens: dict[str, EnvToken], openbao: OpenBaoServer, cred: str
) -> None:
    """A diagnosis for the test below: which capability, on which path, is missing."""
    assert missing_capabilities(openbao, tokens[env].token, env, cred) == []
    # and none at all in the other environment
    paths = [f"secret/{family}/makini/{other(env)}/{cred}" for family in NEEDS]
    held = capabilities(openbao, tokens[env].token, paths)
    assert held == {path: {"deny"} for path in paths}


@pytest.mark.parametrize("env", ENVS)
def test_the_token_does_everything_in_its_own_environment(
    env: str, tokens: dict[str, EnvToken], openbao: OpenBaoServer, cred: str
) -> None:
    backend = tokens[env].backend(env)
    v1, v2 = make_version(env, cred), make_version(env, cred)

    def step(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BackendPermissionDenied as exc:
            lacking = missing_capabilities(openbao, tokens[env].token, env, cred)
            pytest.fail(
                f"{policy_name(env)} cannot {what}: {exc.message}\n"
                f"capabilities the backend needs and the policy lacks: {lacking}"
            )

    try:
        step("check", backend.check)
        step("stage", lambda: backend.stage_pending(v1))
        step("promote", lambda: backend.promote(cred, v1.version_id))
        current = step("read", lambda: backend.read(cred, Stage.CURRENT))
        assert current is not None and current.version_id == v1.version_id
        assert current.tokens.access == v1.tokens.access
        step("stage", lambda: backend.stage_pending(v2))
        pending = step("read", lambda: backend.read(cred, Stage.PENDING))
        assert pending is not None and pending.version_id == v2.version_id
        step("promote", lambda: backend.promote(cred, v2.version_id))
        previous = step("read", lambda: backend.read(cred, Stage.PREVIOUS))
        assert previous is not None and previous.version_id == v1.version_id
        step("make unreadable", lambda: backend.make_unreadable(cred, v1.version_id))
        assert step("read", lambda: backend.read_version(cred, v1.version_id)) is None
        listed = {i.version_id: i for i in step("list versions", lambda: backend.versions(cred))}
        assert not listed[v1.version_id].readable and listed[v2.version_id].readable
        assert cred in step("list credentials", backend.credentials)
        step("delete", lambda: backend.delete(cred))
        assert step("read", lambda: backend.read(cred, Stage.CURRENT)) is None
        assert cred not in step("list credentials", backend.credentials)
    finally:
        backend.close()


@pytest.mark.parametrize("env", ENVS)
def test_the_token_is_refused_every_operation_in_the_other_environment(
    env: str,
    tokens: dict[str, EnvToken],
    root_backends: Callable[[str], VaultBackend],
    cred: str,
) -> None:
    foreign = other(env)
    owner = root_backends(foreign)  # something real to be refused: a promoted version
    theirs = make_version(foreign, cred)
    owner.stage_pending(theirs)
    owner.promote(cred, theirs.version_id)

    intruder = tokens[env].backend(foreign)  # env's token, aimed at the other location
    attempts: dict[str, Callable[[], object]] = {
        "stage": lambda: intruder.stage_pending(make_version(foreign, cred)),
        "promote": lambda: intruder.promote(cred, theirs.version_id),
        "read": lambda: intruder.read(cred, Stage.CURRENT),
        "read version": lambda: intruder.read_version(cred, theirs.version_id),
        "versions": lambda: intruder.versions(cred),
        "make unreadable": lambda: intruder.make_unreadable(cred, theirs.version_id),
        "delete": lambda: intruder.delete(cred),
        "credentials": intruder.credentials,
        "check": intruder.check,
    }
    try:
        for what, attempt in attempts.items():
            with pytest.raises(BackendPermissionDenied) as info:
                attempt()
            error = info.value
            assert f"/makini/{foreign}" in (error.where or ""), what
            assert "refused" in error.message and error.hint, what
            assert tokens[env].token not in error_texts(error), what
    finally:
        intruder.close()

    # and nothing changed there
    current = owner.read(cred, Stage.CURRENT)
    assert current is not None and current.version_id == theirs.version_id
    assert [i.version_id for i in owner.versions(cred)] == [theirs.version_id]
    owner.delete(cred)
