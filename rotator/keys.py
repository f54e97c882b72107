"""Reader keys: who may read tokens from the HTTP API, and who may call its admin actions.

A key is ``mrk_<id>_<secret>`` (``mra_`` for an admin key, ``mrs_`` for a status key): 12 hex
characters of id, shown in listings, and 32 random bytes of secret (URL-safe base64, whose
alphabet has ``_`` and ``-``), shown once at creation. The parts are found by position
(:func:`split_key`), never by splitting on ``_``, which a secret may contain anywhere. The
journal stores the id, the SHA-256 of the whole key and the key's scope, never the key. Each
key belongs to exactly one environment; a reader key may be limited to some credentials of it.
Three kinds: a reader key reads tokens, an admin key calls the admin actions, a status key only
opens the status page (``/status``) of its environment (an admin key opens it too).

:class:`KeyIndex` is the in-memory copy the API authenticates against (no database on the hot
path): id → record, then a constant-time comparison of the hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import func, select

from rotator.errors import ConfigError, NotFound
from rotator.journal import Journal
from rotator.journal.schema import ReaderKey
from rotator.model import utcnow

KeyKind = Literal["reader", "admin", "status"]
_PREFIX: dict[str, KeyKind] = {"mrk": "reader", "mra": "admin", "mrs": "status"}
_LETTER: dict[KeyKind, str] = {kind: prefix for prefix, kind in _PREFIX.items()}
_KINDS: dict[str, KeyKind] = {kind: kind for kind in _PREFIX.values()}
_SESSION_LABEL = b"rotator status-page session v1\x00"
_ID_LEN = 12
_SECRET_START = 4 + _ID_LEN + 1
_ID_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class KeyInfo:
    """A key's identity and scope (never its secret)."""

    key_id: str
    name: str
    environment: str
    kind: KeyKind
    credentials: frozenset[str] | None
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def is_status(self) -> bool:
        return self.kind == "status"

    @property
    def may_view_status(self) -> bool:
        """Opens its environment's status page: a status key or an admin key, never a reader."""
        return self.kind in ("status", "admin")

    def may_read(self, environment: str, credential: str) -> bool:
        """Reader keys only; admin keys act, they do not read tokens."""
        return (
            self.kind == "reader"
            and environment == self.environment
            and (self.credentials is None or credential in self.credentials)
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "environment": self.environment,
            "kind": self.kind,
            "credentials": sorted(self.credentials) if self.credentials is not None else None,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


@dataclass(frozen=True)
class IndexedKey:
    info: KeyInfo
    digest: bytes


def split_key(text: str) -> tuple[KeyKind, str, str] | None:
    """``(kind, id, secret)`` of a key-shaped text, or None. By position: the secret may hold
    ``_`` (and ``-``) anywhere, so splitting on ``_`` would cut it."""
    kind = _PREFIX.get(text[:3])
    if (
        kind is None
        or len(text) < _SECRET_START + 3
        or text[3] != "_"
        or text[_SECRET_START - 1] != "_"
        or not _ID_CHARS.issuperset(text[4 : 4 + _ID_LEN])
    ):
        return None
    return kind, text[4 : 4 + _ID_LEN], text[_SECRET_START:]


def looks_like_key(text: str) -> bool:
    """Starts like a key: text never to repeat back, even when it does not parse."""
    return text[:4] in ("mrk_", "mra_", "mrs_")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _info(row: ReaderKey) -> KeyInfo:
    creds = json.loads(row.credentials) if row.credentials else None
    return KeyInfo(
        key_id=row.key_id,
        name=row.name,
        environment=row.environment,
        kind=_KINDS.get(row.kind, "reader"),
        credentials=frozenset(creds) if creds is not None else None,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def create_key(
    journal: Journal,
    environment: str,
    name: str,
    *,
    credentials: list[str] | None = None,
    admin: bool = False,
    status: bool = False,
    actor: str = "",
) -> tuple[KeyInfo, str]:
    """Make a key (a reader key; an admin key with ``admin``; a status key, which only opens
    the status page, with ``status``); returns its record and the key itself, which is never
    stored or shown again."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ConfigError("a key needs a name of 1 to 100 characters (the reading service)")
    if admin and status:
        raise ConfigError("a key is an admin key or a status key, not both: drop one option")
    if admin and credentials:
        raise ConfigError("an admin key acts on the whole environment: drop --credentials")
    if status and credentials:
        raise ConfigError(
            "a status key shows the whole environment and reads no token: drop --credentials"
        )
    kind: KeyKind = "admin" if admin else "status" if status else "reader"
    key_id = secrets.token_hex(_ID_LEN // 2)
    key = f"{_LETTER[kind]}_{key_id}_{secrets.token_urlsafe(32)}"
    now = utcnow()
    row = ReaderKey(
        key_id=key_id,
        name=name,
        environment=environment,
        kind=kind,
        credentials=json.dumps(sorted(set(credentials))) if credentials else None,
        secret_hash=_digest(key).hex(),
        created_at=now,
        created_by=actor[:200],
        revoked_at=None,
        changed_at=now,
    )
    with journal.session("store a reader key") as s:
        s.add(row)
    journal.audit(
        actor=actor or "cli",
        action="key.created",
        outcome="success",
        environment=environment,
        key_id=key_id,
        key_name=name,
        kind=kind,
        credentials=credentials or None,
    )
    return _info(row), key


def list_keys(journal: Journal, environment: str | None = None) -> list[KeyInfo]:
    with journal.reader() as s:
        q = select(ReaderKey).order_by(ReaderKey.environment, ReaderKey.created_at)
        if environment:
            q = q.where(ReaderKey.environment == environment)
        return [_info(r) for r in s.scalars(q)]


def revoke_key(
    journal: Journal, which: str, *, environment: str | None = None, actor: str = ""
) -> KeyInfo:
    """Revoke a key by id (or by name where that names one live key). Revoking twice is fine.
    A whole key pasted instead of its id is revoked by its id and never echoed."""
    which = which.strip()  # a pasted key often brings a blank or a newline along
    parts = split_key(which)
    if parts is not None:
        which = parts[1]
    # what the message may repeat: an id or a name, never text that starts like a key
    shown = (
        "matches the text given (it starts like a key: not shown)"
        if looks_like_key(which)
        else repr(which)
    )
    with journal.session("revoke a reader key") as s:
        row = s.get(ReaderKey, which)
        if row is None:
            q = select(ReaderKey).where(ReaderKey.name == which, ReaderKey.revoked_at.is_(None))
            if environment:
                q = q.where(ReaderKey.environment == environment)
            rows = list(s.scalars(q))
            if len(rows) > 1:
                raise ConfigError(
                    f"{len(rows)} live keys are named {which!r}",
                    hint="revoke by key id (rotator keys list shows them)",
                )
            row = rows[0] if rows else None
        if row is None or (environment and row.environment != environment):
            raise NotFound(f"no key {shown}", hint="rotator keys list shows the keys")
        if row.revoked_at is None:
            row.revoked_at = row.changed_at = utcnow()
        info = _info(row)
    journal.audit(
        actor=actor or "cli",
        action="key.revoked",
        outcome="success",
        environment=info.environment,
        key_id=info.key_id,
        key_name=info.name,
    )
    return info


def key_revision(journal: Journal) -> tuple[int, datetime | None]:
    """Changes whenever a key is created or revoked (replicas poll it)."""
    with journal.reader() as s:
        count, latest = s.execute(
            select(func.count(ReaderKey.key_id), func.max(ReaderKey.changed_at))
        ).one()
        return int(count), latest


class KeyIndex:
    """Live keys in memory. ``verify`` is what the API calls on every request."""

    def __init__(self) -> None:
        self._by_id: dict[str, IndexedKey] = {}
        self.revision: tuple[int, datetime | None] | None = None

    def load(self, journal: Journal) -> None:
        revision = key_revision(journal)
        with journal.reader() as s:
            rows = list(s.scalars(select(ReaderKey).where(ReaderKey.revoked_at.is_(None))))
        self._by_id = {r.key_id: IndexedKey(_info(r), bytes.fromhex(r.secret_hash)) for r in rows}
        self.revision = revision

    def refresh(self, journal: Journal) -> bool:
        """Reload when a key was created or revoked since the last load; True if reloaded."""
        if key_revision(journal) == self.revision:
            return False
        self.load(journal)
        return True

    def verify(self, key: str) -> KeyInfo | None:
        """The key's record if ``key`` is a live key, else None (constant-time on the secret)."""
        parts = split_key(key)
        if parts is None:
            return None
        kind, key_id, _ = parts
        entry = self._by_id.get(key_id)
        if entry is None:
            return None
        if not hmac.compare_digest(entry.digest, _digest(key)):
            return None
        return entry.info if entry.info.kind == kind else None

    def live(self, key_id: str) -> KeyInfo | None:
        """The record of the live key ``key_id`` (None once revoked or unknown)."""
        entry = self._by_id.get(key_id)
        return entry.info if entry is not None else None

    def session_mac(self, key_id: str, message: bytes) -> bytes | None:
        """An HMAC-SHA256 of ``message`` for a status-page session of the live key ``key_id``
        (None if the key is not live). Keyed from the key's stored hash, so every replica on
        the journal checks a session any of them signed, and revoking the key ends its
        sessions everywhere. Whoever can read that hash can read the journal the page shows."""
        entry = self._by_id.get(key_id)
        if entry is None:
            return None
        return hmac.new(entry.digest, _SESSION_LABEL + message, hashlib.sha256).digest()

    def __len__(self) -> int:
        return len(self._by_id)
