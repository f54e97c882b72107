"""Vault backend against a real OpenBao dev server: the contract suite and what is particular
to Vault (KV versions and metadata records, policies, auth methods, errors)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backends.base import Backend
from backends.vault import (
    KEY_PROMOTED,
    KEY_RETIRED,
    KEY_VERSION,
    VaultBackend,
    VaultSettings,
)
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendPermissionDenied,
    BackendUnavailable,
)
from rotator.model import MANAGED_BY, Stage
from tests.backends.contract import (
    BackendContract,
    BackendFactory,
    MakeBackend,
    error_texts,
    make_version,
)
from tests.servers.canned import CannedServer
from tests.servers.openbao_server import OpenBaoServer

CRED = "acme-sap"


@pytest.fixture
def vault_settings(openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch,
                   unique_prefix: str) -> VaultSettings:
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    return VaultSettings(url=openbao.url, path_prefix=f"{unique_prefix}/makini/{{environment}}")


class TestVaultContract(BackendContract):
    @pytest.fixture
    def make_backend(self, vault_settings: VaultSettings) -> Iterator[MakeBackend]:
        with BackendFactory(lambda env: VaultBackend(vault_settings, env)) as make:
            yield make


# --- Vault specifics ------------------------------------------------------------------------


@pytest.fixture
def prod(vault_settings: VaultSettings) -> Iterator[VaultBackend]:
    backend = VaultBackend(vault_settings, "prod")
    yield backend
    backend.close()


@pytest.fixture
def root(openbao: OpenBaoServer) -> Any:
    return openbao.client()


def path_of(backend: VaultBackend, cred: str = CRED) -> str:
    settings = backend.settings
    assert isinstance(settings, VaultSettings)
    return f"{settings.path_prefix.replace('{environment}', backend.environment)}/{cred}"


def metadata(root: Any, backend: VaultBackend, cred: str = CRED) -> dict[str, Any]:
    answer = root.secrets.kv.v2.read_secret_metadata(path=path_of(backend, cred))
    data: dict[str, Any] = answer["data"]
    return data


def assert_names_backend(error: BackendError, backend: Backend) -> None:
    assert error.backend == backend.name
    assert error.location == backend.location
    assert error.where and backend.location in error.where
    assert error.hint, "say what to do next"


def dev_only_policy(unique_prefix: str) -> str:
    """The least-privilege policy of the dev environment's rotator (see the module docs)."""
    base = f"{unique_prefix}/makini/dev"
    return f"""
path "secret/data/{base}/*"     {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/{base}/*" {{ capabilities = ["create", "read", "update", "patch", "list",
                                                  "delete"] }}
path "secret/destroy/{base}/*"  {{ capabilities = ["update"] }}
"""


def test_layout_kv_versions_and_metadata_records(prod: VaultBackend, root: Any) -> None:
    v1, v2 = make_version("prod", CRED), make_version("prod", CRED)
    for v in (v1, v2):
        prod.stage_pending(v)
        prod.promote(CRED, v.version_id)
    meta = metadata(root, prod)
    assert meta["current_version"] == 2 and meta["max_versions"] == 20
    custom = meta["custom_metadata"]
    assert custom["managed-by"] == MANAGED_BY
    assert custom["makini-rotator:environment"] == "prod"
    assert custom[f"{KEY_VERSION}1"] == v1.version_id
    assert custom[f"{KEY_VERSION}2"] == v2.version_id
    assert int(custom[f"{KEY_PROMOTED}2"]) > int(custom[f"{KEY_PROMOTED}1"])
    data = root.secrets.kv.v2.read_secret_version(path=path_of(prod), version=1,
                                                  raise_on_deleted_version=False)["data"]["data"]
    assert data == v1.to_document()


def test_make_unreadable_destroys_the_kv_version(prod: VaultBackend, root: Any) -> None:
    v1, v2 = make_version("prod", CRED), make_version("prod", CRED)
    for v in (v1, v2):
        prod.stage_pending(v)
        prod.promote(CRED, v.version_id)
    prod.make_unreadable(CRED, v1.version_id)
    meta = metadata(root, prod)
    assert meta["versions"]["1"]["destroyed"] is True
    assert f"{KEY_RETIRED}1" in meta["custom_metadata"]
    assert prod.read_version(CRED, v1.version_id) is None
    assert VaultBackend.capabilities.destroys


