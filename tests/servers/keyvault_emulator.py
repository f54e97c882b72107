"""An Azure Key Vault (secrets) REST emulator for tests, served over HTTPS.

It plays the parts of the Key Vault data-plane API the rotator uses, as the real service answers
them, so that the real ``azure-keyvault-secrets`` SDK runs unchanged against it:

* the **bearer challenge**: a request without ``Authorization`` is answered ``401`` with
  ``WWW-Authenticate: Bearer authorization=..., resource=...`` before its body is read; the SDK
  then asks its credential for a token and repeats the request with it;
* ``PUT /secrets/{name}`` (a new version), ``GET /secrets/{name}/`` (latest) and
  ``GET /secrets/{name}/{version}``, ``PATCH /secrets/{name}/{version}`` (enabled, tags,
  content type), ``GET /secrets/{name}/versions``, ``GET /secrets`` (paged with ``nextLink``),
  ``DELETE /secrets/{name}`` (soft delete), ``GET|DELETE /deletedsecrets/{name}`` (purge),
  ``POST /deletedsecrets/{name}/recover``, ``GET /deletedsecrets``;
* names ``^[0-9a-zA-Z-]{1,127}$``, case-insensitive; at most 15 tags; a disabled version answers
  ``403 Forbidden/SecretDisabled``; a soft-deleted name cannot be reused (``409``); every request
  needs ``api-version``;
* per-token permissions (``get``, ``list``, ``set``, ``delete``, ``purge``, ``recover``), so tests
  can see a ``403`` as the service gives it;
* the vault's recovery level: ``Recoverable+Purgeable`` (soft delete, default), ``Recoverable``
  (purge protection: purge is forbidden) or ``Purgeable`` (no soft delete: no ``recoveryId``);
  ``delete_delay_s`` makes a soft delete take time, as it does in Azure.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

ALL_PERMISSIONS = frozenset({"get", "list", "set", "delete", "purge", "recover"})
TENANT = "00000000-0000-0000-0000-00000000feed"
_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_MAX_TAGS = 15
_MAX_VALUE = 25 * 1024


class TestCredential:
    """A ``TokenCredential`` handing out a fixed bearer token (and counting requests)."""

    __test__ = False

    def __init__(self, token: str) -> None:
        self.token = token
        self.requests = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.requests += 1
        return AccessToken(self.token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


@dataclass
class _Version:
    id: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Secret:
    name: str
    versions: dict[str, _Version] = field(default_factory=dict)  # creation order

    def latest(self) -> _Version | None:
        return next(reversed(self.versions.values()), None)


@dataclass
class _Deleted:
    secret: _Secret
    deleted: int
    visible_at: float


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


class KeyVaultEmulator:
    """Start with :meth:`start`; ``url`` is the vault URL, ``ca_path`` the CA to trust."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""
        self.ca_path = directory / "keyvault-ca.pem"
        self.recovery_level = "Recoverable+Purgeable"
        self.delete_delay_s = 0.0
        self.page_size = 25
        self.challenges = 0
        self.tokens: dict[str, frozenset[str]] = {"test-token": ALL_PERMISSIONS}
        self._secrets: dict[str, _Secret] = {}
        self._deleted: dict[str, _Deleted] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # control ------------------------------------------------------------------------------

    def start(self) -> str:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self.ca_path))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        emulator = self

        class Handler(_Handler):
            vault = emulator

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="keyvault-emulator",
                                        daemon=True)
        self._thread.start()
        self.url = f"https://127.0.0.1:{server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        with self._lock:
            self._secrets.clear()
            self._deleted.clear()
            self.recovery_level = "Recoverable+Purgeable"
            self.delete_delay_s = 0.0
            self.page_size = 25
            self.tokens = {"test-token": ALL_PERMISSIONS}

    def credential(self, token: str = "test-token") -> TestCredential:  # noqa: S107
        return TestCredential(token)

    def grant(self, token: str, permissions: set[str] | frozenset[str]) -> None:
        self.tokens[token] = frozenset(permissions)

    def secret_names(self) -> list[str]:
        with self._lock:
            return sorted(s.name for s in self._secrets.values())

    def deleted_names(self) -> list[str]:
        with self._lock:
            return sorted(d.secret.name for d in self._deleted.values())

    def raw_versions(self, name: str) -> list[dict[str, Any]]:
        """What the vault holds for ``name`` (tests look behind the SDK with it)."""
        with self._lock:
            secret = self._secrets.get(name.lower())
            return [] if secret is None else [
                {"id": v.id, "value": v.value, "enabled": v.enabled, "tags": dict(v.tags or {})}
                for v in secret.versions.values()
            ]

    # the API ------------------------------------------------------------------------------

    @property
    def _soft_delete(self) -> bool:
        return "Recoverable" in self.recovery_level

    def _attributes(self, v: _Version) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": v.enabled, "created": v.created, "updated": v.updated,
                                 "recoveryLevel": self.recovery_level}
        if self._soft_delete:
            attrs["recoverableDays"] = 90
        return attrs

    def _item(self, base: str, secret: _Secret, v: _Version, *, versioned: bool = True,
              value: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": f"{base}/secrets/{secret.name}" + (f"/{v.id}" if versioned else ""),
            "attributes": self._attributes(v),
        }
        if value:
            out["value"] = v.value
        if v.tags:
            out["tags"] = dict(v.tags)
        if v.content_type is not None:
            out["contentType"] = v.content_type
        return out

    def _secret(self, name: str) -> _Secret:
        secret = self._secrets.get(name.lower())
        if secret is None or not secret.versions:
            raise _Error(404, "SecretNotFound",
                         f"A secret with (name/id) {name} was not found in this key vault. If you "
                         "recently deleted this secret you may be able to recover it using the "
                         "correct recovery command.")
        return secret

    def _version(self, secret: _Secret, version: str) -> _Version:
        if not version:
            latest = secret.latest()
            assert latest is not None
            return latest
        found = secret.versions.get(version.lower())
        if found is None:
            raise _Error(404, "SecretNotFound",
                         f"A secret with (name/id) {secret.name}/{version} was not found in this "
                         "key vault.")
        return found

    def _check_deleted_name(self, name: str) -> None:
        deleted = self._deleted.get(name.lower())
        if deleted is None:
            return
        if time.monotonic() < deleted.visible_at:
            raise _Error(409, "Conflict", f"Secret {name} is currently being deleted.",
                         "ObjectIsBeingDeleted")
        raise _Error(409, "Conflict",
                     f"Secret {name} is currently in a deleted but recoverable state, and its "
                     "name cannot be reused; in this state, the secret can only be recovered or "
                     "purged.", "ObjectIsDeletedButRecoverable")

    def _page(self, base: str, path: str, items: list[dict[str, Any]],
              query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            size = min(int(query.get("maxresults", [str(self.page_size)])[0]), self.page_size)
            skip = int(query.get("$skiptoken", ["0"])[0])
        except ValueError:
            raise _Error(400, "BadParameter", "invalid paging parameter") from None
        size = max(size, 1)
        page = items[skip:skip + size]
        next_link = None
        if skip + size < len(items):
            api = query.get("api-version", ["7.5"])[0]
            next_link = (f"{base}{path}?api-version={quote(api)}&$skiptoken={skip + size}"
                         f"&maxresults={size}")
        return {"value": page, "nextLink": next_link}

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes,
               permissions: frozenset[str], base: str) -> tuple[int, dict[str, Any] | None]:
        if not query.get("api-version"):
            raise _Error(400, "BadParameter", "The request is missing the api-version parameter")
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []

        def need(permission: str) -> None:
            if permission not in permissions:
                raise _Error(403, "Forbidden",
                             f"The user, group or application does not have secrets {permission} "
                             "permission on key vault 'emulator'.", "ForbiddenByPolicy")

        def payload() -> dict[str, Any]:
            try:
                data = json.loads(body or b"{}")
            except json.JSONDecodeError:
                raise _Error(400, "BadParameter", "The request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _Error(400, "BadParameter", "The request body must be a JSON object")
            return data

        with self._lock:
            if parts[:1] == ["secrets"]:
                rest = parts[1:]
                if not rest or rest == [""]:
                    if method != "GET":
                        raise _Error(405, "MethodNotAllowed", "method not allowed")
                    need("list")
                    items = [self._item(base, s, v, versioned=False)
                             for s in self._secrets.values() if (v := s.latest()) is not None]
                    return 200, self._page(base, "/secrets", items, query)
                name = rest[0]
                version = rest[1] if len(rest) > 1 else ""
                if len(rest) > 2:
                    raise _Error(404, "NotFound", "unknown path")
                if method == "PUT" and len(rest) == 1:
                    need("set")
                    return 200, self._set(base, name, payload())
                if method == "GET" and version == "versions":
                    need("list")
                    secret = self._secret(name)
                    items = [self._item(base, secret, v) for v in secret.versions.values()]
                    return 200, self._page(base, f"/secrets/{secret.name}/versions", items, query)
                if method == "GET":
                    need("get")
                    secret = self._secret(name)
                    v = self._version(secret, version)
                    if not v.enabled:
                        raise _Error(403, "Forbidden",
                                     "Operation get is not allowed on a disabled secret.",
                                     "SecretDisabled")
                    return 200, self._item(base, secret, v, value=True)
                if method == "PATCH":
                    need("set")
                    secret = self._secret(name)
                    v = self._version(secret, version)
                    self._update(v, payload())
                    return 200, self._item(base, secret, v)
                if method == "DELETE" and len(rest) == 1:
                    need("delete")
                    return 200, self._delete(base, name)
                raise _Error(405, "MethodNotAllowed", "method not allowed")
            if parts[:1] == ["deletedsecrets"]:
                rest = parts[1:]
                if not rest or rest == [""]:
                    need("list")
                    items = [self._deleted_item(base, d) for d in self._deleted.values()
                             if time.monotonic() >= d.visible_at]
                    return 200, self._page(base, "/deletedsecrets", items, query)
                deleted = self._deleted.get(rest[0].lower())
                if deleted is None or time.monotonic() < deleted.visible_at:
                    raise _Error(404, "DeletedSecretNotFound",
                                 f"Deleted Secret not found: {rest[0]}")
                if method == "GET" and len(rest) == 1:
                    need("get")
                    return 200, self._deleted_item(base, deleted)
                if method == "DELETE" and len(rest) == 1:
                    need("purge")
                    if "Purgeable" not in self.recovery_level:
                        raise _Error(403, "Forbidden",
                                     'Operation "purge" is not enabled for this vault: purge '
                                     "protection is on.", "PurgeProtected")
                    del self._deleted[rest[0].lower()]
                    return 204, None
                if method == "POST" and rest[1:] == ["recover"]:
                    need("recover")
                    del self._deleted[rest[0].lower()]
                    self._secrets[deleted.secret.name.lower()] = deleted.secret
                    latest = deleted.secret.latest()
                    assert latest is not None
                    return 200, self._item(base, deleted.secret, latest)
                raise _Error(405, "MethodNotAllowed", "method not allowed")
            raise _Error(404, "NotFound", "unknown path")

    def _set(self, base: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
        if not _NAME.match(name):
            raise _Error(400, "BadParameter",
                         f"The request URI contains an invalid name: {name[:130]}")
        self._check_deleted_name(name)
        value = data.get("value")
        if not isinstance(value, str):
            raise _Error(400, "BadParameter", "Property value is required")
        if len(value) > _MAX_VALUE:
            raise _Error(400, "BadParameter", "Secret value is too long")
        tags = self._tags(data.get("tags"))
        enabled = (data.get("attributes") or {}).get("enabled", True)
        secret = self._secrets.setdefault(name.lower(), _Secret(name))
        v = _Version(uuid.uuid4().hex, value, data.get("contentType"), tags, bool(enabled))
        secret.versions[v.id] = v
        return self._item(base, secret, v, value=True)

    def _tags(self, tags: object) -> dict[str, str] | None:
        if tags is None:
            return None
        if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise _Error(400, "BadParameter", "tags must map strings to strings")
        if len(tags) > _MAX_TAGS:
            raise _Error(400, "BadParameter", f"Too many tags: at most {_MAX_TAGS} are allowed")
        if any(len(k) > 512 or len(v) > 256 for k, v in tags.items()):
            raise _Error(400, "BadParameter", "A tag name or value is too long")
        return dict(tags)

    def _update(self, v: _Version, data: dict[str, Any]) -> None:
        attributes = data.get("attributes") or {}
        if "enabled" in attributes:
            v.enabled = bool(attributes["enabled"])
        if "tags" in data:
            v.tags = self._tags(data["tags"])
        if "contentType" in data:
            v.content_type = data["contentType"]
        v.updated = int(time.time())

    def _delete(self, base: str, name: str) -> dict[str, Any]:
        secret = self._secret(name)
        del self._secrets[name.lower()]
        latest = secret.latest()
        assert latest is not None
        now = int(time.time())
        if not self._soft_delete:
            return self._item(base, secret, latest, versioned=True)
        deleted = _Deleted(secret, now, time.monotonic() + self.delete_delay_s)
        self._deleted[name.lower()] = deleted
        return self._deleted_item(base, deleted)

    def _deleted_item(self, base: str, deleted: _Deleted) -> dict[str, Any]:
        latest = deleted.secret.latest()
        assert latest is not None
        out = self._item(base, deleted.secret, latest)
        out.update({
            "recoveryId": f"{base}/deletedsecrets/{deleted.secret.name}",
            "deletedDate": deleted.deleted,
            "scheduledPurgeDate": deleted.deleted + 90 * 86400,
        })
        return out


class _Handler(BaseHTTPRequestHandler):
    vault: KeyVaultEmulator
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: dict[str, Any] | None,
              headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _challenge(self, message: str) -> None:
        self.vault.challenges += 1
        self._send(401, {"error": {"code": "Unauthorized", "message": message}}, {
            "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
                                f'{TENANT}", resource="https://vault.azure.net"',
        })

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            # Key Vault answers the challenge without reading the body
            if length:
                self.close_connection = True
            self._challenge("AKV10000: Request is missing a Bearer or PoP token.")
            return
        body = self.rfile.read(length) if length else b""
        permissions = self.vault.tokens.get(auth.removeprefix("Bearer ").strip())
        if permissions is None:
            self._challenge("AKV10032: Invalid issuer or token.")
            return
        url = urlsplit(self.path)
        base = f"https://{self.headers.get('Host', '127.0.0.1')}"
        try:
            status, payload = self.vault.handle(self.command, url.path, parse_qs(url.query),
                                                body, permissions, base)
        except _Error as exc:
            self._send(exc.status, exc.body())
            return
        self._send(status, payload)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _dispatch
