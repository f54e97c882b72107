"""Azure Key Vault backend (azure-keyvault-secrets; ``pip install makini-rotator[azure]``).

One Key Vault secret per credential, named ``<name_prefix><credential>`` with underscores turned
into dashes (default ``makini-<env>-<credential>``); each of our versions is one Key Vault
version holding the version's JSON document. Key Vault has no labels and no check-and-set, so
each version records its own history in its tags::

    managed-by                  = makini-rotator
    makini-rotator:environment  = prod
    makini-rotator:credential   = acme_sap          (the name before the dash mapping)
    makini-rotator:version      = <our version id>
    makini-rotator:staged       = <nanoseconds>     (staging order)
    makini-rotator:promoted     = <nanoseconds>     (when last promoted)
    makini-rotator:retired      = <nanoseconds>     (when made unreadable)

The stages are derived from these records (:func:`backends._common.resolve_stages`): replaying
promotions and retirements in time order gives current and previous; the version staged last is
pending unless promoted or retired since. Every operation writes the tags of one version only
(staging creates it; promotion and retirement update it), so concurrent writers never undo each
other, which pointer tags moved from version to version could not guarantee without
check-and-set.

``make_unreadable`` disables the version (``enabled=False``; ``capabilities.destroys`` is
False: the material stays in the vault, recoverable by an administrator) and records it retired.
``delete`` deletes the secret and, where the vault allows it (``Purgeable`` recovery level and
the ``purge`` permission), purges it so that the name can be reused; it polls for the end of the
deletion itself, briefly, instead of the SDK's 2-second polls.

Authentication is ``DefaultAzureCredential`` unless a credential object is passed to the
constructor or set in :data:`credential_factory` (tests and embedding programs; never the TOML).

Names: Key Vault allows letters, digits and dashes, at most 127 characters, case-insensitively.
A credential whose name cannot map is refused with :class:`~rotator.errors.BackendInvalidName`,
as is one whose mapped name is already held by another credential (``a_b`` and ``a-b``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from backends._common import (
    HINT_TLS,
    HINT_UNREACHABLE,
    TAG_CREDENTIAL,
    TAG_ENVIRONMENT,
    TAG_MANAGED_BY,
    Target,
    VersionRecord,
    check_template,
    next_event_ns,
    ownership_tags,
    render_template,
    require,
    resolve_stages,
)
from backends.base import NAME_PATTERN, Backend, BackendSettings, Capabilities
from backends.retry import SETTLING, azure_retries
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

TAG_VERSION = "makini-rotator:version"
TAG_STAGED = "makini-rotator:staged"
TAG_PROMOTED = "makini-rotator:promoted"
TAG_RETIRED = "makini-rotator:retired"
KEYVAULT_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_NAME = re.compile(NAME_PATTERN)

CredentialFactory = Callable[["AzureSettings"], Any]
credential_factory: CredentialFactory | None = None
"""Makes the ``TokenCredential`` for backends built without one (default:
``azure.identity.DefaultAzureCredential``). Tests set it; it never comes from the TOML."""


class AzureSettings(BackendSettings):
    """``[[environments.<env>.backends]] type = "azure"``."""

    type: Literal["azure"] = "azure"
    vault_url: str = Field(pattern=r"^https://[^/\s]+/?$",
                           description="e.g. https://my-vault.vault.azure.net")
    name_prefix: str = Field(default="makini-{environment}-", min_length=1, max_length=100)
    connection_verify: Path | None = Field(
        default=None, description="CA bundle to trust for the vault (tests, private endpoints)."
    )
    verify_challenge_resource: bool = Field(
        default=True, description="Check the auth challenge names this vault's domain "
        "(off only for an emulator on a loopback address).",
    )
    purge_on_delete: bool = Field(
        default=True, description="delete() purges the soft-deleted secret where allowed."
    )
    delete_timeout_s: float = Field(default=30.0, gt=0, le=600)
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    retry_total: int = Field(default=3, ge=0, le=10)

    @field_validator("vault_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        check_template(value)
        if not re.match(r"^[0-9a-zA-Z-]+$", render_template(value, "env")):
            raise ValueError("Key Vault names allow only letters, digits and dashes")
        return value

    def resolve_paths(self, base: Path) -> AzureSettings:
        if self.connection_verify is None or self.connection_verify.is_absolute():
            return self
        return self.model_copy(update={"connection_verify": (base / self.connection_verify)
                                       .resolve()})

    def location(self, environment: str) -> str:
        return f"{self.vault_url}/secrets/{render_template(self.name_prefix, environment)}"

    location_key: ClassVar[str] = "name_prefix"

    def place(self, environment: str) -> Place:
        """The vault (host in lower case, no default port) and the secret name prefix in lower
        case: Key Vault names ignore case, and a prefix that starts another's overlaps it."""
        prefix = render_template(self.name_prefix, environment).lower()
        return Place(f"azure-kv {canonical_url(self.vault_url)}", (prefix,), flat=True)


