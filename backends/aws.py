"""AWS Secrets Manager backend (boto3, imported lazily: ``pip install makini-rotator[aws]``).

One secret per credential, named ``<prefix><credential>`` (default prefix ``makini/<env>/``), its
value the version's JSON document. Credentials come from boto3's standard chain (environment,
profile, IAM role), never from the configuration file.

Stages are Secrets Manager's own staging labels (``capabilities.native_stages``): ``pending`` is
``AWSPENDING`` written by ``put_secret_value`` with our version id as ``ClientRequestToken``;
``promote`` moves ``AWSPREVIOUS`` then ``AWSCURRENT`` with ``update_secret_version_stage`` and
drops ``AWSPENDING``. Each step first looks whether it is already done, so a retry after a crash
between two calls converges; a label move names the version it takes the label from, which AWS
checks, so concurrent writers retry on fresh state instead of overwriting each other. A read by
stage names the stage explicitly (``VersionStage``) together with the version it expects.

Two things AWS does its own way, and how this module handles them:

* **the first version becomes AWSCURRENT.** AWS attaches ``AWSCURRENT`` to the first version of
  a secret whatever labels the caller asks for, and never lets a secret with versions be without
  ``AWSCURRENT``. So a new secret first gets a *placeholder* version (a fixed document with no
  token, id derived from the secret's name, permanently labelled ``makini-rotator:empty``): it
  holds ``AWSCURRENT`` until the first promotion, and takes it back when the current version is
  made unreadable. Reading a stage held by the placeholder gives ``None``.
* **a version cannot be deleted** (``capabilities.destroys`` is False). ``make_unreadable``
  removes every staging label from the version (so AWS treats it as deprecated and drops it in
  time) and records its id in the secret's ``makini-rotator:retired`` tags (ids as 22-character
  base64url, eleven per tag, pruned of versions AWS no longer holds). A version is unreadable
  when it is recorded there; an unlabelled version that is not recorded is an old ``previous``
  and stays readable by id, as the interface asks. Readers read by stage and never see a retired
  version; the rotator's own reads by id honour the record.

Secrets are created with the tags ``managed-by=makini-rotator`` and
``makini-rotator:environment=<env>``; a secret without them, or tagged with another environment,
is never written, read or deleted (:class:`~rotator.errors.BackendConflict`).

Version ids must be canonical UUID strings (the rotator's ids are), because AWS uses them as
``ClientRequestToken`` and version id.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from backends._common import (
    HINT_TLS,
    HINT_UNREACHABLE,
    TAG_ENVIRONMENT,
    TAG_MANAGED_BY,
    Target,
    check_template,
    ownership_tags,
    render_template,
    require,
)
from backends.base import NAME_PATTERN, Backend, BackendSettings, Capabilities
from backends.retry import CONFLICT, LABEL_RACE, botocore_retries
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
    NotFound,
    RotatorError,
)
from rotator.model import MANAGED_BY, Stage, StoredVersion, VersionInfo
from rotator.places import Place, canonical_url
from rotator.scrub import scrub

LABELS: dict[Stage, str] = {
    Stage.CURRENT: "AWSCURRENT",
    Stage.PREVIOUS: "AWSPREVIOUS",
    Stage.PENDING: "AWSPENDING",
}
EMPTY_LABEL = "makini-rotator:empty"
TAG_RETIRED = "makini-rotator:retired"
PLACEHOLDER_VALUE = '{"managed_by":"makini-rotator","placeholder":true}'
_PLACEHOLDER_NS = uuid.UUID("5b0e3f0c-8f5e-4a43-9b0c-6d1a7f2f7e11")
_IDS_PER_TAG = 11  # 11 x 22 characters + 10 spaces <= 256, the tag value limit
_MAX_RETIRED_TAGS = 40  # of the 50 tags AWS allows, leaving room for the operator's own
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9/_+=.@-]*$")


class AwsSettings(BackendSettings):
    """``[[environments.<env>.backends]] type = "aws"``."""

    type: Literal["aws"] = "aws"
    region: str = Field(description="AWS region, e.g. eu-west-1.")
    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://\S+$",
        description="Another endpoint (VPC endpoint, a local emulator); default: AWS's own.",
    )
    kms_key_id: str | None = Field(
        default=None,
        description="KMS key for new secrets; default: the account's aws/secretsmanager key.",
    )
    prefix: str = Field(
        default="makini/{environment}/", min_length=1, max_length=400,
        description="Secret name prefix; the credential name follows it.",
    )
    recovery_window_days: int | None = Field(
        default=None, ge=7, le=30,
        description="delete() schedules deletion with this recovery window; "
        "None: delete at once, without recovery (ForceDeleteWithoutRecovery).",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(
        default=3, ge=1, le=10, description="botocore attempts per call (standard retry mode)."
    )

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"{value!r:.40} is not an AWS region: write one such as eu-west-1")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        check_template(value)
        if not _SECRET_NAME.match(render_template(value, "env")):
            raise ValueError("AWS secret names allow only letters, digits and /_+=.@-")
        return value

    def location(self, environment: str) -> str:
        where = f"{self.region}/{render_template(self.prefix, environment)}"
        if self.endpoint_url:
            return f"aws-sm+{self.endpoint_url.rstrip('/')}/{where}"
        return f"aws-sm://{where}"

    location_key: ClassVar[str] = "prefix"

    def place(self, environment: str) -> Place:
        """Region, endpoint and secret name prefix. Secret names are plain strings, so a prefix
        that starts another's (``makini/`` and ``makini/prod-``) overlaps it. Any endpoint of
        AWS itself (the regional one, FIPS, a VPC endpoint) reaches the same secrets as no
        endpoint at all. The account is not in the settings: two environments in different
        accounts still need different prefixes or regions."""
        endpoint = self.endpoint_url
        store = "aws" if endpoint is None or _is_aws(endpoint) else canonical_url(endpoint)
        return Place(
            f"aws-sm {store} {self.region}",
            (render_template(self.prefix, environment),),
            flat=True,
        )


def _is_aws(url: str) -> bool:
    host = (urlsplit(url).hostname or "").rstrip(".")
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


# --- vendor exceptions -> the project's tree ------------------------------------------------

_PERMISSION_CODES = {
    "AccessDeniedException", "AccessDenied", "UnauthorizedOperation", "AuthFailure",
    "UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException",
    "SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken",
    "ExpiredTokenException", "ExpiredToken", "RequestExpired",
}
_KMS_CODES = {
    "DecryptionFailure", "EncryptionFailure", "KMSAccessDeniedException",
    "KMSDisabledException", "KMSInvalidStateException", "KMSNotFoundException",
}
_TRANSIENT_CODES = {
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestThrottled", "SlowDown", "ServiceUnavailable", "ServiceUnavailableException",
    "InternalServiceError", "InternalServiceErrorException", "InternalFailure",
    "InternalServerError", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete",
}
_CONFLICT_CODES = {
    "ResourceExistsException", "PreconditionNotMetException", "InvalidRequestException",
    "LimitExceededException", "ConcurrentModificationException",
}
_INVALID_CODES = {"InvalidParameterException", "ValidationException", "InvalidParameter"}

_CREDENTIAL_HINT = (
    "give the process AWS credentials through the standard chain: AWS_PROFILE, "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity, or an instance/task role"
)


def _client_error(exc: Any, target: Target, where: str) -> RotatorError:
    error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
    code = str(error.get("Code") or "Unknown")
    text = scrub(error.get("Message") or "")
    status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    op = getattr(exc, "operation_name", "the call")
    said = f"AWS Secrets Manager answered {op} with {code}" + (f": {text}" if text else "")
    if code == "ResourceNotFoundException":
        return target.error(NotFound, said, where=where)
    if code in _KMS_CODES:
        return target.error(
            BackendPermissionDenied, said, where=where,
            hint="the identity in use needs kms:Decrypt/kms:GenerateDataKey on the secret's "
            "KMS key (kms_key_id), and the key must be enabled",
        )
    if code in _PERMISSION_CODES or status in (401, 403):
        return target.error(
            BackendPermissionDenied, said, where=where,
            hint="grant the identity in use secretsmanager access to this prefix "
            "(see infra/ for the least-privilege policy), or check its credentials",
        )
    if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
        return target.error(BackendUnavailable, said, where=where, hint=HINT_UNREACHABLE)
    if code in _CONFLICT_CODES:
        hint = None
        if "deletion" in text.lower():
            hint = ("the secret is scheduled for deletion: restore it (aws secretsmanager "
                    "restore-secret) or wait for the recovery window to end")
        return target.error(BackendConflict, said, where=where, hint=hint)
    if code in _INVALID_CODES and "name" in text.lower():
        return target.error(BackendInvalidName, said, where=where,
                            hint="AWS secret names allow letters, digits and /_+=.@- (max 512)")
    return target.error(BackendError, said, where=where)


def map_aws_error(exc: BaseException, target: Target, where: str) -> RotatorError | None:
    """The project error for an exception of boto3/botocore (``None`` for anything else)."""
    try:
        import botocore.exceptions as bex
    except ImportError:  # pragma: no cover - the module is unusable without it anyway
        return None
    if isinstance(exc, bex.ClientError):
        return _client_error(exc, target, where)
    detail = scrub(exc)
    credentials = tuple(
        getattr(bex, n) for n in (
            "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
            "NoAuthTokenError", "TokenRetrievalError", "SSOError", "SSOTokenLoadError",
            "UnauthorizedSSOTokenError", "RefreshWithMFAUnsupportedError", "ProfileNotFound",
            "ConfigNotFound", "InvalidConfigError", "MissingServiceIdError",
        ) if hasattr(bex, n)
    )
    if isinstance(exc, credentials):
        return target.error(BackendPermissionDenied, f"no usable AWS credentials: {detail}",
                            where=where, hint=_CREDENTIAL_HINT)
    if isinstance(exc, bex.SSLError):
        return target.error(BackendUnavailable, f"TLS failed: {detail}", where=where,
                            hint=HINT_TLS)
    if isinstance(exc, bex.ConnectTimeoutError | bex.ReadTimeoutError):
        return target.error(BackendUnavailable, f"AWS did not answer in time: {detail}",
                            where=where, hint=HINT_UNREACHABLE)
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectionError | bex.HTTPClientError):
        return target.error(
            BackendUnavailable, f"cannot reach AWS Secrets Manager: {detail}", where=where,
            hint="check the region (and endpoint_url), DNS and the network path; "
            "this is retried",
        )
    region_errors = tuple(
        getattr(bex, n) for n in (
            "NoRegionError", "InvalidRegionError", "UnknownEndpointError",
            "EndpointResolutionError", "UnknownRegionError", "UnknownFIPSEndpointError",
        ) if hasattr(bex, n)
    )
    if isinstance(exc, region_errors):
        return target.error(BackendError, f"AWS region or endpoint problem: {detail}",
                            where=where, hint="check 'region' and 'endpoint_url'")
    if isinstance(exc, bex.ParamValidationError):
        cls = BackendInvalidName if "Name" in str(exc) or "SecretId" in str(exc) else BackendError
        return target.error(cls, f"AWS SDK refused a parameter: {detail}", where=where)
    if isinstance(exc, bex.BotoCoreError):
        return target.error(BackendError, f"AWS SDK error: {detail}", where=where)
    try:
        import boto3.exceptions as b3ex
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, b3ex.Boto3Error) or type(exc).__module__.startswith(("botocore.",
                                                                             "boto3.")):
        return target.error(BackendError, f"AWS SDK error: {detail}", where=where)
    return None


# --- the backend ----------------------------------------------------------------------------

_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _botocore_session() -> Any:
    """A new botocore session (credentials resolved afresh, as boto3 does) sharing one model
    loader per process: loading the service models again costs a quarter of a second."""
    global _LOADER
    botocore_session = require("botocore.session", "aws")
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = require("botocore.loaders", "aws").create_loader()
    session = botocore_session.get_session()
    session.register_component("data_loader", _LOADER)
    return session


def _encode_id(version_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(version_id).bytes).rstrip(b"=").decode()


def _decode_id(text: str) -> str | None:
    try:
        return str(uuid.UUID(bytes=base64.urlsafe_b64decode(text + "==")))
    except (ValueError, binascii.Error):
        return None


class _LabelMoved(BackendConflict):
    """A staging label was not where this writer saw it: another writer moved it."""


class _Unconfirmed(BackendConflict):
    """Written, not yet seen in a fresh read (another writer may have overwritten it)."""


RELOOK = CONFLICT.with_attempts(3)
"""Reads by label: ``describe_secret``, then the version under the label it named."""
RETAG = CONFLICT.with_attempts(5)
"""Recording a retired version in the tags, read back until it is there."""


def _retired_tag_key(index: int) -> str:
    return TAG_RETIRED if index == 0 else f"{TAG_RETIRED}:{index + 1}"


@dataclass
class _Remote:
    """What ``describe_secret`` says of one secret."""

    name: str
    placeholder: str
    tags: dict[str, str]
    labels: dict[str, list[str]]  # labelled versions only (AWS lists no others here)
    deleted: bool
    retired: set[str] = field(default_factory=set)

    @classmethod
    def from_describe(cls, name: str, placeholder: str, desc: dict[str, Any]) -> _Remote:
        tags = {str(t.get("Key")): str(t.get("Value")) for t in desc.get("Tags") or []}
        labels = {str(k): list(v) for k, v in (desc.get("VersionIdsToStages") or {}).items()}
        retired: set[str] = set()
        for key, value in tags.items():
            if key == TAG_RETIRED or key.startswith(TAG_RETIRED + ":"):
                retired.update(i for i in map(_decode_id, value.split()) if i)
        return cls(name, placeholder, tags, {k: v for k, v in labels.items() if v},
                   desc.get("DeletedDate") is not None, retired)

    def holder(self, label: str) -> str | None:
        for vid, labels in self.labels.items():
            if label in labels:
                return vid
        return None


def _stage_of(labels: list[str]) -> Stage | None:
    for stage in (Stage.CURRENT, Stage.PENDING, Stage.PREVIOUS):
        if LABELS[stage] in labels:
            return stage
    return None


def _canonical(version_id: str) -> str | None:
    try:
        return version_id if str(uuid.UUID(version_id)) == version_id else None
    except (ValueError, TypeError, AttributeError):
        return None


class AwsBackend(Backend):
    """Versions of a credential as versions of one Secrets Manager secret."""

    kind = "aws"
    capabilities: ClassVar[Capabilities] = Capabilities(destroys=False, native_stages=True)
    Settings = AwsSettings

    def __init__(self, settings: BackendSettings, environment: str, *,
                 session: Any = None) -> None:
        """``session``: a ``boto3.session.Session`` to use instead of a fresh default one."""
        super().__init__(settings, environment)
        assert isinstance(settings, AwsSettings)
        self._cfg = settings
        self._prefix = render_template(settings.prefix, environment)
        self._target = Target(self.name, self.location, environment)
        self._session = session
        self._client_obj: Any = None
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> None:
        require("boto3", "aws")

    # plumbing ---------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                boto3 = require("boto3", "aws")
                config = require("botocore.config", "aws").Config(
                    connect_timeout=self._cfg.timeout_s,
                    read_timeout=self._cfg.timeout_s,
                    retries=botocore_retries(self._cfg.max_attempts),
                    user_agent_extra="makini-rotator",
                    # the engine calls a backend from up to `scheduler.concurrency` threads;
                    # botocore's default pool of 10 would reconnect for the rest
                    max_pool_connections=64,
                )
                with self._target.calling(map_aws_error, self.location):
                    session = self._session or boto3.session.Session(
                        botocore_session=_botocore_session()
                    )
                    self._client_obj = session.client(
                        "secretsmanager", region_name=self._cfg.region,
                        endpoint_url=self._cfg.endpoint_url, config=config,
                    )
            return self._client_obj

    def _call(self, operation: str, where: str, **kwargs: Any) -> dict[str, Any]:
        client = self._client()
        with self._target.calling(map_aws_error, where):
            result: dict[str, Any] = getattr(client, operation)(**kwargs)
            return result

    def _name(self, credential: str) -> str:
        self._target.check_name(credential)
        return self._prefix + credential

    def _where(self, credential: str) -> str:
        return f"{self.location}{credential}"

    def _placeholder(self, name: str) -> str:
        return str(uuid.uuid5(_PLACEHOLDER_NS, name))

    def _remote(self, credential: str) -> _Remote | None:
        name = self._name(credential)
        try:
            desc = self._call("describe_secret", self._where(credential), SecretId=name)
        except NotFound:
            return None
        return _Remote.from_describe(name, self._placeholder(name), desc)

    def _owned(self, credential: str) -> _Remote | None:
        """The secret if it exists, is ours and is not scheduled for deletion."""
        remote = self._remote(credential)
        if remote is None:
            return None
        self._target.check_owner(remote.tags, self._where(credential))
        return None if remote.deleted else remote

    def _all_versions(self, remote: _Remote, where: str) -> list[dict[str, Any]]:
        """Every version AWS still holds, labelled or not, in creation order."""
        client = self._client()
        out: list[dict[str, Any]] = []
        with self._target.calling(map_aws_error, where):
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"SecretId": remote.name, "IncludeDeprecated": True,
                                          "MaxResults": 100}
                if token:
                    kwargs["NextToken"] = token
                page = client.list_secret_version_ids(**kwargs)
                out.extend(page.get("Versions") or [])
                token = page.get("NextToken")
                if not token:
                    break

        def created(item: dict[str, Any]) -> float:
            value = item.get("CreatedDate")
            return value.timestamp() if isinstance(value, datetime) else 0.0

        return sorted(out, key=created)  # stable: AWS's order breaks ties

    def _move(self, remote: _Remote, where: str, label: str, *, to: str | None = None,
              frm: str | None = None) -> None:
        kwargs: dict[str, Any] = {"SecretId": remote.name, "VersionStage": label}
        if to is not None:
            kwargs["MoveToVersionId"] = to
        if frm is not None:
            kwargs["RemoveFromVersionId"] = frm
        try:
            self._call("update_secret_version_stage", where, **kwargs)
        except BackendError as exc:
            if type(exc) not in (BackendError, BackendConflict):
                raise  # unavailable, permission: not a race
            raise self._target.error(_LabelMoved, exc.message, where=where) from exc

    def _retrying(self, step: Callable[[], None]) -> None:
        """Run a label-moving step again, on fresh state, while other writers move labels.

        ``update_secret_version_stage`` names the version a label is taken from and fails when
        the label is no longer there: a check-and-set on labels.
        """
        LABEL_RACE.call(_LabelMoved, step)

    def _put_placeholder(self, remote: _Remote, where: str, current: bool) -> None:
        stages = [EMPTY_LABEL, LABELS[Stage.CURRENT]] if current else [EMPTY_LABEL]
        self._call("put_secret_value", where, SecretId=remote.name,
                   ClientRequestToken=remote.placeholder, SecretString=PLACEHOLDER_VALUE,
                   VersionStages=stages)

    def _create(self, credential: str, where: str) -> _Remote:
        name = self._name(credential)
        kwargs: dict[str, Any] = {
            "Name": name,
            "Description": f"Makini token {self.environment}/{credential}, managed by "
                           f"{MANAGED_BY}: do not edit",
            "Tags": [{"Key": k, "Value": v} for k, v in ownership_tags(self.environment).items()],
        }
        if self._cfg.kms_key_id:
            kwargs["KmsKeyId"] = self._cfg.kms_key_id
        # another writer may create it first: the ownership check below decides
        with contextlib.suppress(BackendConflict):
            self._call("create_secret", where, **kwargs)
        remote = self._remote(credential)
        if remote is None:
            raise self._target.error(BackendConflict, "the secret vanished while being created",
                                     where=where, hint="another process deletes it; retry")
        self._target.check_owner(remote.tags, where)
        return remote

    def _version_id(self, version_id: str) -> str:
        vid = _canonical(version_id)
        if vid is None:
            raise self._target.error(
                BackendInvalidName, f"version id {version_id!r:.60} is not a canonical UUID",
                hint="AWS uses the version id as ClientRequestToken: the rotator's ids qualify",
            )
        return vid

    def _get(self, remote: _Remote, where: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            return self._call("get_secret_value", where, SecretId=remote.name, **kwargs)
        except NotFound:
            return None

    def _get_labelled(self, remote: _Remote, where: str, **kwargs: Any) -> dict[str, Any] | None:
        """:meth:`_get` of a version named with its label: :class:`_LabelMoved` when the label
        is no longer on it (moved since ``describe_secret``)."""
        try:
            return self._get(remote, where, **kwargs)
        except BackendConflict as exc:
            raise self._target.error(_LabelMoved, exc.message, where=where) from exc

    # the interface ----------------------------------------------------------------------

    def stage_pending(self, version: StoredVersion) -> None:
        self._target.check_writable(version)
        vid = self._version_id(version.version_id)
        where = self._where(version.credential)
        remote = self._remote(version.credential)
        if remote is None:
            remote = self._create(version.credential, where)
        else:
            self._target.check_owner(remote.tags, where)
            if remote.deleted:
                raise self._target.error(
                    BackendConflict, "the secret is scheduled for deletion", where=where,
                    hint="restore it (aws secretsmanager restore-secret) or wait for the "
                    "recovery window to end; recovery_window_days unset deletes at once",
                )
        if vid in remote.labels or vid in remote.retired:
            return
        if remote.holder(LABELS[Stage.CURRENT]) is None:
            # no version yet: the placeholder takes AWSCURRENT, which AWS gives the first one
            self._put_placeholder(remote, where, current=True)
        elif any(v.get("VersionId") == vid for v in self._all_versions(remote, where)):
            return  # written before, then lost its label (an old previous)
        self._call("put_secret_value", where, SecretId=remote.name, ClientRequestToken=vid,
                   SecretString=version.to_json(), VersionStages=[LABELS[Stage.PENDING]])

    def promote(self, credential: str, version_id: str) -> None:
        self._retrying(lambda: self._promote(credential, version_id))

    def _promote(self, credential: str, version_id: str) -> None:
        where = self._where(credential)
        vid = _canonical(version_id)
        remote = self._owned(credential)
        missing = self._target.not_held(version_id, where)
        if remote is None or vid is None:
            raise missing
        current, previous = remote.holder("AWSCURRENT"), remote.holder("AWSPREVIOUS")
        if current == vid:
            self._tidy(remote, where, vid, previous)
            return
        if vid == remote.placeholder or vid in remote.retired:
            raise missing
        if vid not in remote.labels and not any(
            v.get("VersionId") == vid for v in self._all_versions(remote, where)
        ):
            raise missing
        if current is not None and current != remote.placeholder and previous != current:
            self._move(remote, where, "AWSPREVIOUS", to=current, frm=previous)
        self._move(remote, where, "AWSCURRENT", to=vid, frm=current)
        if current == remote.placeholder:  # AWS may have moved AWSPREVIOUS onto it: look
            remote = self._remote(credential) or remote
        self._tidy(remote, where, vid, previous)

    def _tidy(self, remote: _Remote, where: str, vid: str, previous: str | None) -> None:
        """Finish a promotion of ``vid``: no AWSPENDING on it, no AWSPREVIOUS on the placeholder
        (AWS moves AWSPREVIOUS onto whatever lost AWSCURRENT, the placeholder included)."""
        if remote.holder("AWSPREVIOUS") == remote.placeholder:
            keep = previous if previous not in (None, remote.placeholder, vid) else None
            self._move(remote, where, "AWSPREVIOUS", to=keep, frm=remote.placeholder)
        if "AWSPENDING" in remote.labels.get(vid, []):
            self._move(remote, where, "AWSPENDING", frm=vid)

    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        where = self._where(credential)
        label = LABELS[Stage(stage)]

        def look() -> StoredVersion | None:
            remote = self._owned(credential)
            if remote is None:
                return None
            holder = remote.holder(label)
            if holder is None or holder == remote.placeholder or holder in remote.retired:
                return None
            got = self._get_labelled(remote, where, VersionId=holder, VersionStage=label)
            if got is None:
                raise self._target.error(_LabelMoved, "the version went away", where=where)
            return self._target.parse(got.get("SecretString"), where=where,
                                      credential=credential, version_id=holder,
                                      stage=Stage(stage))

        try:  # the label moved between the two calls: look again
            return RELOOK.call(_LabelMoved, look)
        except _LabelMoved:
            return None

    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        where = self._where(credential)
        vid = _canonical(version_id)
        if vid is None:
            return None

        def look(vid: str) -> StoredVersion | None:
            remote = self._owned(credential)
            if remote is None or vid == remote.placeholder or vid in remote.retired:
                return None
            stage = _stage_of(remote.labels.get(vid, []))
            kwargs: dict[str, Any] = {"VersionId": vid}
            if stage is not None:
                kwargs["VersionStage"] = LABELS[stage]
            got = self._get_labelled(remote, where, **kwargs)
            if got is None:
                return None
            return self._target.parse(got.get("SecretString"), where=where,
                                      credential=credential, version_id=vid, stage=stage)

        try:  # its label moved between the two calls: look again
            return RELOOK.call(_LabelMoved, lambda: look(vid))
        except _LabelMoved:
            return None

    def versions(self, credential: str) -> list[VersionInfo]:
        where = self._where(credential)
        remote = self._owned(credential)
        if remote is None:
            return []
        out = []
        for item in self._all_versions(remote, where):
            vid = _canonical(str(item.get("VersionId")))
            if vid is None or vid == remote.placeholder:
                continue
            out.append(VersionInfo(vid, _stage_of(list(item.get("VersionStages") or [])),
                                   readable=vid not in remote.retired))
        return out

    def make_unreadable(self, credential: str, version_id: str) -> None:
        self._retrying(lambda: self._make_unreadable(credential, version_id))

    def _make_unreadable(self, credential: str, version_id: str) -> None:
        where = self._where(credential)
        vid = _canonical(version_id)
        remote = self._owned(credential)
        if remote is None or vid is None or vid == remote.placeholder:
            return
        held = {str(v.get("VersionId")): list(v.get("VersionStages") or [])
                for v in self._all_versions(remote, where)}
        if vid not in held:
            return  # unknown, or AWS already dropped it
        if "AWSCURRENT" in held[vid]:
            previous = remote.holder("AWSPREVIOUS")
            if remote.placeholder in held:
                self._move(remote, where, "AWSCURRENT", to=remote.placeholder, frm=vid)
            else:
                self._put_placeholder(remote, where, current=True)
            fresh = self._remote(credential) or remote
            # AWS hands AWSPREVIOUS to the version that lost AWSCURRENT: give it back
            if fresh.holder("AWSPREVIOUS") in (vid, remote.placeholder):
                keep = previous if previous not in (None, vid, remote.placeholder) else None
                self._move(fresh, where, "AWSPREVIOUS", to=keep,
                           frm=fresh.holder("AWSPREVIOUS"))
            remote = self._remote(credential) or fresh
        for label in remote.labels.get(vid, []):
            self._move(remote, where, label, frm=vid)
        self._record_retired(credential, vid, set(held), where)

    def _record_retired(self, credential: str, vid: str, held: set[str], where: str) -> None:
        """Add ``vid`` to the retired tags, dropping ids AWS no longer holds; re-read to make
        sure a concurrent writer did not overwrite it."""

        def record() -> None:
            remote = self._owned(credential)
            if remote is None or vid in remote.retired:
                return
            ids = sorted((remote.retired & held) | {vid})
            chunks = [" ".join(_encode_id(i) for i in ids[n:n + _IDS_PER_TAG])
                      for n in range(0, len(ids), _IDS_PER_TAG)]
            if len(chunks) > _MAX_RETIRED_TAGS:
                raise self._target.error(
                    BackendError, f"too many retired versions to record ({len(ids)})",
                    where=where, hint="delete and recreate the credential's secret",
                )
            wanted = {_retired_tag_key(i): chunk for i, chunk in enumerate(chunks)}
            stale = [k for k in remote.tags
                     if (k == TAG_RETIRED or k.startswith(TAG_RETIRED + ":")) and k not in wanted]
            self._call("tag_resource", where, SecretId=remote.name,
                       Tags=[{"Key": k, "Value": v} for k, v in wanted.items()])
            if stale:
                self._call("untag_resource", where, SecretId=remote.name, TagKeys=stale)
            raise self._target.error(_Unconfirmed, "could not record the retired version: "
                                     "another writer keeps changing the tags", where=where)

        try:
            RETAG.call(_Unconfirmed, record)
        except _Unconfirmed as exc:
            raise self._target.error(BackendConflict, exc.message, where=where) from None

    def delete(self, credential: str) -> None:
        where = self._where(credential)
        remote = self._remote(credential)
        if remote is None:
            return
        self._target.check_owner(remote.tags, where)
        if remote.deleted:
            return
        kwargs: dict[str, Any] = (
            {"ForceDeleteWithoutRecovery": True} if self._cfg.recovery_window_days is None
            else {"RecoveryWindowInDays": self._cfg.recovery_window_days}
        )
        try:
            self._call("delete_secret", where, SecretId=remote.name, **kwargs)
        except NotFound:
            return

    def _list(self, max_results: int | None = None) -> Iterator[dict[str, Any]]:
        client = self._client()
        with self._target.calling(map_aws_error, self.location):
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {
                    "Filters": [{"Key": "name", "Values": [self._prefix]}],
                    "MaxResults": max_results or 100,
                }
                if token:
                    kwargs["NextToken"] = token
                page = client.list_secrets(**kwargs)
                yield from page.get("SecretList") or []
                token = page.get("NextToken")
                if not token or max_results:
                    return

    def credentials(self) -> list[str]:
        pattern = re.compile(NAME_PATTERN)
        found = set()
        for item in self._list():
            name = str(item.get("Name", ""))
            credential = name[len(self._prefix):]
            if not name.startswith(self._prefix) or not pattern.match(credential):
                continue
            tags = {str(t.get("Key")): str(t.get("Value")) for t in item.get("Tags") or []}
            if item.get("DeletedDate") is None and tags.get(TAG_MANAGED_BY) == MANAGED_BY \
                    and tags.get(TAG_ENVIRONMENT) == self.environment:
                found.add(credential)
        return sorted(found)

    def check(self) -> None:
        for _item in self._list(max_results=1):
            break

    def close(self) -> None:
        with self._lock:
            client, self._client_obj = self._client_obj, None
        if client is not None and hasattr(client, "close"):
            client.close()
