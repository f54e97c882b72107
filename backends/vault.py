"""HashiCorp Vault / OpenBao backend: KV version 2 through hvac (``makini-rotator[vault]``).

One KV secret per credential at ``<mount>/data/<path_prefix>/<credential>`` (default
``secret/data/makini/<env>/<credential>``); each of our versions is one KV version whose data is
the version's document. ``make_unreadable`` destroys the KV version (``capabilities.destroys``).

**Where the stages live.** KV has no labels, so the secret's ``custom_metadata`` records, per KV
version ``n``::

    managed-by                    = makini-rotator
    makini-rotator:environment    = prod
    makini-rotator:version:<n>    = <our version id>      (written when n is staged)
    makini-rotator:promoted:<n>   = <nanoseconds>         (written when n is promoted)
    makini-rotator:retired:<n>    = <nanoseconds>         (written when n is made unreadable)

The current, previous and pending pointers are *derived* from these records
(:func:`backends._common.resolve_stages`): replaying the promotions and retirements in time
order gives current and previous; the highest KV version is pending unless promoted or retired
since. A promotion's time is taken after every event it has seen
(:func:`~backends._common.next_event_ns`).

Why records rather than three pointer keys: Vault cannot check-and-set metadata, so two writers
that each read "current = A" and then set "current = B" and "current = C" would both succeed,
and one promotion would vanish together with the previous pointer. Here every operation writes
only keys of its own KV version, in one JSON merge-patch (``PATCH .../metadata``), so concurrent
writers never overwrite each other's keys and a retry rewrites the same key:

* *staging* writes the data with check-and-set (``cas`` = the secret's current KV version), so
  versions get distinct, ordered numbers; the loser of a race re-reads and retries on the new
  base, and a retry that finds its own version id already written stops there;
* a crash between the data write and the metadata patch leaves a KV version no record names:
  every operation first maps such versions by reading their document's ``version`` field, and
  the next write records what it found.

Records of versions KV has pruned are dropped on the next write. Three keys per version plus two
fit Vault's 64 custom-metadata keys for the ``max_versions`` (at most 20) set on creation.

Authentication: a static token from an environment variable (default ``VAULT_TOKEN``), AppRole
(role and secret id from environment variables) or Kubernetes (service-account JWT). A token this
backend minted by logging in is renewed by logging in again before its TTL runs out, and revoked
by :meth:`VaultBackend.close`; a static token is never revoked.

Policies need ``create``, ``read``, ``update`` on ``<mount>/data/<prefix>/*``; ``read``,
``create``, ``update``, ``patch``, ``list``, ``delete`` on ``<mount>/metadata/<prefix>/*``; and
``update`` on ``<mount>/destroy/<prefix>/*``. A 403 becomes
:class:`~rotator.errors.BackendPermissionDenied` naming the path.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends._common import (
    HINT_TLS,
    HINT_UNREACHABLE,
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
from backends.retry import CONFLICT
from rotator.errors import (
    BackendConflict,
    BackendError,
    BackendPermissionDenied,
    BackendUnavailable,
    NotFound,
    RotatorError,
)
from rotator.model import Stage, StoredVersion, VersionInfo
from rotator.places import Place, canonical_url, segments
from rotator.scrub import scrub

KEY_VERSION = "makini-rotator:version:"
KEY_PROMOTED = "makini-rotator:promoted:"
KEY_RETIRED = "makini-rotator:retired:"
_RECORD_KEYS = (KEY_VERSION, KEY_PROMOTED, KEY_RETIRED)
_ENV_VAR = r"^[A-Za-z_][A-Za-z0-9_]*$"
_NAME = re.compile(NAME_PATTERN)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenAuth(_Part):
    """A static token, read from an environment variable; never revoked by the rotator."""

    method: Literal["token"] = "token"
    token_env: str = Field(default="VAULT_TOKEN", pattern=_ENV_VAR)


class AppRoleAuth(_Part):
    method: Literal["approle"]
    role_id_env: str = Field(default="VAULT_ROLE_ID", pattern=_ENV_VAR)
    secret_id_env: str = Field(default="VAULT_SECRET_ID", pattern=_ENV_VAR)
    mount_point: str = "approle"


class KubernetesAuth(_Part):
    method: Literal["kubernetes"]
    role: str = Field(min_length=1)
    jwt_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    mount_point: str = "kubernetes"


class VaultTls(_Part):
    verify: bool = True
    ca_cert: Path | None = Field(default=None, description="CA bundle for the Vault server.")


_AUTH_METHODS = ("token", "approle", "kubernetes")
VaultAuth = Annotated[TokenAuth | AppRoleAuth | KubernetesAuth, Field(discriminator="method")]


class VaultSettings(BackendSettings):
    """``[[environments.<env>.backends]] type = "vault"``."""

    type: Literal["vault"] = "vault"
    url: str = Field(pattern=r"^https?://[^/\s]+", description="e.g. https://vault.example:8200")
    mount: str = Field(default="secret", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    path_prefix: str = Field(default="makini/{environment}", min_length=1)
    namespace: str | None = Field(default=None, description="Vault Enterprise namespace.")
    auth: VaultAuth = TokenAuth()
    tls: VaultTls = VaultTls()
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_versions: int = Field(
        default=20, ge=3, le=20, description="KV versions kept per credential (set on creation)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("auth", mode="before")
    @classmethod
    def _auth(cls, value: object) -> object:
        # name the known methods here: a bad tag would otherwise read as a bad backend type
        if isinstance(value, dict):
            method = value.get("method", "token")
            if method not in _AUTH_METHODS:
                raise ValueError(f"unknown auth method {str(method)!r:.40}: use "
                                 + ", ".join(repr(m) for m in _AUTH_METHODS))
            return {**value, "method": method}
        return value

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        check_template(value)
        rendered = render_template(value, "env").strip("/")
        if not rendered or not re.match(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", rendered):
            raise ValueError("a path such as 'makini/{environment}' (letters, digits, _.- and /)")
        return value.strip("/")

    def resolve_paths(self, base: Path) -> VaultSettings:
        tls, auth = self.tls, self.auth
        if tls.ca_cert is not None and not tls.ca_cert.is_absolute():
            tls = tls.model_copy(update={"ca_cert": (base / tls.ca_cert).resolve()})
        if isinstance(auth, KubernetesAuth) and not auth.jwt_path.is_absolute():
            auth = auth.model_copy(update={"jwt_path": (base / auth.jwt_path).resolve()})
        return self.model_copy(update={"tls": tls, "auth": auth})

    def location(self, environment: str) -> str:
        namespace = f"{self.namespace.strip('/')}/" if self.namespace else ""
        prefix = render_template(self.path_prefix, environment)
        return f"{self.url}/v1/{namespace}{self.mount}/data/{prefix}"

    location_key: ClassVar[str] = "path_prefix"

    def place(self, environment: str) -> Place:
        """The server (scheme and host in lower case, no default port) and the path below
        ``/v1/`` (namespace, mount, ``data``, prefix) with ``//``, ``.`` and ``..`` resolved as
        the server resolves them: a prefix that is a parent of another contains it."""
        prefix = render_template(self.path_prefix, environment)
        return Place(
            f"vault {canonical_url(self.url)}/v1",
            segments(self.namespace or "", self.mount, "data", prefix),
        )


# --- vendor exceptions -> the project's tree ------------------------------------------------


class CasMismatch(BackendConflict):
    """Another writer added a KV version first (check-and-set did not match)."""


def _vault_detail(exc: Any) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return scrub("; ".join(str(e) for e in errors))
    return "no detail"  # never the response text: it may carry data


def map_vault_error(exc: BaseException, target: Target, where: str) -> RotatorError | None:
    """The project error for an hvac or requests exception (``None`` for anything else)."""
    try:
        import hvac.exceptions as hx
    except ImportError:  # pragma: no cover
        hx = None
    if hx is not None and isinstance(exc, hx.VaultError):
        detail = _vault_detail(exc)
        said = f"Vault answered {getattr(exc, 'method', None) or 'a request'} with " \
               f"{type(exc).__name__}: {detail}"
        if isinstance(exc, hx.Forbidden | hx.Unauthorized):
            return target.error(
                BackendPermissionDenied, f"Vault refused access to {where}: {detail}",
                where=where,
                hint="the token is invalid or expired, or its policies do not allow this path "
                "(data, metadata and destroy paths of the prefix)",
            )
        if isinstance(exc, hx.InvalidPath):
            if "no handler for route" in detail:
                return target.error(
                    BackendError, f"Vault has no such mount: {detail}", where=where,
                    hint="check 'mount' (a KV version 2 secrets engine) and 'namespace'",
                )
            return target.error(NotFound, said, where=where)
        if isinstance(exc, hx.InvalidRequest) and "check-and-set" in detail:
            return target.error(CasMismatch, "another writer changed the secret at the same "
                                "time (check-and-set did not match)", where=where,
                                hint="retried automatically; if it persists, two rotators "
                                "write the same credential")
        if isinstance(exc, hx.VaultDown | hx.VaultNotInitialized):
            return target.error(BackendUnavailable, said, where=where,
                                hint="Vault is sealed, uninitialised or in standby; unseal it")
        if isinstance(exc, hx.RateLimitExceeded | hx.InternalServerError | hx.BadGateway
                      | hx.PreconditionFailed):
            return target.error(BackendUnavailable, said, where=where, hint=HINT_UNREACHABLE)
        if isinstance(exc, hx.UnsupportedOperation):
            return target.error(BackendError, said, where=where,
                                hint="the mount must be a KV version 2 secrets engine")
        return target.error(BackendError, said, where=where)
    try:
        import requests.exceptions as rx
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, rx.SSLError):
        return target.error(BackendUnavailable, f"TLS with Vault failed: {scrub(exc)}",
                            where=where, hint=HINT_TLS)
    if isinstance(exc, rx.Timeout):
        return target.error(BackendUnavailable, f"Vault did not answer in time: {scrub(exc)}",
                            where=where, hint=HINT_UNREACHABLE)
    if isinstance(exc, rx.ConnectionError):
        return target.error(BackendUnavailable, f"cannot reach Vault: {scrub(exc)}",
                            where=where, hint=HINT_UNREACHABLE)
    if isinstance(exc, rx.RequestException):
        return target.error(BackendError, f"HTTP request to Vault failed: {scrub(exc)}",
                            where=where)
    return None


# --- the backend ----------------------------------------------------------------------------


@dataclass
class _Meta:
    """A secret's KV metadata."""

    current_version: int
    versions: dict[int, dict[str, Any]]
    custom: dict[str, str]
    max_versions: int = 0

    @classmethod
    def parse(cls, data: dict[str, Any]) -> _Meta:
        versions = {int(k): v for k, v in (data.get("versions") or {}).items()}
        return cls(int(data.get("current_version") or 0), versions,
                   dict(data.get("custom_metadata") or {}), int(data.get("max_versions") or 0))

    def numbered(self, prefix: str) -> dict[int, str]:
        out = {}
        for key, value in self.custom.items():
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                out[int(key[len(prefix):])] = value
        return out

    def time_of(self, prefix: str, n: int) -> int | None:
        value = self.custom.get(f"{prefix}{n}", "")
        return int(value) if value.isdigit() else None

    def kv_readable(self, n: int) -> bool:
        info = self.versions.get(n)
        return info is not None and not info.get("destroyed") and not info.get("deletion_time")

    def stale_keys(self, newest: int = 0) -> dict[str, str | None]:
        """Records of versions KV no longer holds, or drops as version ``newest`` arrives
        (``max_versions``): to delete."""
        keep_from = newest - self.max_versions + 1 if newest and self.max_versions else 0
        return {f"{prefix}{n}": None for prefix in _RECORD_KEYS
                for n in self.numbered(prefix) if n not in self.versions or n < keep_from}


