"""Azure Key Vault backend: the real azure-keyvault-secrets SDK against the HTTPS emulator in
tests/servers, with the bearer challenge: the contract suite and what is particular to Key Vault
(names, tags, disabling, soft delete and purge, errors)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import backends.azure as azure_module
from backends import build
from backends.azure import (
    TAG_PROMOTED,
    TAG_RETIRED,
    TAG_STAGED,
    TAG_VERSION,
    AzureBackend,
    AzureSettings,
)
from backends.base import Backend
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendInvalidName,
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
from tests.servers.keyvault_emulator import KeyVaultEmulator

CRED = "acme_sap"


@pytest.fixture
def azure_settings(keyvault: KeyVaultEmulator, unique_prefix: str) -> AzureSettings:
    return AzureSettings(vault_url=keyvault.url, name_prefix=f"{unique_prefix}-{{environment}}-",
                         connection_verify=keyvault.ca_path, verify_challenge_resource=False)


class TestAzureContract(BackendContract):
    @pytest.fixture
    def make_backend(self, azure_settings: AzureSettings,
                     keyvault: KeyVaultEmulator) -> Iterator[MakeBackend]:
        def build(env: str) -> AzureBackend:
            return AzureBackend(azure_settings, env, credential=keyvault.credential())

        with BackendFactory(build) as make:
            yield make


# --- Key Vault specifics --------------------------------------------------------------------


@pytest.fixture
def prod(azure_settings: AzureSettings, keyvault: KeyVaultEmulator) -> Iterator[AzureBackend]:
    backend = AzureBackend(azure_settings, "prod", credential=keyvault.credential())
    yield backend
    backend.close()


def assert_names_backend(error: BackendError, backend: Backend) -> None:
    assert error.backend == backend.name
    assert error.location == backend.location
    assert error.where and backend.location.rsplit("/", 1)[0] in error.where
    assert error.hint, "say what to do next"


def rotate(backend: AzureBackend, cred: str = CRED) -> Any:
    v = make_version(backend.environment, cred)
    backend.stage_pending(v)
    backend.promote(cred, v.version_id)
    return v


def test_layout_names_tags_and_the_challenge(prod: AzureBackend,
                                             keyvault: KeyVaultEmulator) -> None:
    v1 = rotate(prod)
    v2 = make_version("prod", CRED)
    prod.stage_pending(v2)
    name = prod.secret_name(CRED)
    assert name.endswith("-prod-acme-sap")  # underscores become dashes
    raw = keyvault.raw_versions(name)
    assert [json.loads(r["value"]) for r in raw] == [v1.to_document(), v2.to_document()]
    tags = raw[0]["tags"]
    assert tags["managed-by"] == MANAGED_BY
    assert tags["makini-rotator:environment"] == "prod"
    assert tags["makini-rotator:credential"] == CRED
    assert tags[TAG_VERSION] == v1.version_id
    assert TAG_PROMOTED in tags and TAG_PROMOTED not in raw[1]["tags"]
    assert int(raw[1]["tags"][TAG_STAGED]) > int(tags[TAG_STAGED])
    assert keyvault.challenges >= 1  # the SDK went through the bearer challenge
    assert prod.credentials() == [CRED]


def test_make_unreadable_disables_the_version(prod: AzureBackend,
                                              keyvault: KeyVaultEmulator) -> None:
    v1 = rotate(prod)
    rotate(prod)
    prod.make_unreadable(CRED, v1.version_id)
    raw = keyvault.raw_versions(prod.secret_name(CRED))
    assert raw[0]["enabled"] is False and TAG_RETIRED in raw[0]["tags"]
    assert json.loads(raw[0]["value"])["version"] == v1.version_id  # disabled, not destroyed
    assert prod.read_version(CRED, v1.version_id) is None
    assert prod.read(CRED, Stage.PREVIOUS) is None
    assert not AzureBackend.capabilities.destroys


def test_names_that_cannot_map_are_refused(prod: AzureBackend, keyvault: KeyVaultEmulator,
                                           azure_settings: AzureSettings) -> None:
    rotate(prod, "a_b")
    with pytest.raises(BackendInvalidName) as info:
        prod.stage_pending(make_version("prod", "a-b"))
    assert "'a_b'" in info.value.message and "rename" in (info.value.hint or "")
    with pytest.raises(BackendInvalidName):
        prod.read("a-b")
    long_prefix = azure_settings.model_copy(update={"name_prefix": "p" * 70 + "-{environment}-"})
    backend = AzureBackend(long_prefix, "prod", credential=keyvault.credential())
    with pytest.raises(BackendInvalidName) as info:
        backend.stage_pending(make_version("prod", "c" * 60))
    assert "127" in (info.value.hint or "")
    assert len(keyvault.secret_names()) == 1


def test_delete_purges_and_waits_only_as_long_as_needed(prod: AzureBackend,
                                                        keyvault: KeyVaultEmulator) -> None:
    keyvault.delete_delay_s = 0.3  # Azure takes a moment to finish a soft delete
    rotate(prod)
    started = time.monotonic()
    prod.delete(CRED)
    assert time.monotonic() - started < 1.5  # not the SDK's 2-second polls
    assert keyvault.secret_names() == [] and keyvault.deleted_names() == []
    again = rotate(prod)
    current = prod.read(CRED)
    assert current is not None and current.version_id == again.version_id


def test_purge_protection_leaves_the_name_reserved(prod: AzureBackend,
                                                   keyvault: KeyVaultEmulator) -> None:
    keyvault.recovery_level = "Recoverable"
    rotate(prod)
    prod.delete(CRED)
    assert keyvault.deleted_names() == [prod.secret_name(CRED)]
    with pytest.raises(BackendConflict) as info:
        prod.stage_pending(make_version("prod", CRED))
    assert info.value.hint and "purge" in info.value.hint
    assert_names_backend(info.value, prod)


def test_without_soft_delete_there_is_nothing_to_purge(prod: AzureBackend,
                                                       keyvault: KeyVaultEmulator) -> None:
    keyvault.recovery_level = "Purgeable"
    rotate(prod)
    prod.delete(CRED)
    assert keyvault.secret_names() == [] and keyvault.deleted_names() == []


def test_a_failed_purge_is_finished_by_the_next_delete(
    azure_settings: AzureSettings, keyvault: KeyVaultEmulator, prod: AzureBackend,
) -> None:
    keyvault.grant("no-purge", {"get", "list", "set", "delete"})
    limited = AzureBackend(azure_settings, "prod", credential=keyvault.credential("no-purge"))
    rotate(limited)
    with pytest.raises(BackendPermissionDenied) as info:
        limited.delete(CRED)
    assert "purge" in info.value.message
    assert keyvault.deleted_names() == [prod.secret_name(CRED)]
    prod.delete(CRED)
    assert keyvault.deleted_names() == []


def test_missing_permission(azure_settings: AzureSettings, keyvault: KeyVaultEmulator) -> None:
    keyvault.grant("reader", {"get", "list"})
    reader = AzureBackend(azure_settings, "prod", credential=keyvault.credential("reader"))
    with pytest.raises(BackendPermissionDenied) as info:
        reader.stage_pending(make_version("prod", CRED))
    assert "403" in info.value.message and "set" in info.value.message
    assert_names_backend(info.value, reader)
    assert reader.read(CRED) is None


def test_a_token_the_vault_rejects(azure_settings: AzureSettings,
                                   keyvault: KeyVaultEmulator) -> None:
    backend = AzureBackend(azure_settings, "prod", credential=keyvault.credential("forged"))
    with pytest.raises(BackendPermissionDenied) as info:
        backend.read(CRED)
    assert "forged" not in error_texts(info.value)
    assert info.value.hint and "DefaultAzureCredential" in info.value.hint


def test_foreign_environment_and_unmanaged_secrets(prod: AzureBackend,
                                                   keyvault: KeyVaultEmulator,
                                                   azure_settings: AzureSettings) -> None:
    client = prod._client()
    client.set_secret(prod.secret_name(CRED), "{}", tags={
        "managed-by": MANAGED_BY, "makini-rotator:environment": "dev",
        "makini-rotator:credential": CRED})
    client.set_secret(prod.secret_name("other"), "someone else's")
    for cred in (CRED, "other"):
        attempts: list[Callable[[], object]] = [
            lambda c=cred: prod.stage_pending(make_version("prod", c)),  # type: ignore[misc]
            lambda c=cred: prod.read(c), lambda c=cred: prod.delete(c)]  # type: ignore[misc]
        for attempt in attempts:
            with pytest.raises(BackendConflict) as info:
                attempt()
            assert_names_backend(info.value, prod)
    assert prod.credentials() == []
    assert len(keyvault.secret_names()) == 2


def test_unreachable_vault_is_unavailable(closed_port_url: str,
                                          keyvault: KeyVaultEmulator) -> None:
    url = closed_port_url.replace("http://", "https://")
    backend = AzureBackend(AzureSettings(vault_url=url, retry_total=0, timeout_s=2), "prod",
                           credential=keyvault.credential())
    with pytest.raises(BackendUnavailable) as info:
        backend.check()
    assert "cannot reach Key Vault" in info.value.message
    assert_names_backend(info.value, backend)


def test_an_untrusted_certificate_is_a_tls_error(keyvault: KeyVaultEmulator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    backend = AzureBackend(AzureSettings(vault_url=keyvault.url, retry_total=0,
                                         verify_challenge_resource=False), "prod",
                           credential=keyvault.credential())
    with pytest.raises(BackendUnavailable) as info:
        backend.check()
    assert "TLS" in info.value.message
    assert info.value.hint and "certificate" in info.value.hint


def test_built_from_settings_with_the_module_credential_hook(
    azure_settings: AzureSettings, keyvault: KeyVaultEmulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[AzureSettings] = []

    def factory(settings: AzureSettings) -> Any:
        made.append(settings)
        return keyvault.credential()

    monkeypatch.setattr(azure_module, "credential_factory", factory)
    backend = build(azure_settings, "prod")
    assert isinstance(backend, AzureBackend)
    backend.check()
    assert made == [azure_settings]
    backend.close()


def test_settings_and_location(tmp_path: Path) -> None:
    settings = AzureSettings(vault_url="https://my-vault.vault.azure.net/",
                             connection_verify=Path("ca.pem"))
    assert settings.location("prod") == "https://my-vault.vault.azure.net/secrets/makini-prod-"
    assert settings.resolve_paths(tmp_path).connection_verify == tmp_path / "ca.pem"
    with pytest.raises(ValidationError):
        AzureSettings(vault_url="http://my-vault.vault.azure.net")
    with pytest.raises(ValidationError):
        AzureSettings(vault_url="https://v", name_prefix="makini_{environment}_")


def test_lists_follow_next_links(prod: AzureBackend, keyvault: KeyVaultEmulator) -> None:
    keyvault.page_size = 2
    names = [f"cred-{i}" for i in range(5)]
    for name in names:
        rotate(prod, name)
    made = [rotate(prod, "many") for _ in range(5)]
    assert prod.credentials() == sorted([*names, "many"])
    assert [i.version_id for i in prod.versions("many")] == [v.version_id for v in made]