def test_a_crash_after_the_data_write_is_finished_by_the_retry(prod: VaultBackend,
                                                               root: Any) -> None:
    v1, v2 = make_version("prod", CRED), make_version("prod", CRED)
    prod.stage_pending(v1)
    # v2's data was written (check-and-set on version 1), then the process died
    root.secrets.kv.v2.create_or_update_secret(path=path_of(prod), secret=v2.to_document(), cas=1)
    pending = prod.read(CRED, Stage.PENDING)
    assert pending is not None and pending.version_id == v2.version_id
    prod.stage_pending(v2)  # the engine retries the step: no second KV version
    meta = metadata(root, prod)
    assert meta["current_version"] == 2
    assert meta["custom_metadata"][f"{KEY_VERSION}2"] == v2.version_id
    prod.promote(CRED, v2.version_id)
    current = prod.read(CRED)
    assert current is not None and current.version_id == v2.version_id


def test_versions_kv_pruned_are_forgotten(vault_settings: VaultSettings, root: Any) -> None:
    backend = VaultBackend(vault_settings.model_copy(update={"max_versions": 3}), "prod")
    made = [make_version("prod", CRED) for _ in range(5)]
    for v in made:
        backend.stage_pending(v)
    assert [i.version_id for i in backend.versions(CRED)] == [v.version_id for v in made[2:]]
    custom = metadata(root, backend)["custom_metadata"]
    assert f"{KEY_VERSION}1" not in custom and f"{KEY_VERSION}2" not in custom


def test_policy_confines_a_token_to_its_environment(openbao: OpenBaoServer,
                                                    vault_settings: VaultSettings,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    unique_prefix: str) -> None:
    token = openbao.token_with_policy(f"rotator-dev-{unique_prefix}",
                                      dev_only_policy(unique_prefix))
    monkeypatch.setenv("VAULT_TOKEN", token)
    dev = VaultBackend(vault_settings, "dev")
    v = make_version("dev", CRED)
    dev.stage_pending(v)
    dev.promote(CRED, v.version_id)
    dev.make_unreadable(CRED, v.version_id)
    assert dev.credentials() == [CRED]
    dev.check()
    dev.delete(CRED)

    prod = VaultBackend(vault_settings, "prod")
    attempts: list[Callable[[], object]] = [
        lambda: prod.stage_pending(make_version("prod", CRED)),
        lambda: prod.read(CRED), prod.check, prod.credentials]
    for attempt in attempts:
        with pytest.raises(BackendPermissionDenied) as info:
            attempt()
        assert "/makini/prod" in (info.value.where or "")
        assert "refused" in info.value.message
        assert_names_backend(info.value, prod)
        assert token not in error_texts(info.value)


def test_foreign_environment_secret_is_refused(prod: VaultBackend, root: Any) -> None:
    kv = root.secrets.kv.v2
    kv.update_metadata(path=path_of(prod), custom_metadata={
        "managed-by": MANAGED_BY, "makini-rotator:environment": "dev"})
    kv.create_or_update_secret(path=path_of(prod), secret={"x": "y"})
    attempts: list[Callable[[], object]] = [
        lambda: prod.stage_pending(make_version("prod", CRED)),
        lambda: prod.read(CRED), lambda: prod.delete(CRED)]
    for attempt in attempts:
        with pytest.raises(BackendConflict) as info:
            attempt()
        assert "'dev'" in info.value.message
        assert_names_backend(info.value, prod)
    assert prod.credentials() == []


def test_unmanaged_secret_is_refused_and_never_deleted(prod: VaultBackend, root: Any) -> None:
    root.secrets.kv.v2.create_or_update_secret(path=path_of(prod), secret={"password": "x"})
    with pytest.raises(BackendConflict) as info:
        prod.stage_pending(make_version("prod", CRED))
    assert "does not manage" in info.value.message
    with pytest.raises(BackendConflict):
        prod.delete(CRED)
    assert metadata(root, prod)["current_version"] == 1
    assert prod.credentials() == []