@dataclass
class _State:
    """A secret's metadata with every KV version mapped to our version id."""

    meta: _Meta
    mapping: dict[int, str]
    found: dict[str, str | None]  # map entries learnt by reading documents, not yet recorded

    @property
    def records(self) -> list[VersionRecord]:
        meta = self.meta
        return [
            VersionRecord(
                key=str(n), version_id=vid, order=n,
                promoted_ns=meta.time_of(KEY_PROMOTED, n), retired_ns=meta.time_of(KEY_RETIRED, n),
                readable=self.readable(n),
            )
            for n, vid in sorted(self.mapping.items())
        ]

    def readable(self, n: int) -> bool:
        return self.meta.kv_readable(n) and self.meta.time_of(KEY_RETIRED, n) is None

    def stages(self) -> dict[int, Stage]:
        return {int(k): stage for k, stage in resolve_stages(self.records).items()}

    def kv_of(self, vid: str) -> int | None:
        found = [n for n, v in self.mapping.items() if v == vid]
        return max(found) if found else None

    def holder(self, stage: Stage) -> int | None:
        return next((n for n, s in self.stages().items() if s is stage), None)

    def patch(self, changes: Mapping[str, str | None], newest: int = 0) -> dict[str, str | None]:
        """``changes`` plus the bookkeeping every write carries along."""
        return {**self.found, **changes, **self.meta.stale_keys(newest)}


