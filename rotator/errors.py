"""The one exception tree of the rotator.

Every vendor exception (httpx, boto, hvac, azure-core, SQLAlchemy, cryptography) is mapped to one
of these at the boundary where it is raised, with ``raise ... from exc``; the core never sees a
vendor exception. No message ever contains a token: messages name things by fingerprint.

    RotatorError                     what, where (``where``) and what to do next (``hint``)
    ├── ConfigError                  the configuration file or environment is wrong
    ├── NotFound                     an unknown environment, credential or version
    ├── CryptoError                  a key is missing, wrong or the ciphertext is corrupt
    ├── JournalError                 the journal database failed
    │   └── LockBusy                 another worker holds the credential
    │       ├── LeaseLost            this worker's lease expired or was taken: it writes nothing
    │       ├── Superseded           an emergency revoke took the rotation over: it stops
    │       └── Stopping             the process is draining (SIGTERM): the work is parked
    ├── RotationError                a rotation could not complete (carries the rotation id)
    ├── Offboarded                   the credential's connection is gone at Makini: no token
    ├── MakiniError                  the Makini API (status, code, request id)
    │   ├── MakiniRejected           a definite answer: do not retry
    │   │   ├── InvalidToken         401
    │   │   ├── Forbidden            403
    │   │   ├── WrongConnection      a token that works but for another connection
    │   │   └── BadRequest           400, 404, 409, 422
    │   ├── MakiniTransient          worth retrying with backoff (``retry_after_s``)
    │   │   ├── RateLimited          429 (``retry_after_s``)
    │   │   ├── ServerError          5xx
    │   │   ├── MakiniTimeout
    │   │   └── MakiniUnreachable    connection refused, DNS, a TLS handshake that broke
    │   ├── MakiniUntrusted          the server's TLS certificate is not trusted: do not retry
    │   └── MakiniProtocolError      an answer that does not parse as the API says
    └── BackendError                 a secret backend (backend name, location)
        ├── BackendUnavailable       unreachable, throttled, timed out: transient
        ├── BackendPermissionDenied  the identity in use may not do this
        ├── BackendConflict          foreign environment, not managed by us, concurrent writer
        ├── BackendCorrupt           stored data cannot be decrypted or parsed
        ├── BackendInvalidName       the backend refuses the name
        └── NotSupported             the backend cannot do this (see its capabilities)
"""

from __future__ import annotations

from typing import Any


class RotatorError(Exception):
    """Base of every error the rotator raises on purpose.

    ``str()`` gives the message; ``where`` names the place (a key path, a backend, a URL) and
    ``hint`` says what to do next. The CLI prints all three and exits non-zero.
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def describe(self) -> str:
        parts = [self.message]
        if self.where:
            parts.append(f"where: {self.where}")
        if self.hint:
            parts.append(f"next: {self.hint}")
        return "\n".join(parts)


class ConfigError(RotatorError):
    exit_code = 2


class NotFound(RotatorError):
    exit_code = 2


class CryptoError(RotatorError):
    pass


class JournalError(RotatorError):
    pass


class LockBusy(JournalError):
    pass


class LeaseLost(LockBusy):
    """The journal refused a write (or a fence refused an outside write) because this worker
    no longer holds the credential's lease: another worker resumes from the last journaled
    step."""


class Superseded(LockBusy):
    """An emergency revoke took the credential over and superseded this rotation: the journal
    refuses the rotation's further writes (keeping a token it still receives, sealed) and the
    revoke accounts for it."""


class Stopping(LockBusy):
    """The process is stopping (SIGTERM, Ctrl-C): the drive stops at a step boundary, the last
    journaled step stands, and the lease is given back for another worker to resume."""


class Offboarded(RotatorError):
    """A discovered credential whose connection is gone at Makini: nothing issues it a token."""


class RotationError(RotatorError):
    def __init__(self, message: str, *, rotation_id: str | None = None, **kw: str | None):
        super().__init__(message, **kw)
        self.rotation_id = rotation_id


class MakiniError(RotatorError):
    """An error talking to Makini. ``code`` and ``request_id`` come from Makini's answer.

    ``ambiguous`` is true when a request that creates a token (issue, refresh, code exchange)
    failed after Makini may have processed it: a token may have been issued and not received.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        where: str | None = None,
        hint: str | None = None,
        ambiguous: bool = False,
    ):
        super().__init__(message, where=where, hint=hint)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.ambiguous = ambiguous

    def describe(self) -> str:
        text = super().describe()
        extra = []
        if self.status is not None:
            extra.append(f"status {self.status}")
        if self.code:
            extra.append(f"code {self.code}")
        if self.request_id:
            extra.append(f"request id {self.request_id}")
        if self.ambiguous:
            extra.append("a token may have been issued and not received")
        return f"{text}\nmakini: {', '.join(extra)}" if extra else text


class MakiniRejected(MakiniError):
    pass


class InvalidToken(MakiniRejected):
    pass


class Forbidden(MakiniRejected):
    pass


class WrongConnection(MakiniRejected):
    pass


class BadRequest(MakiniRejected):
    pass


class MakiniTransient(MakiniError):
    """Worth retrying. ``retry_after_s`` is Makini's ``Retry-After`` when it sent one (429, 503)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class RateLimited(MakiniTransient):
    pass


class ServerError(MakiniTransient):
    pass


class MakiniTimeout(MakiniTransient):
    pass


class MakiniUnreachable(MakiniTransient):
    pass


class MakiniUntrusted(MakiniError):
    pass


class MakiniProtocolError(MakiniError):
    pass


class BackendError(RotatorError):
    """An error of one backend. ``backend`` is its configured name, ``location`` where it points."""

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        location: str | None = None,
        where: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, where=where or location, hint=hint)
        self.backend = backend
        self.location = location

    def describe(self) -> str:
        prefix = f"backend {self.backend}: " if self.backend else ""
        return prefix + super().describe()


class BackendUnavailable(BackendError):
    pass


class BackendPermissionDenied(BackendError):
    pass


class BackendConflict(BackendError):
    pass


class BackendCorrupt(BackendError):
    pass


class BackendInvalidName(BackendError):
    pass


class NotSupported(BackendError):
    pass
