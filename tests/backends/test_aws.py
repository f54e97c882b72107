"""AWS Secrets Manager backend against moto's HTTP server: the contract suite and what is
particular to AWS (staging labels, the placeholder, retired versions, tags, errors)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from backends.aws import EMPTY_LABEL, TAG_RETIRED, AwsBackend, AwsSettings
from backends.base import Backend
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
)
from rotator.model import MANAGED_BY, Stage
from tests.backends.contract import BackendContract, BackendFactory, MakeBackend, make_version
from tests.servers.aws_server import MotoServer
from tests.servers.canned import CannedServer

REGION = "eu-west-1"


def settings_for(endpoint: str, unique_prefix: str, **extra: object) -> AwsSettings:
    return AwsSettings.model_validate({
        "type": "aws", "region": REGION, "endpoint_url": endpoint,
        "prefix": f"{unique_prefix}/makini/{{environment}}/", "max_attempts": 1, **extra,
    })


@pytest.fixture
def aws_settings(moto_server: MotoServer, aws_credentials: None, unique_prefix: str) -> AwsSettings:
    return settings_for(moto_server.endpoint, unique_prefix)


class TestAwsContract(BackendContract):
    @pytest.fixture
    def make_backend(self, aws_settings: AwsSettings) -> Iterator[MakeBackend]:
        with BackendFactory(lambda env: AwsBackend(aws_settings, env)) as make:
            yield make


# --- AWS specifics --------------------------------------------------------------------------

CRED = "acme-sap"


@pytest.fixture
def raw(moto_server: MotoServer, aws_credentials: None) -> Any:
    """A plain boto3 client on the same moto server, to look behind the backend."""
    import boto3

    return boto3.client("secretsmanager", endpoint_url=moto_server.endpoint, region_name=REGION)


@pytest.fixture
def prod(aws_settings: AwsSettings) -> Iterator[AwsBackend]:
    backend = AwsBackend(aws_settings, "prod")
    yield backend
    backend.close()


def labels(raw: Any, name: str) -> dict[str, list[str]]:
    versions = raw.list_secret_version_ids(SecretId=name, IncludeDeprecated=True)["Versions"]
    return {v["VersionId"]: sorted(v.get("VersionStages") or []) for v in versions}


def tags_of(raw: Any, name: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw.describe_secret(SecretId=name).get("Tags") or []}


def secret_name(backend: AwsBackend, cred: str = CRED) -> str:
    settings = backend.settings
    assert isinstance(settings, AwsSettings)
    return settings.prefix.replace("{environment}", backend.environment) + cred


def assert_names_backend(error: BackendError, backend: Backend) -> None:
    assert error.backend == backend.name
    assert error.location == backend.location
    assert error.where and backend.location in error.where
    assert error.hint, "say what to do next"


def test_layout_one_secret_per_credential_with_native_labels(prod: AwsBackend, raw: Any) -> None:
    v1 = make_version("prod", CRED)
    prod.stage_pending(v1)
    name = secret_name(prod)
    assert name.endswith("/makini/prod/acme-sap")
    tags = tags_of(raw, name)
    assert tags["makini-rotator:environment"] == "prod"
    assert tags["managed-by"] == MANAGED_BY
    stages = labels(raw, name)
    assert stages[v1.version_id] == ["AWSPENDING"]  # our version id is AWS's version id
    placeholder = next(k for k, v in stages.items() if EMPTY_LABEL in v)
    assert stages[placeholder] == sorted(["AWSCURRENT", EMPTY_LABEL])  # not the new token
    doc = raw.get_secret_value(SecretId=name, VersionId=v1.version_id,
                               VersionStage="AWSPENDING")["SecretString"]
    assert json.loads(doc) == json.loads(v1.to_json())

    prod.promote(CRED, v1.version_id)
    v2 = make_version("prod", CRED)
    prod.stage_pending(v2)
    prod.promote(CRED, v2.version_id)
    stages = labels(raw, name)
    assert stages[v2.version_id] == ["AWSCURRENT"]
    assert stages[v1.version_id] == ["AWSPREVIOUS"]
    assert stages[placeholder] == [EMPTY_LABEL]
    assert AwsBackend.capabilities.native_stages and not AwsBackend.capabilities.destroys


def test_make_unreadable_removes_labels_and_records_the_version(prod: AwsBackend,
                                                                raw: Any) -> None:
    made = []
    for _ in range(3):
        v = make_version("prod", CRED)
        prod.stage_pending(v)
        prod.promote(CRED, v.version_id)
        made.append(v)
    name = secret_name(prod)
    prod.make_unreadable(CRED, made[1].version_id)
    assert labels(raw, name)[made[1].version_id] == []
    # AWS keeps the value (destroys=False) but the backend will not hand it out
    raw.get_secret_value(SecretId=name, VersionId=made[1].version_id)
    assert prod.read_version(CRED, made[1].version_id) is None
    recorded = tags_of(raw, name)[TAG_RETIRED].split()
    decoded = [str(uuid.UUID(bytes=base64.urlsafe_b64decode(i + "=="))) for i in recorded]
    assert decoded == [made[1].version_id]
    # an old previous without labels that was not retired stays readable by id
    assert labels(raw, name)[made[0].version_id] == []
    assert prod.read_version(CRED, made[0].version_id) is not None


def test_many_retired_versions_spread_over_tags(prod: AwsBackend, raw: Any) -> None:
    made = [make_version("prod", CRED) for _ in range(13)]
    for v in made:
        prod.stage_pending(v)
    for v in made:
        prod.make_unreadable(CRED, v.version_id)
    tags = tags_of(raw, secret_name(prod))
    chunks = sorted(k for k in tags if k.startswith(TAG_RETIRED))
    assert chunks == [TAG_RETIRED, f"{TAG_RETIRED}:2"]
    assert all(len(tags[k]) <= 256 for k in chunks)
    assert [i.readable for i in prod.versions(CRED)] == [False] * 13


def test_retiring_the_current_version_keeps_the_previous(prod: AwsBackend, raw: Any) -> None:
    v1, v2, v3 = (make_version("prod", CRED) for _ in range(3))
    for v in (v1, v2):
        prod.stage_pending(v)
        prod.promote(CRED, v.version_id)
    prod.make_unreadable(CRED, v2.version_id)  # AWSCURRENT goes back to the placeholder
    assert prod.read(CRED) is None
    previous = prod.read(CRED, Stage.PREVIOUS)
    assert previous is not None and previous.version_id == v1.version_id
    prod.stage_pending(v3)
    prod.promote(CRED, v3.version_id)
    current, previous = prod.read(CRED), prod.read(CRED, Stage.PREVIOUS)
    assert current is not None and current.version_id == v3.version_id
    assert previous is not None and previous.version_id == v1.version_id
    assert labels(raw, secret_name(prod))[v2.version_id] == []


def test_promote_resumes_after_a_crash_between_label_moves(prod: AwsBackend, raw: Any) -> None:
    v1, v2 = make_version("prod", CRED), make_version("prod", CRED)
    prod.stage_pending(v1)
    prod.promote(CRED, v1.version_id)
    prod.stage_pending(v2)
    # the first of promote's two moves happened, then the process died
    raw.update_secret_version_stage(SecretId=secret_name(prod), VersionStage="AWSPREVIOUS",
                                    MoveToVersionId=v1.version_id)
    prod.promote(CRED, v2.version_id)
    stages = labels(raw, secret_name(prod))
    assert stages[v2.version_id] == ["AWSCURRENT"]
    assert stages[v1.version_id] == ["AWSPREVIOUS"]


def test_version_ids_must_be_uuids(prod: AwsBackend) -> None:
    with pytest.raises(BackendInvalidName) as info:
        prod.stage_pending(make_version("prod", CRED, version_id="v1"))
    assert "UUID" in info.value.message
    assert prod.read_version(CRED, "v1") is None


def test_foreign_environment_secret_is_refused(prod: AwsBackend, raw: Any) -> None:
    raw.create_secret(Name=secret_name(prod), SecretString="{}", Tags=[
        {"Key": "managed-by", "Value": MANAGED_BY},
        {"Key": "makini-rotator:environment", "Value": "dev"},
    ])
    attempts: list[Callable[[], object]] = [
        lambda: prod.stage_pending(make_version("prod", CRED)),
        lambda: prod.read(CRED), lambda: prod.delete(CRED)]
    for attempt in attempts:
        with pytest.raises(BackendConflict) as info:
            attempt()
        assert "'dev'" in info.value.message
        assert_names_backend(info.value, prod)
    assert CRED not in prod.credentials()
    raw.describe_secret(SecretId=secret_name(prod))  # untouched


def test_unmanaged_secret_is_refused_and_never_deleted(prod: AwsBackend, raw: Any) -> None:
    raw.create_secret(Name=secret_name(prod), SecretString="someone else's")
    with pytest.raises(BackendConflict) as info:
        prod.stage_pending(make_version("prod", CRED))
    assert "does not manage" in info.value.message
    assert_names_backend(info.value, prod)
    with pytest.raises(BackendConflict):
        prod.delete(CRED)
    assert raw.get_secret_value(SecretId=secret_name(prod),
                                VersionStage="AWSCURRENT")["SecretString"] == "someone else's"
    assert prod.credentials() == []


def test_recovery_window_keeps_the_name_until_restored(moto_server: MotoServer,
                                                       aws_credentials: None,
                                                       unique_prefix: str) -> None:
    backend = AwsBackend(settings_for(moto_server.endpoint, unique_prefix, recovery_window_days=7),
                         "prod")
    v = make_version("prod", CRED)
    backend.stage_pending(v)
    backend.promote(CRED, v.version_id)
    backend.delete(CRED)
    assert backend.read(CRED) is None
    assert backend.versions(CRED) == []
    assert backend.credentials() == []
    backend.delete(CRED)  # scheduled already: success
    with pytest.raises(BackendConflict) as info:
        backend.stage_pending(make_version("prod", CRED))
    assert info.value.hint and "restore" in info.value.hint


def test_region_must_look_like_one() -> None:
    with pytest.raises(ValidationError) as info:
        AwsSettings(region="eu_west", prefix="x/")
    assert "region" in str(info.value)


def test_nonexistent_region_is_unavailable_naming_the_region(aws_credentials: None) -> None:
    backend = AwsBackend(AwsSettings(region="xx-nowhere-1", max_attempts=1, timeout_s=2), "prod")
    with pytest.raises(BackendUnavailable) as info:
        backend.check()
    assert "xx-nowhere-1" in info.value.describe()
    assert info.value.hint and "region" in info.value.hint
    assert_names_backend(info.value, backend)


def test_unreachable_endpoint_is_unavailable(aws_credentials: None, closed_port_url: str,
                                             unique_prefix: str) -> None:
    backend = AwsBackend(settings_for(closed_port_url, unique_prefix), "prod")
    with pytest.raises(BackendUnavailable) as info:
        backend.read(CRED)
    assert "cannot reach" in info.value.message
    assert_names_backend(info.value, backend)


def test_access_denied_is_permission_denied(aws_credentials: None, canned: CannedServer,
                                            unique_prefix: str) -> None:
    canned.respond(400, json.dumps({
        "__type": "AccessDeniedException",
        "message": "User: arn:aws:iam::123456789012:user/rotator is not authorized to perform: "
                   "secretsmanager:DescribeSecret",
    }), {"Content-Type": "application/x-amz-json-1.1"})
    backend = AwsBackend(settings_for(canned.url, unique_prefix), "prod")
    with pytest.raises(BackendPermissionDenied) as info:
        backend.read(CRED)
    assert "AccessDeniedException" in info.value.message
    assert "secretsmanager:DescribeSecret" in info.value.message
    assert_names_backend(info.value, backend)


def test_throttling_is_unavailable(aws_credentials: None, canned: CannedServer,
                                   unique_prefix: str) -> None:
    canned.respond(400, json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}),
                   {"Content-Type": "application/x-amz-json-1.1"})
    backend = AwsBackend(settings_for(canned.url, unique_prefix), "prod")
    with pytest.raises(BackendUnavailable):
        backend.versions(CRED)


def test_no_credentials_is_permission_denied(monkeypatch: pytest.MonkeyPatch,
                                             aws_credentials: None, moto_server: MotoServer,
                                             unique_prefix: str) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    backend = AwsBackend(settings_for(moto_server.endpoint, unique_prefix), "prod")
    with pytest.raises(BackendPermissionDenied) as info:
        backend.read(CRED)
    assert "credentials" in info.value.message
    assert info.value.hint and "AWS_PROFILE" in info.value.hint


def test_kms_key_and_description_on_create(moto_server: MotoServer, aws_credentials: None,
                                           unique_prefix: str, raw: Any) -> None:
    settings = settings_for(moto_server.endpoint, unique_prefix, kms_key_id="alias/makini")
    backend = AwsBackend(settings, "prod")
    backend.stage_pending(make_version("prod", CRED))
    desc = raw.describe_secret(SecretId=secret_name(backend))
    assert desc.get("KmsKeyId") == "alias/makini"
    assert "do not edit" in desc["Description"]


def test_location_and_settings() -> None:
    settings = AwsSettings(region="eu-west-1")
    assert settings.location("prod") == "aws-sm://eu-west-1/makini/prod/"
    assert settings.location("dev") != settings.location("prod")
    with pytest.raises(ValidationError):
        AwsSettings(region="eu-west-1", prefix="makini/{env}/")
    with pytest.raises(ValidationError):
        AwsSettings(region="eu-west-1", prefix="makini prod/")
    with pytest.raises(ValidationError):
        AwsSettings(region="eu-west-1", recovery_window_days=3)


def test_a_bad_region_reads_plainly() -> None:
    with pytest.raises(ValidationError) as info:
        AwsSettings(region="eu_west")
    assert "not an AWS region: write one such as eu-west-1" in str(info.value)