# --- vendor exceptions -> the project's tree ------------------------------------------------

_PERMISSION_HINT = (
    "grant the identity secret get/list/set/delete/purge on this vault (access policy, or the "
    "'Key Vault Secrets Officer' role), or check the credential DefaultAzureCredential finds"
)


def _odata(exc: Any) -> tuple[str, str, str]:
    error = getattr(exc, "error", None)
    code = str(getattr(error, "code", None) or "")
    message = str(getattr(error, "message", None) or getattr(exc, "reason", None) or "")
    inner = getattr(error, "innererror", None) or {}
    inner_code = str(inner.get("code") or "") if isinstance(inner, dict) else ""
    return code, scrub(message), inner_code


def map_azure_error(exc: BaseException, target: Target, where: str) -> RotatorError | None:
    """The project error for an azure-core / azure-identity exception (``None`` otherwise)."""
    try:
        import azure.core.exceptions as ax
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, ax.HttpResponseError):
        status = exc.status_code
        code, message, inner = _odata(exc)
        said = "Key Vault answered " + (f"{status} " if status else "") + \
               (f"{code}" if code else type(exc).__name__) + (f": {message}" if message else "")
        if isinstance(exc, ax.ClientAuthenticationError):
            return target.error(BackendPermissionDenied,
                                f"Azure authentication failed: {message or scrub(exc.message)}",
                                where=where, hint=_PERMISSION_HINT)
        if status == 403 and inner == "SecretDisabled":
            return target.error(NotFound, "the secret version is disabled", where=where)
        if isinstance(exc, ax.ResourceNotFoundError) or status == 404:
            return target.error(NotFound, said, where=where)
        if status in (401, 403):
            return target.error(BackendPermissionDenied, said, where=where, hint=_PERMISSION_HINT)
        if status == 409 or isinstance(exc, ax.ResourceExistsError):
            hint = None
            if "deleted" in message.lower() or inner.startswith("ObjectIs"):
                hint = ("the secret is soft-deleted: purge it (az keyvault secret purge) or "
                        "recover it, or wait for the retention period to end")
            return target.error(BackendConflict, said, where=where, hint=hint)
        if isinstance(exc, ax.ResourceModifiedError | ax.ResourceNotModifiedError):
            return target.error(BackendConflict, said, where=where)
        if status == 400 and "name" in message.lower():
            return target.error(BackendInvalidName, said, where=where,
                                hint="Key Vault names allow letters, digits and '-' (max 127)")
        if status is not None and (status in (408, 429) or status >= 500):
            return target.error(BackendUnavailable, said, where=where, hint=HINT_UNREACHABLE)
        if isinstance(exc, ax.DecodeError):
            return target.error(BackendUnavailable, f"unreadable answer from Key Vault: "
                                f"{scrub(exc.message)}", where=where, hint=HINT_UNREACHABLE)
        return target.error(BackendError, said if status else scrub(exc.message), where=where)
    if isinstance(exc, ax.ServiceRequestError | ax.ServiceResponseError):
        detail = scrub(getattr(exc, "message", exc))
        tls = any(word in detail.upper() for word in ("SSL", "CERTIFICATE", "TLS"))
        timed_out = isinstance(exc, ax.ServiceRequestTimeoutError | ax.ServiceResponseTimeoutError)
        what = "TLS with Key Vault failed" if tls else (
            "Key Vault did not answer in time" if timed_out else "cannot reach Key Vault")
        return target.error(BackendUnavailable, f"{what}: {detail}", where=where,
                            hint=HINT_TLS if tls else HINT_UNREACHABLE)
    if isinstance(exc, ax.AzureError):
        return target.error(BackendError, f"Azure SDK error: {scrub(getattr(exc, 'message', exc))}",
                            where=where)
    if isinstance(exc, ax.SerializationError | ax.DeserializationError):
        return target.error(BackendError, f"Azure SDK could not (de)serialise: {scrub(exc)}",
                            where=where)
    return None