def test_approle_login_and_close_revokes_the_minted_token(
    openbao: OpenBaoServer, root: Any, vault_settings: VaultSettings,
    monkeypatch: pytest.MonkeyPatch, unique_prefix: str,
) -> None:
    mount = f"approle-{unique_prefix}"
    root.sys.enable_auth_method("approle", path=mount)
    root.sys.create_or_update_policy(name=f"p-{unique_prefix}",
                                     policy=dev_only_policy(unique_prefix))
    root.auth.approle.create_or_update_approle("rotator", token_policies=[f"p-{unique_prefix}"],
                                               token_ttl="1h", mount_point=mount)
    role_id = root.auth.approle.read_role_id("rotator", mount_point=mount)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("rotator",
                                                     mount_point=mount)["data"]["secret_id"]
    monkeypatch.setenv("TEST_ROLE_ID", role_id)
    monkeypatch.setenv("TEST_SECRET_ID", secret_id)
    settings = vault_settings.model_copy(update={"auth": VaultSettings.model_validate({
        "url": openbao.url, "auth": {"method": "approle", "role_id_env": "TEST_ROLE_ID",
                                     "secret_id_env": "TEST_SECRET_ID", "mount_point": mount},
    }).auth})
    backend = VaultBackend(settings, "dev")
    v = make_version("dev", CRED)
    backend.stage_pending(v)
    backend.promote(CRED, v.version_id)
    assert backend.minted_token
    token = backend._client().token
    assert root.auth.token.lookup(token)["data"]["policies"] == ["default", f"p-{unique_prefix}"]
    backend.close()
    with pytest.raises(Exception, match=r"bad token|invalid"):
        root.auth.token.lookup(token)


def test_a_minted_token_is_renewed_before_it_expires(
    openbao: OpenBaoServer, root: Any, vault_settings: VaultSettings,
    monkeypatch: pytest.MonkeyPatch, unique_prefix: str,
) -> None:
    mount = f"approle-{unique_prefix}"
    root.sys.enable_auth_method("approle", path=mount)
    root.sys.create_or_update_policy(name=f"p-{unique_prefix}",
                                     policy=dev_only_policy(unique_prefix))
    root.auth.approle.create_or_update_approle("rotator", token_policies=[f"p-{unique_prefix}"],
                                               token_ttl="1s", token_max_ttl="1s",
                                               mount_point=mount)
    monkeypatch.setenv("TEST_ROLE_ID", root.auth.approle.read_role_id(
        "rotator", mount_point=mount)["data"]["role_id"])
    monkeypatch.setenv("TEST_SECRET_ID", root.auth.approle.generate_secret_id(
        "rotator", mount_point=mount)["data"]["secret_id"])
    settings = VaultSettings.model_validate({
        "url": openbao.url, "path_prefix": vault_settings.path_prefix,
        "auth": {"method": "approle", "role_id_env": "TEST_ROLE_ID",
                 "secret_id_env": "TEST_SECRET_ID", "mount_point": mount},
    })
    backend = VaultBackend(settings, "dev")
    backend.check()
    first = backend._client().token
    time.sleep(0.9)
    backend.check()  # would fail with the first token's expiry; logs in again instead
    assert backend._client().token != first
    backend.close()


def test_a_static_token_is_not_revoked(openbao: OpenBaoServer, root: Any,
                                       vault_settings: VaultSettings,
                                       monkeypatch: pytest.MonkeyPatch, unique_prefix: str) -> None:
    token = openbao.token_with_policy(f"rotator-dev-{unique_prefix}",
                                      dev_only_policy(unique_prefix))
    monkeypatch.setenv("VAULT_TOKEN", token)
    backend = VaultBackend(vault_settings, "dev")
    backend.check()
    assert not backend.minted_token
    backend.close()
    assert root.auth.token.lookup(token)["data"]["id"] == token