class VaultBackend(Backend):
    """Versions of a credential as versions of one KV v2 secret."""

    kind = "vault"
    capabilities: ClassVar[Capabilities] = Capabilities(destroys=True, native_stages=False)
    Settings = VaultSettings

    def __init__(self, settings: BackendSettings, environment: str, *,
                 client: Any = None) -> None:
        """``client``: an authenticated ``hvac.Client`` to use instead of logging in."""
        super().__init__(settings, environment)
        assert isinstance(settings, VaultSettings)
        self._cfg = settings
        self._prefix = render_template(settings.path_prefix, environment).strip("/")
        self._target = Target(self.name, self.location, environment)
        self._injected = client
        self._client_obj: Any = None
        self._minted = False
        self._renew_at = math.inf
        self._lock = threading.Lock()

    @classmethod
    def available(cls) -> None:
        require("hvac", "vault")

    # plumbing ---------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._injected is not None:
            return self._injected
        with self._lock:
            if self._client_obj is not None and time.monotonic() < self._renew_at:
                return self._client_obj
            old, was_minted = self._client_obj, self._minted
            self._client_obj = self._login()
            client = self._client_obj
        if old is not None:
            self._release(old, was_minted)
        return client

    def _login(self) -> Any:
        hvac = require("hvac", "vault")
        cfg, where = self._cfg, f"{self._cfg.url} (auth {self._cfg.auth.method})"
        verify: bool | str = str(cfg.tls.ca_cert) if cfg.tls.ca_cert else cfg.tls.verify
        client = hvac.Client(url=cfg.url, token="", namespace=cfg.namespace, verify=verify,
                             timeout=cfg.timeout_s)
        auth = cfg.auth
        self._minted, self._renew_at = False, math.inf
        with self._target.calling(map_vault_error, where):
            if isinstance(auth, TokenAuth):
                client.token = self._env(auth.token_env, where)
                return client
            if isinstance(auth, AppRoleAuth):
                answer = client.auth.approle.login(
                    role_id=self._env(auth.role_id_env, where),
                    secret_id=self._env(auth.secret_id_env, where),
                    mount_point=auth.mount_point,
                )
            else:
                try:
                    jwt = auth.jwt_path.read_text().strip()
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) else "it is not text"
                    raise self._target.error(
                        BackendPermissionDenied,
                        "cannot read the Kubernetes service account token "
                        f"{auth.jwt_path} (auth.jwt_path): {reason}",
                        where=str(auth.jwt_path),
                        hint="mount the service account token, or set auth.jwt_path",
                    ) from None
                answer = client.auth.kubernetes.login(role=auth.role, jwt=jwt,
                                                      mount_point=auth.mount_point)
        self._minted = True
        ttl = float((answer or {}).get("auth", {}).get("lease_duration") or 0)
        if ttl > 0:
            self._renew_at = time.monotonic() + ttl * 0.75
        return client

    def _env(self, name: str, where: str) -> str:
        value = os.environ.get(name)
        if not value:
            raise self._target.error(
                BackendPermissionDenied, f"the environment variable {name} is not set",
                where=where, hint=f"export {name} for the Vault {self._cfg.auth.method} login",
            )
        return value

    def _release(self, client: Any, minted: bool) -> None:
        try:
            if minted:
                client.auth.token.revoke_self()
        except Exception:  # noqa: BLE001, S110 - best effort: the token expires anyway
            pass
        finally:
            adapter = getattr(client, "adapter", None)
            if adapter is not None and hasattr(adapter, "close"):
                adapter.close()

    @property
    def minted_token(self) -> bool:
        """Whether the token in use was minted by a login (and so is revoked by close())."""
        return self._minted

    def _kv(self) -> Any:
        return self._client().secrets.kv.v2

    def _path(self, credential: str) -> str:
        self._target.check_name(credential)
        return f"{self._prefix}/{credential}"

    def _where(self, credential: str) -> str:
        return f"{self.location}/{credential}"

    def _meta(self, credential: str) -> _Meta | None:
        path, where = self._path(credential), self._where(credential)
        kv = self._kv()
        try:
            with self._target.calling(map_vault_error, where):
                answer = kv.read_secret_metadata(path=path, mount_point=self._cfg.mount)
        except NotFound:
            return None
        return _Meta.parse(answer.get("data") or {})

    def _owned(self, credential: str) -> _Meta | None:
        meta = self._meta(credential)
        if meta is not None:
            self._target.check_owner(meta.custom, self._where(credential))
        return meta

    def _state(self, credential: str, meta: _Meta | None = None) -> _State | None:
        """The secret's state, every KV version mapped to our version id (``None``: no secret).

        A KV version without a map entry (a crash between the data write and the metadata
        patch) is mapped by reading its document."""
        meta = meta or self._owned(credential)
        if meta is None:
            return None
        mapped = meta.numbered(KEY_VERSION)
        mapping = {n: vid for n, vid in mapped.items() if n in meta.versions}
        found: dict[str, str | None] = {}
        for n in sorted(meta.versions):
            if n in mapping or not meta.kv_readable(n):
                continue
            data = self._read_data(credential, n)
            vid = data.get("version") if data else None
            if isinstance(vid, str) and data and data.get("environment") == self.environment:
                mapping[n] = vid
                found[f"{KEY_VERSION}{n}"] = vid
        return _State(meta, mapping, found)

    def _patch(self, credential: str, changes: dict[str, str | None]) -> None:
        if not changes:
            return
        path, where = self._path(credential), self._where(credential)
        client = self._client()
        url = f"/v1/{self._cfg.mount}/metadata/{path}"
        with self._target.calling(map_vault_error, where):
            client.adapter.request("PATCH", url, json={"custom_metadata": changes},
                                   headers={"Content-Type": "application/merge-patch+json"})

    def _read_data(self, credential: str, n: int) -> dict[str, Any] | None:
        path, where = self._path(credential), self._where(credential)
        kv = self._kv()
        try:
            with self._target.calling(map_vault_error, where):
                answer = kv.read_secret_version(path=path, version=n,
                                                mount_point=self._cfg.mount,
                                                raise_on_deleted_version=False)
        except NotFound:  # destroyed meanwhile
            return None
        data = (answer.get("data") or {}).get("data")
        return data if isinstance(data, dict) else None

    def _read(self, credential: str, state: _State, n: int | None) -> StoredVersion | None:
        if n is None or not state.readable(n):
            return None
        data = self._read_data(credential, n)
        if data is None:
            return None
        return self._target.parse(data, where=f"{self._where(credential)} (KV version {n})",
                                  credential=credential, version_id=state.mapping[n],
                                  stage=state.stages().get(n))

    # the interface ----------------------------------------------------------------------

    def stage_pending(self, version: StoredVersion) -> None:
        self._target.check_writable(version)
        credential, vid = version.credential, version.version_id
        path, where = self._path(credential), self._where(credential)
        meta = self._owned(credential)
        if meta is None:
            with self._target.calling(map_vault_error, where):
                self._kv().update_metadata(path=path, max_versions=self._cfg.max_versions,
                                           custom_metadata=ownership_tags(self.environment),
                                           mount_point=self._cfg.mount)
            meta = self._owned(credential) or _Meta(0, {}, ownership_tags(self.environment))

        def write() -> None:
            nonlocal meta
            assert meta is not None
            state = self._state(credential, meta)
            assert state is not None
            if state.kv_of(vid) is not None:  # written before (perhaps its record was lost)
                self._patch(credential, state.found)
                return
            try:
                with self._target.calling(map_vault_error, where):
                    answer = self._kv().create_or_update_secret(
                        path=path, secret=version.to_document(), cas=meta.current_version,
                        mount_point=self._cfg.mount,
                    )
            except CasMismatch:  # another writer added a version first: look again
                meta = self._owned(credential)
                if meta is None:
                    raise self._target.error(BackendConflict, "the secret was deleted while "
                                             "being written", where=where) from None
                raise
            n = int(answer["data"]["version"])
            self._patch(credential, state.patch({f"{KEY_VERSION}{n}": vid}, newest=n))

        try:
            CONFLICT.call(CasMismatch, write)
        except CasMismatch:
            raise self._target.error(
                BackendConflict, f"gave up writing after {CONFLICT.attempts} check-and-set "
                "conflicts with other writers", where=where,
            ) from None

    def promote(self, credential: str, version_id: str) -> None:
        state = self._state(credential)
        n = state.kv_of(version_id) if state else None
        if state is None or n is None or not state.readable(n):
            raise self._target.not_held(version_id, self._where(credential))
        if state.stages().get(n) is Stage.CURRENT:
            self._patch(credential, state.found)
            return
        when = next_event_ns(state.records)
        self._patch(credential, state.patch({f"{KEY_PROMOTED}{n}": str(when)}))

    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        state = self._state(credential)
        return self._read(credential, state, state.holder(Stage(stage))) if state else None

    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        state = self._state(credential)
        return self._read(credential, state, state.kv_of(version_id)) if state else None

    def versions(self, credential: str) -> list[VersionInfo]:
        state = self._state(credential)
        if state is None:
            return []
        stages = state.stages()
        latest = {vid: n for n, vid in sorted(state.mapping.items())}
        return [VersionInfo(vid, stages.get(n), state.readable(n))
                for vid, n in sorted(latest.items(), key=lambda item: item[1])]

    def make_unreadable(self, credential: str, version_id: str) -> None:
        path, where = self._path(credential), self._where(credential)
        state = self._state(credential)
        if state is None:
            return
        numbers = [n for n, vid in state.mapping.items() if vid == version_id]
        if not numbers:
            return
        when = str(next_event_ns(state.records))
        retire = {f"{KEY_RETIRED}{n}": when for n in numbers
                  if state.meta.time_of(KEY_RETIRED, n) is None}
        # record first: readers stop at once, and the id stays known once the document is gone
        self._patch(credential, state.patch(retire) if retire else state.found)
        doomed = [n for n in numbers
                  if n in state.meta.versions and not state.meta.versions[n].get("destroyed")]
        if doomed:
            with self._target.calling(map_vault_error, where):
                self._kv().destroy_secret_versions(path=path, versions=doomed,
                                                   mount_point=self._cfg.mount)

    def delete(self, credential: str) -> None:
        path, where = self._path(credential), self._where(credential)
        if self._owned(credential) is None:
            return
        try:
            with self._target.calling(map_vault_error, where):
                self._kv().delete_metadata_and_all_versions(path=path,
                                                            mount_point=self._cfg.mount)
        except NotFound:
            return

    def credentials(self) -> list[str]:
        kv = self._kv()
        try:
            with self._target.calling(map_vault_error, self.location):
                answer = kv.list_secrets(path=self._prefix, mount_point=self._cfg.mount)
        except NotFound:
            return []
        found = []
        for key in (answer.get("data") or {}).get("keys") or []:
            if not isinstance(key, str) or key.endswith("/") or not _NAME.match(key):
                continue
            meta = self._meta(key)
            try:
                if meta is not None:
                    self._target.check_owner(meta.custom, self._where(key))
                    found.append(key)
            except BackendConflict:
                continue  # not ours: never listed
        return sorted(found)

    def check(self) -> None:
        client = self._client()
        with self._target.calling(map_vault_error, f"{self._cfg.url} (token lookup)"):
            client.auth.token.lookup_self()
        try:
            with self._target.calling(map_vault_error, self.location):
                self._kv().list_secrets(path=self._prefix, mount_point=self._cfg.mount)
        except NotFound:
            return

    def close(self) -> None:
        with self._lock:
            client, minted = self._client_obj, self._minted
            self._client_obj, self._minted = None, False
        if client is not None:
            self._release(client, minted)
