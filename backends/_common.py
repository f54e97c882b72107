"""Helpers shared by the cloud backends (``aws``, ``vault``, ``azure``).

What lives here is the part every remote store does the same way, so that each backend module
only speaks its vendor's API:

* the ownership tags (``managed-by``, ``makini-rotator:environment``) and the one check that a
  remote secret belongs to this environment and to the rotator (:func:`check_owner`);
* parsing a stored document back into a :class:`~rotator.model.StoredVersion`, refusing one that
  names another environment, credential or version (:meth:`Target.parse`);
* name templates with an ``{environment}`` placeholder (:func:`render_template`);
* running vendor calls under a mapper that turns their exceptions into the project's tree
  (:meth:`Target.calling`; vendor text goes through :func:`rotator.scrub.scrub` first);
* importing an optional dependency with a "pip install" hint (:func:`require`);
* for stores without staging labels (Vault, Key Vault): deriving the stages from per-version
  records that each operation writes for its own version only (:func:`resolve_stages`).
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from backends.base import NAME_PATTERN
from rotator.errors import (
    BackendConflict,
    BackendCorrupt,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
    NotFound,
    NotSupported,
    RotatorError,
)
from rotator.model import MANAGED_BY, Stage, StoredVersion

TAG_MANAGED_BY = "managed-by"
TAG_ENVIRONMENT = "makini-rotator:environment"
TAG_CREDENTIAL = "makini-rotator:credential"

_NAME = re.compile(NAME_PATTERN)
_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")

E = TypeVar("E", bound=RotatorError)

Mapper = Callable[[BaseException, "Target", str], RotatorError | None]
"""Turns a vendor exception into a project error (``None``: not a vendor exception)."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`NotSupported` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotSupported(
            f"the {extra} backend needs the Python package {module.split('.')[0]!r}",
            where=f"import {module}",
            hint=f"install makini-rotator[{extra}]",
        ) from exc


def render_template(template: str, environment: str) -> str:
    """Fill ``{environment}`` in a name template (the only placeholder there is)."""
    return template.replace("{environment}", environment)


def check_template(template: str) -> str:
    """Validate a name template for a pydantic validator: only ``{environment}`` may appear."""
    for field_name in _TEMPLATE_FIELD.findall(template):
        if field_name != "environment":
            raise ValueError(
                f"unknown placeholder {{{field_name}}}: the only placeholder is {{environment}}"
            )
    stripped = _TEMPLATE_FIELD.sub("", template)
    if "{" in stripped or "}" in stripped:
        raise ValueError("unbalanced braces: write {environment} or no braces at all")
    return template


def ownership_tags(environment: str) -> dict[str, str]:
    """The tags (or custom metadata) every secret the rotator creates carries."""
    return {TAG_MANAGED_BY: MANAGED_BY, TAG_ENVIRONMENT: environment}


@dataclass(frozen=True)
class Target:
    """Who is speaking (backend name) and where (its location): attached to every error."""

    backend: str
    location: str
    environment: str

    def error(
        self, cls: type[E], message: str, *, where: str | None = None, hint: str | None = None
    ) -> E:
        """An error of ``cls`` naming this backend and location; without a ``hint``, the
        plain-words default for the kind of error."""
        hint = hint or next((_DEFAULT_HINTS[k] for k in cls.__mro__ if k in _DEFAULT_HINTS), None)
        if issubclass(cls, BackendError):
            return cls(message, backend=self.backend, location=self.location,
                       where=where, hint=hint)
        return cls(f"backend {self.backend}: {message}", where=where or self.location, hint=hint)

    @contextmanager
    def calling(self, mapper: Mapper, where: str) -> Iterator[None]:
        """Run vendor calls; map what they raise to the project tree (``raise ... from``)."""
        try:
            yield
        except RotatorError:
            raise
        except Exception as exc:
            mapped = mapper(exc, self, where)
            if mapped is None:
                raise
            raise mapped from exc

    def not_held(self, version_id: str, where: str) -> NotFound:
        """What ``promote`` raises for a version the backend does not hold (or not readably)."""
        return self.error(
            NotFound, f"cannot promote version {version_id}: this backend does not hold it",
            where=where, hint="stage the version first; a version made unreadable cannot return",
        )

    def check_name(self, credential: str) -> None:
        """Credential names follow the config's pattern; anything else never reaches a store."""
        if not isinstance(credential, str) or not _NAME.match(credential):
            raise self.error(
                BackendInvalidName,
                f"{credential!r:.80} is not a credential name",
                hint="credential names are lower-case letters, digits, '-' and '_' (max 63)",
            )

    def check_writable(self, version: StoredVersion) -> None:
        """A version of another environment is never written here."""
        self.check_name(version.credential)
        if version.environment != self.environment:
            raise self.error(
                BackendConflict,
                f"refusing to store a version of environment {version.environment!r} in the "
                f"backend of environment {self.environment!r}",
                where=f"{self.location} {version.credential}",
                hint="each environment writes only to its own backends",
            )

    def check_owner(self, tags: Mapping[str, str] | None, where: str) -> None:
        """Refuse a remote secret not managed by the rotator or tagged with another environment."""
        tags = tags or {}
        if tags.get(TAG_MANAGED_BY) != MANAGED_BY:
            raise self.error(
                BackendConflict,
                "refusing to touch a secret the rotator does not manage "
                f"(it lacks the tag {TAG_MANAGED_BY}={MANAGED_BY})",
                where=where,
                hint="pick another name or prefix, or remove the foreign secret",
            )
        owner = tags.get(TAG_ENVIRONMENT)
        if owner != self.environment:
            raise self.error(
                BackendConflict,
                f"the secret belongs to environment {owner!r}, not {self.environment!r}",
                where=where,
                hint="environments must never share storage: give each its own prefix or store",
            )

    def parse(
        self,
        document: str | bytes | Mapping[str, Any] | None,
        *,
        where: str,
        credential: str,
        version_id: str | None = None,
        stage: Stage | None = None,
    ) -> StoredVersion:
        """A stored document as a version, checked against what the caller asked for.

        Raises :class:`BackendConflict` for a document of another environment or credential, or
        one the rotator did not write; :class:`BackendCorrupt` for one that does not parse.
        """
        if document is None:
            raise self.error(BackendCorrupt, "the stored version has no value", where=where)
        if isinstance(document, str | bytes):
            try:
                doc: object = json.loads(document)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self.error(
                    BackendCorrupt, "the stored value is not JSON", where=where,
                    hint="someone overwrote the secret; rotate to write a fresh version",
                ) from None
        else:
            doc = dict(document)
        if not isinstance(doc, dict) or doc.get("managed_by") != MANAGED_BY:
            raise self.error(
                BackendConflict, "the stored value was not written by the rotator", where=where,
                hint="remove the foreign value or choose another prefix",
            )
        if doc.get("environment") != self.environment:
            raise self.error(
                BackendConflict,
                f"the stored value belongs to environment {str(doc.get('environment'))!r:.40}",
                where=where, hint="environments must never share storage",
            )
        if doc.get("credential") != credential:
            raise self.error(
                BackendConflict,
                f"the stored value belongs to credential {str(doc.get('credential'))!r:.80}",
                where=where,
            )
        try:
            version = StoredVersion.from_document(doc, stage)
        except ValueError as exc:
            raise self.error(BackendCorrupt, f"the stored value is damaged: {exc}",
                             where=where) from None
        if version_id is not None and version.version_id != version_id:
            raise self.error(
                BackendCorrupt,
                f"version {version_id} holds the document of version {version.version_id}",
                where=where,
            )
        return version