def test_missing_token_variable(vault_settings: VaultSettings,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAULT_TOKEN")
    backend = VaultBackend(vault_settings, "prod")
    with pytest.raises(BackendPermissionDenied) as info:
        backend.read(CRED)
    assert "VAULT_TOKEN is not set" in info.value.message


def test_kubernetes_auth_without_a_service_account_token(openbao: OpenBaoServer,
                                                         tmp_path: Path) -> None:
    settings = VaultSettings.model_validate({
        "url": openbao.url,
        "auth": {"method": "kubernetes", "role": "rotator", "jwt_path": str(tmp_path / "none")},
    })
    with pytest.raises(BackendPermissionDenied) as info:
        VaultBackend(settings, "prod").check()
    assert info.value.where == str(tmp_path / "none")
    assert info.value.hint and "service account" in info.value.hint


def test_a_service_account_token_that_is_not_text_is_named(openbao: OpenBaoServer,
                                                           tmp_path: Path) -> None:
    # binary data raised UnicodeDecodeError out of the backend before (an "internal error")
    jwt = tmp_path / "token"
    jwt.write_bytes(b"\xff\xfe\x00\x81binary")
    settings = VaultSettings.model_validate({
        "url": openbao.url,
        "auth": {"method": "kubernetes", "role": "rotator", "jwt_path": str(jwt)},
    })
    with pytest.raises(BackendPermissionDenied) as info:
        VaultBackend(settings, "prod").check()
    assert f"{jwt} (auth.jwt_path): it is not text" in info.value.message
    assert info.value.hint and "service account" in info.value.hint


def test_kubernetes_auth_refused_by_the_server(openbao: OpenBaoServer, tmp_path: Path) -> None:
    jwt = tmp_path / "token"
    jwt.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyb3RhdG9yIn0.c2lnbmF0dXJl\n")
    settings = VaultSettings.model_validate({
        "url": openbao.url,
        "auth": {"method": "kubernetes", "role": "rotator", "jwt_path": str(jwt)},
    })
    with pytest.raises(BackendError) as info:
        VaultBackend(settings, "prod").check()
    assert "auth kubernetes" in (info.value.where or "")
    assert "eyJ" not in error_texts(info.value)


def test_unreachable_vault_is_unavailable(closed_port_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-a-real-token-but-long-enough")
    backend = VaultBackend(VaultSettings(url=closed_port_url, timeout_s=2), "prod")
    with pytest.raises(BackendUnavailable) as info:
        backend.read(CRED)
    assert "cannot reach Vault" in info.value.message
    assert_names_backend(info.value, backend)


def test_sealed_vault_is_unavailable(canned: CannedServer,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.not-a-real-token-but-long-enough")
    canned.respond(503, '{"errors": ["Vault is sealed"]}')
    backend = VaultBackend(VaultSettings(url=canned.url), "prod")
    with pytest.raises(BackendUnavailable) as info:
        backend.read(CRED)
    assert info.value.hint and "unseal" in info.value.hint


def test_a_missing_mount_is_named(vault_settings: VaultSettings) -> None:
    backend = VaultBackend(vault_settings.model_copy(update={"mount": "nothing-here"}), "prod")
    with pytest.raises(BackendError) as info:
        backend.read(CRED)
    assert "no such mount" in info.value.message
    assert info.value.hint and "mount" in info.value.hint


def test_settings_and_location(tmp_path: Path) -> None:
    settings = VaultSettings.model_validate({
        "url": "https://vault.example:8200/", "namespace": "team",
        "tls": {"ca_cert": "certs/ca.pem"},
        "auth": {"method": "kubernetes", "role": "rotator", "jwt_path": "sa/token"},
    })
    assert settings.location("prod") == "https://vault.example:8200/v1/team/secret/data/makini/prod"
    resolved = settings.resolve_paths(tmp_path)
    assert resolved.tls.ca_cert == tmp_path / "certs" / "ca.pem"
    assert resolved.auth.jwt_path == tmp_path / "sa" / "token"  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        VaultSettings(url="vault:8200")
    with pytest.raises(ValidationError):
        VaultSettings.model_validate({"url": "https://v", "auth": {"method": "ldap"}})
    with pytest.raises(ValidationError):
        VaultSettings(url="https://v", path_prefix="makini/{env}")
    with pytest.raises(ValidationError):
        VaultSettings(url="https://v", max_versions=40)


def test_an_unknown_auth_method_reads_plainly() -> None:
    with pytest.raises(ValidationError) as info:
        VaultSettings.model_validate({"url": "https://v", "auth": {"method": "ldap"}})
    assert "unknown auth method 'ldap'" in str(info.value)
    token = VaultSettings.model_validate({"url": "https://v", "auth": {"token_env": "MY_TOKEN"}})
    assert token.auth.method == "token"
