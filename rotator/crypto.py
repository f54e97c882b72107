"""Authenticated encryption of token material (AES-256-GCM).

A :class:`KeyRing` holds one or more 32-byte keys; the first seals, all open, so a key can be
rotated by putting the new one first. Each blob names the key that sealed it by a short key id,
so data sealed with a key we do not hold gives a clear "foreign key" error instead of noise.
The associated data binds a blob to where it belongs (environment/credential/version): a blob
copied to another credential does not open.

Blob layout: ``b"RS1" | key id (8 bytes) | nonce (12 bytes) | ciphertext+tag``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, model_validator

from rotator.errors import ConfigError, CryptoError
from rotator.places import make_private_dirs

MAGIC = b"RS1"
KEY_BYTES = 32
_KID = 8
_NONCE = 12


class KeySource(BaseModel):
    """Where a key comes from: an environment variable (base64, several comma-separated for
    rotation, the first one active) or a key file (created with mode 0600 if ``generate``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None
    generate: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> KeySource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' (a variable name) or 'file' (a path)")
        if self.generate and self.file is None:
            raise ValueError("'generate' only applies to a key 'file'")
        return self

    def resolve_paths(self, base: Path) -> KeySource:
        if self.file is not None and not self.file.is_absolute():
            return self.model_copy(update={"file": (base / self.file).resolve()})
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"key file {self.file}"


def generate_key() -> str:
    """A fresh key, base64 (what goes into the environment variable or key file)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def _decode_key(text: str, where: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(
            f"the key is not {KEY_BYTES} bytes of base64",
            where=where,
            hint="make one with: rotator keygen",
        )
    return raw


class KeyRing:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._keys = {hashlib.sha256(k).digest()[:_KID]: AESGCM(k) for k in keys}
        self._active = hashlib.sha256(keys[0]).digest()[:_KID]

    @property
    def key_id(self) -> str:
        return self._active.hex()

    def holds(self, key_id: str) -> bool:
        """Whether this ring holds the key with ``key_id`` (hex, as in error messages)."""
        return bytes.fromhex(key_id) in self._keys

    @classmethod
    def load(cls, source: KeySource) -> KeyRing:
        where = source.describe()
        if source.env is not None:
            text = os.environ.get(source.env)
            if not text:
                raise ConfigError(
                    f"the environment variable {source.env} is not set",
                    where=where,
                    hint=f"export {source.env}=$(rotator keygen)",
                )
            keys = [_decode_key(part, where) for part in text.split(",") if part.strip()]
            if not keys:
                raise ConfigError(f"the environment variable {source.env} holds no key",
                                  where=where, hint=f"export {source.env}=$(rotator keygen)")
            return cls(keys)
        assert source.file is not None
        path = source.file
        if not path.exists():
            if not source.generate:
                raise ConfigError(
                    "the key file does not exist",
                    where=where,
                    hint="create it with `rotator keygen > FILE; chmod 600 FILE`, "
                    "or set generate = true for local use",
                )
            _create_key_file(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file: {exc.strerror}", where=where) from exc
        keys = [_decode_key(line, where) for line in text.splitlines() if line.strip()]
        if not keys:
            raise ConfigError("the key file is empty", where=where,
                              hint="put a key in it: rotator keygen > FILE")
        return cls(keys)

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = os.urandom(_NONCE)
        ct = self._keys[self._active].encrypt(nonce, plaintext, aad.encode())
        return MAGIC + self._active + nonce + ct

    def open(self, blob: bytes, aad: str) -> bytes:
        if len(blob) < len(MAGIC) + _KID + _NONCE + 16 or not blob.startswith(MAGIC):
            raise CryptoError("the sealed data is not in the rotator's format (corrupt?)")
        kid = blob[len(MAGIC) : len(MAGIC) + _KID]
        aead = self._keys.get(kid)
        if aead is None:
            raise CryptoError(
                f"the data was sealed with key {kid.hex()}, which this key ring does not hold",
                hint="configure the key it was written with (keep the old key after the new "
                "one while rotating keys)",
            )
        nonce = blob[len(MAGIC) + _KID : len(MAGIC) + _KID + _NONCE]
        try:
            return aead.decrypt(nonce, blob[len(MAGIC) + _KID + _NONCE :], aad.encode())
        except InvalidTag:
            raise CryptoError(
                "the sealed data fails authentication: corrupt, tampered with, or moved "
                "from another credential"
            ) from None


def _create_key_file(path: Path) -> None:
    """Create a key file atomically: another process sees no file or a whole key, never an
    empty one (write a private temp file, then hard-link it into place if still absent). The
    folders made for it are 0700 and the file 0600, whatever the umask."""
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(generate_key() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process won: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