# --- the backend ----------------------------------------------------------------------------


@dataclass
class _Version:
    kv_version: str
    vid: str | None
    enabled: bool
    created: datetime | None
    tags: dict[str, str]

    def ns(self, tag: str) -> int | None:
        value = self.tags.get(tag, "")
        return int(value) if value.isdigit() else None

    @property
    def readable(self) -> bool:
        return self.enabled and self.ns(TAG_RETIRED) is None

    def record(self) -> VersionRecord:
        created = int(self.created.timestamp() * 1e9) if self.created else 0
        return VersionRecord(
            key=self.kv_version, version_id=self.vid or "", order=self.ns(TAG_STAGED) or created,
            promoted_ns=self.ns(TAG_PROMOTED), retired_ns=self.ns(TAG_RETIRED),
            readable=self.readable,
        )


def _recovery_level(deleted: Any) -> str:
    """The vault's recovery level (``Recoverable+Purgeable``...) of a deleted secret."""
    level = getattr(getattr(deleted, "properties", None), "recovery_level", None)
    return str(getattr(level, "value", level) or "")


def _records(versions: list[_Version]) -> list[VersionRecord]:
    return [v.record() for v in versions if v.vid]


def _stages(versions: list[_Version]) -> dict[str, Stage]:
    return resolve_stages(_records(versions))