HINT_UNREACHABLE = "check the URL, the network path and that the service is up; this is retried"
HINT_TLS = "check the server certificate and the CA bundle the backend is configured with"

_DEFAULT_HINTS: dict[type[RotatorError], str] = {
    NotFound: "it does not exist (any more) at this location",
    BackendUnavailable: HINT_UNREACHABLE,
    BackendPermissionDenied: "grant the identity in use access to this location",
    BackendConflict: "the secret is in a state that forbids this, or another writer changed it "
                     "at the same time: look at it, then retry",
    BackendCorrupt: "the stored value was changed outside the rotator: rotate to write a fresh "
                    "version",
    BackendInvalidName: "choose a name the store accepts",
    BackendError: "see the cause above; if it persists, look at the store's own logs",
}


# --- stages from per-version records (backends without native labels) ------------------------

_NEVER = 1 << 62  # a version unreadable without a recorded time was retired "after everything"


@dataclass(frozen=True)
class VersionRecord:
    """What a store without staging labels records of one stored version.

    Every operation writes only its own version's record (``promoted_ns`` on promotion,
    ``retired_ns`` when made unreadable), never a shared pointer, so concurrent writers cannot
    undo each other; :func:`resolve_stages` derives the stages from all records.
    """

    key: str
    """The store's handle of the version (KV version number, Key Vault version)."""
    version_id: str
    order: int
    """Staging order: later staged, higher (KV version number, or nanoseconds)."""
    promoted_ns: int | None = None
    """When it was last promoted (by a writer that had seen every earlier event)."""
    retired_ns: int | None = None
    readable: bool = True


def resolve_stages(records: list[VersionRecord]) -> dict[str, Stage]:
    """The stage of each record's ``key`` (absent: no stage), replaying the records' events.

    Replaying promotions and retirements in time order gives what the in-memory reference does
    step by step: a promotion makes the version current and the old current previous (the
    previous stays when nothing was current); a retirement drops the version's label. The
    version staged last is pending unless it was promoted or retired since.
    """
    events: list[tuple[int, int, str]] = []
    for r in records:
        if r.promoted_ns is not None:
            events.append((r.promoted_ns, 0, r.key))
        if r.retired_ns is not None or not r.readable:
            events.append((r.retired_ns if r.retired_ns is not None else _NEVER, 1, r.key))
    current: str | None = None
    previous: str | None = None
    for _t, kind, key in sorted(events):
        if kind == 0 and key != current:
            previous = current if current is not None else previous
            current = key
        elif kind == 1:
            current = None if current == key else current
            previous = None if previous == key else previous
    out: dict[str, Stage] = {}
    if previous is not None:
        out[previous] = Stage.PREVIOUS
    if current is not None:
        out[current] = Stage.CURRENT
    if records:
        last = max(records, key=lambda r: (r.order, r.key))
        if last.promoted_ns is None and last.retired_ns is None and last.readable:
            out[last.key] = Stage.PENDING
    return out


def next_event_ns(records: list[VersionRecord]) -> int:
    """A time for a new event that sorts after every event in ``records`` (clock skew between
    replicas cannot put a promotion before the state it was decided on)."""
    seen = [t for r in records for t in (r.promoted_ns, r.retired_ns) if t is not None]
    return max([time.time_ns(), *(t + 1 for t in seen if t < _NEVER)])
