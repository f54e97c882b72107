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
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

from rotator.errors import ConfigError, CryptoError
from rotator.keyformat import KEY_BYTES
from rotator.keyformat import generate_key as generate_key  # where callers have found it
from rotator.places import make_private_dirs

MAGIC = b"RS1"
_KID = 8
_NONCE = 12


class KeyUnavailable(ConfigError):
    """The key material is not here: the variable is not set, the key file does not exist (and
    is not to be generated) or this user may not read it. ``rotator config check`` warns about
    these (it may run where the secrets are not); a key that is there but wrong is an error."""


class KeySource(BaseModel):
    """Where a key comes from: an environment variable (base64, several comma-separated for
    rotation, the first one active) or a key file (one key a line, the first one active;
    created with mode 0600 in a folder of mode 0700 if ``generate``).

    The configuration names each source (:meth:`named`) with its key path
    (``environments.prod.sealing_key``) and its role (``the sealing key of environment
    'prod'``): every error about the key says both, and the file or variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None
    generate: bool = False
    _key_path: str | None = PrivateAttr(default=None)
    _role: str | None = PrivateAttr(default=None)

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

    def named(self, key_path: str, role: str) -> KeySource:
        """A copy that knows its key path and role, for the errors it causes."""
        copy = self.model_copy()
        copy._key_path = key_path
        copy._role = role
        return copy

    @property
    def key_path(self) -> str:
        return self._key_path or "key"

    @property
    def role(self) -> str:
        return self._role or "the key"

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"key file {self.file}"

    def where(self) -> str:
        """``environments.prod.sealing_key (key file /etc/rotator/prod.key)``."""
        return f"{self._key_path} ({self.describe()})" if self._key_path else self.describe()


def key_fingerprint(key: bytes) -> str:
    """SHA-256 of a key's bytes: compares keys without holding or showing them."""
    return hashlib.sha256(key).hexdigest()


def _decode_key(text: str) -> bytes | None:
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_BYTES else None


_MAX_KEY_FILE = 64 * 1024
_NOT_A_KEY = f"{KEY_BYTES} bytes of base64 (a key as `rotator keygen` prints it)"


def load_keys(source: KeySource, *, create: bool = True) -> list[bytes]:
    """The keys of ``source``, the active one first.

    A missing key file is created when ``source.generate`` and ``create`` (with ``create``
    False it gives no keys: nothing has been sealed with a key that does not exist yet).
    Raises :class:`KeyUnavailable` when the material is not here and :class:`ConfigError`
    when it is there but is no key; each names the key path, the variable or file, and what
    to do. Never a key's value."""
    if source.env is not None:
        return _env_keys(source, source.env)
    assert source.file is not None
    path = source.file
    if not _exists(path):
        if not source.generate:
            raise KeyUnavailable(
                f"{source.role} does not exist: there is no key file {path}",
                where=source.where(),
                hint=f"create it with `rotator keygen > {path} && chmod 600 {path}`, or set "
                f"generate = true in {source.key_path} to have the rotator create it",
            )
        if not create:
            return []
        try:
            _create_key_file(path)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the key file {path} for {source.role}: "
                f"{exc.strerror or type(exc).__name__}"
                + (f" ({exc.filename})" if exc.filename and exc.filename != str(path) else ""),
                where=source.where(),
                hint="let the rotator's user create the file's folder, or create the key "
                f"yourself: `rotator keygen > {path} && chmod 600 {path}`",
            ) from exc
    text = _read_key_file(source, path)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(
            f"the key file {path} of {source.role} is empty",
            where=source.where(),
            hint=f"put a key in it: `rotator keygen > {path}`",
        )
    keys = []
    for number, line in enumerate(lines, 1):
        key = _decode_key(line)
        if key is None:
            raise ConfigError(
                f"line {number} of the key file {path} ({source.role}) is not {_NOT_A_KEY}",
                where=source.where(),
                hint="restore the file from where the key is kept, or, if nothing was sealed "
                f"with it yet, make a new one: `rotator keygen > {path}`",
            )
        keys.append(key)
    return keys


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a path this user may not look into counts as existing (the
    read then says "permission denied", not "does not exist")."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _env_keys(source: KeySource, name: str) -> list[bytes]:
    text = os.environ.get(name)
    if not text or not text.strip(" ,\n"):
        raise KeyUnavailable(
            f"{source.role} is not set: the environment variable {name} is "
            + ("empty" if text is not None else "not set"),
            where=source.where(),
            hint=f"export {name}=$(rotator keygen) (keep the value: it opens what it sealed)",
        )
    parts = [part for part in text.split(",") if part.strip()]
    keys = []
    for number, part in enumerate(parts, 1):
        key = _decode_key(part)
        if key is None:
            which = f"entry {number} of " if len(parts) > 1 else ""
            raise ConfigError(
                f"{which}the environment variable {name} ({source.role}) is not {_NOT_A_KEY}",
                where=source.where(),
                hint=f"set {name} to the key it was meant to hold; a new one: `rotator keygen` "
                "(several keys: NEW,OLD, comma-separated)",
            )
        keys.append(key)
    return keys


def _read_key_file(source: KeySource, path: Path) -> str:
    def unusable(why: str, hint: str, cls: type[ConfigError] = ConfigError) -> ConfigError:
        return cls(f"cannot use the key file {path} of {source.role}: {why}",
                   where=source.where(), hint=hint)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        raise unusable(
            "permission denied",
            "run the rotator as the user that owns the file, or let that user read it "
            f"(`chown` it, then `chmod 600 {path}`)",
            KeyUnavailable,
        ) from None
    except OSError as exc:
        raise unusable(
            exc.strerror or type(exc).__name__,
            f"point {source.key_path} at a readable key file",
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise unusable(f"it is {kind}", f"point {source.key_path} at a key file")
        data = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as exc:
        raise unusable(exc.strerror or type(exc).__name__,
                       f"point {source.key_path} at a readable key file") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise unusable("it is far larger than a key file",
                       f"point {source.key_path} at the key file itself")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise unusable(
            f"it holds binary data, not {_NOT_A_KEY}",
            "restore the file from where the key is kept, or, if nothing was sealed with it "
            f"yet, make a new one: `rotator keygen > {path}`",
        ) from None


class KeyRing:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only where it seals

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
        """The ring of ``source`` (a missing key file with ``generate`` is created). Raises
        :class:`~rotator.errors.ConfigError` naming the key path, the variable or file, and
        what to do."""
        return cls(load_keys(source))

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
        from cryptography.exceptions import InvalidTag

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