class AzureBackend(Backend):
    """Versions of a credential as versions of one Key Vault secret."""

    kind = "azure"
    capabilities: ClassVar[Capabilities] = Capabilities(destroys=False, native_stages=False)
    Settings = AzureSettings

    def __init__(self, settings: BackendSettings, environment: str, *,
                 credential: Any = None) -> None:
        """``credential``: a ``TokenCredential`` to use instead of the default chain."""
        super().__init__(settings, environment)
        assert isinstance(settings, AzureSettings)
        self._cfg = settings
        self._prefix = render_template(settings.name_prefix, environment)
        self._target = Target(self.name, self.location, environment)
        self._credential = credential
        self._own_credential = False
        self._client_obj: Any = None
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> None:
        require("azure.keyvault.secrets", "azure")

    # plumbing ---------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                secrets = require("azure.keyvault.secrets", "azure")
                with self._target.calling(map_azure_error, self.location):
                    if self._credential is None:
                        if credential_factory is not None:
                            self._credential = credential_factory(self._cfg)
                        else:
                            identity = require("azure.identity", "azure")
                            self._credential = identity.DefaultAzureCredential()
                        self._own_credential = True
                    kwargs: dict[str, Any] = {
                        "verify_challenge_resource": self._cfg.verify_challenge_resource,
                        **azure_retries(self._cfg.retry_total),
                        "connection_timeout": self._cfg.timeout_s,
                        "read_timeout": self._cfg.timeout_s,
                    }
                    if self._cfg.connection_verify is not None:
                        kwargs["connection_verify"] = str(self._cfg.connection_verify)
                    self._client_obj = secrets.SecretClient(
                        vault_url=self._cfg.vault_url, credential=self._credential, **kwargs
                    )
            return self._client_obj

    def _call(self, where: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        client = self._client()
        with self._target.calling(map_azure_error, where):
            return getattr(client, operation)(*args, **kwargs)

    def secret_name(self, credential: str) -> str:
        """The Key Vault name of a credential (raises :class:`BackendInvalidName`)."""
        self._target.check_name(credential)
        name = self._prefix + credential.replace("_", "-")
        if not KEYVAULT_NAME.match(name):
            raise self._target.error(
                BackendInvalidName,
                f"credential {credential!r} maps to {name!r}, which Key Vault refuses",
                hint="Key Vault names allow letters, digits and '-', at most 127 characters: "
                "shorten the credential name or the name_prefix",
            )
        return name

    def _where(self, credential: str) -> str:
        return f"{self._cfg.vault_url}/secrets/{self.secret_name(credential)}"

    def _versions_of(self, credential: str) -> list[_Version] | None:
        """Every version of the credential's secret, checked as ours (``None``: no secret)."""
        name, where = self.secret_name(credential), self._where(credential)
        client = self._client()
        out: list[_Version] = []
        try:
            with self._target.calling(map_azure_error, where):
                for props in client.list_properties_of_secret_versions(name):
                    tags = dict(props.tags or {})
                    out.append(_Version(
                        kv_version=str(props.version), vid=tags.get(TAG_VERSION),
                        enabled=props.enabled is not False, created=props.created_on, tags=tags,
                    ))
        except NotFound:
            return None
        for v in out:
            self._target.check_owner(v.tags, where)
            owner = v.tags.get(TAG_CREDENTIAL)
            if owner != credential:
                raise self._target.error(
                    BackendInvalidName,
                    f"credential {credential!r} maps to the Key Vault name "
                    f"{self.secret_name(credential)!r}, which credential {owner!r} already uses",
                    where=where,
                    hint="Key Vault names cannot tell '_' from '-': rename one of the two",
                )
        out.sort(key=lambda v: v.record().order)  # stable
        return out

    def _update(self, credential: str, v: _Version, tags: dict[str, str], *,
                enabled: bool | None = None) -> None:
        kwargs: dict[str, Any] = {"tags": {**v.tags, **tags}}
        if enabled is not None:
            kwargs["enabled"] = enabled
        self._call(self._where(credential), "update_secret_properties",
                   self.secret_name(credential), v.kv_version, **kwargs)

    def _value(self, credential: str, v: _Version, stage: Stage | None) -> StoredVersion | None:
        where = f"{self._where(credential)}/{v.kv_version}"
        try:
            secret = self._call(where, "get_secret", self.secret_name(credential), v.kv_version)
        except NotFound:  # disabled or gone meanwhile
            return None
        return self._target.parse(secret.value, where=where, credential=credential,
                                  version_id=v.vid, stage=stage)

    @staticmethod
    def _latest(versions: list[_Version], version_id: str) -> _Version | None:
        return next((v for v in reversed(versions) if v.vid == version_id and v.readable), None)

    # the interface ----------------------------------------------------------------------

    def stage_pending(self, version: StoredVersion) -> None:
        self._target.check_writable(version)
        credential = version.credential
        name, where = self.secret_name(credential), self._where(credential)
        existing = self._versions_of(credential) or []
        if any(v.vid == version.version_id for v in existing):
            return
        staged = max([time.time_ns(), *((v.ns(TAG_STAGED) or 0) + 1 for v in existing)])
        tags = {
            **ownership_tags(self.environment), TAG_CREDENTIAL: credential,
            TAG_VERSION: version.version_id, TAG_STAGED: str(staged),
        }
        self._call(where, "set_secret", name, version.to_json(), tags=tags,
                   content_type="application/json")

    def promote(self, credential: str, version_id: str) -> None:
        versions = self._versions_of(credential) or []
        target = self._latest(versions, version_id)
        if target is None:
            raise self._target.not_held(version_id, self._where(credential))
        if _stages(versions).get(target.kv_version) is Stage.CURRENT:
            return
        self._update(credential, target,
                     {TAG_PROMOTED: str(next_event_ns(_records(versions)))})

    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        versions = self._versions_of(credential) or []
        stages = _stages(versions)
        holder = next((v for v in versions if stages.get(v.kv_version) is Stage(stage)), None)
        return self._value(credential, holder, Stage(stage)) if holder else None

    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        versions = self._versions_of(credential) or []
        found = self._latest(versions, version_id)
        if found is None:
            return None
        return self._value(credential, found, _stages(versions).get(found.kv_version))

    def versions(self, credential: str) -> list[VersionInfo]:
        versions = self._versions_of(credential) or []
        stages = _stages(versions)
        seen: dict[str, VersionInfo] = {}
        for v in versions:
            if v.vid is None:
                continue
            readable = v.readable or (v.vid in seen and seen[v.vid].readable)
            stage = stages.get(v.kv_version) or (seen[v.vid].stage if v.vid in seen else None)
            seen[v.vid] = VersionInfo(v.vid, stage, readable)
        return list(seen.values())

    def make_unreadable(self, credential: str, version_id: str) -> None:
        versions = self._versions_of(credential) or []
        when = str(next_event_ns(_records(versions)))
        for v in versions:
            if v.vid == version_id and (v.enabled or v.ns(TAG_RETIRED) is None):
                retired = {} if v.ns(TAG_RETIRED) is not None else {TAG_RETIRED: when}
                self._update(credential, v, retired, enabled=False)

    def delete(self, credential: str) -> None:
        name, where = self.secret_name(credential), self._where(credential)
        if self._versions_of(credential) is None:
            self._purge_leftover(credential)
            return
        try:
            poller = self._call(where, "begin_delete_secret", name)
        except NotFound:
            return
        deleted = poller.result()  # returns at once; we poll the purge ourselves
        level = _recovery_level(deleted)
        if self._cfg.purge_on_delete and deleted.recovery_id and "Purgeable" in level:
            self._purge(name, where)

    def _purge_leftover(self, credential: str) -> None:
        """A secret deleted earlier but not purged (the purge failed or timed out)."""
        if not self._cfg.purge_on_delete:
            return
        name, where = self.secret_name(credential), self._where(credential)
        try:
            deleted = self._call(where, "get_deleted_secret", name)
        except NotFound:
            return
        self._target.check_owner(dict(deleted.properties.tags or {}), where)
        if "Purgeable" in _recovery_level(deleted):
            self._purge(name, where)

    def _purge(self, name: str, where: str) -> None:
        try:  # NotFound, BackendConflict: the deletion is still in progress
            SETTLING.with_timeout(self._cfg.delete_timeout_s).call(
                (NotFound, BackendConflict),
                lambda: self._call(where, "purge_deleted_secret", name),
            )
        except (NotFound, BackendConflict):
            raise self._target.error(
                BackendUnavailable,
                f"Key Vault did not finish deleting in {self._cfg.delete_timeout_s} s",
                where=where, hint="delete again later: it purges what is left",
            ) from None

    def _list(self) -> Iterator[Any]:
        client = self._client()
        with self._target.calling(map_azure_error, self.location):
            yield from client.list_properties_of_secrets()

    def credentials(self) -> list[str]:
        found = set()
        for props in self._list():
            tags = dict(props.tags or {})
            credential = tags.get(TAG_CREDENTIAL, "")
            if (str(props.name).lower().startswith(self._prefix.lower())
                    and tags.get(TAG_MANAGED_BY) == MANAGED_BY
                    and tags.get(TAG_ENVIRONMENT) == self.environment
                    and _NAME.match(credential)
                    and self.secret_name(credential).lower() == str(props.name).lower()):
                found.add(credential)
        return sorted(found)

    def check(self) -> None:
        client = self._client()
        with self._target.calling(map_azure_error, self.location):
            for _page in client.list_properties_of_secrets().by_page():
                break

    def close(self) -> None:
        with self._lock:
            client, self._client_obj = self._client_obj, None
            credential = self._credential if self._own_credential else None
        if client is not None:
            client.close()
        if credential is not None and hasattr(credential, "close"):
            credential.close()
