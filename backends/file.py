"""The local ``file`` backend: sealed files in a folder, for development and single hosts.

Layout under ``settings.path`` (one path serves one environment)::

    <path>/<environment>/.environment           marker: environment, managed_by, key id (JSON)
    <path>/<environment>/.locks/<credential>.lock
    <path>/<environment>/<credential>/stages.json     the stages, slot 0
    <path>/<environment>/<credential>/stages.1.json   the stages, slot 1 (the newer intact wins)
    <path>/<environment>/<credential>/<version_id>.sealed

* A ``.sealed`` file is ``KeyRing.seal(version.to_json(), aad="<env>/<credential>/<version_id>")``
  (AES-256-GCM): the token never touches the disk in plain text, and a file copied to another
  credential, version or environment does not open.
* A stages file holds no secret and stays readable JSON (which version holds which stage, every
  known version and whether it is still readable, a revision number), but it is authenticated:
  its ``mac`` field is an AES-GCM tag over the canonical JSON of the other fields
  (``KeyRing.seal(b"", aad=...)``, i.e. GMAC with the sealing key), so an edited or foreign file
  is refused as corrupt. An older copy of the same credential's file would still verify (no
  rollback protection).
* A version file is written in place, fsynced, then its folder, before any stages file lists
  it: nothing opens a version the stages do not list, so a write that dies half-way leaves a
  file nobody reads, which the retry writes over. The stages are written **in place**,
  fsynced, into the slot the current state was *not* read from: a write that dies half-way
  leaves that slot torn (its ``sha256`` checksum fails) and the other slot, the state before
  the write, is read. A new file per write would cost more than the write (ext4 looks for a
  free inode past every recently deleted one). A write costs one credential's files, never an
  environment-wide file.
* Every read-modify-write of the stages holds ``fcntl.flock`` on the credential's lock file
  (kept outside the credential folder so that ``delete`` cannot pull it away from a waiter) and a
  per-credential thread lock. Readers take no lock: a version file is never written once a
  stages file lists it, and a reader that meets a stages slot being written reads the other
  one.
* Folders are created 0700 (the missing folders above ``path`` too), files 0600, whatever the
  umask.

Errors: every ``OSError`` is mapped to a :class:`~rotator.errors.BackendError` subclass naming the
path (``EACCES`` -> permission denied, ``ENOSPC``/``EIO`` -> unavailable, ...); data that does not
open or parse is :class:`~rotator.errors.BackendCorrupt` naming the file and saying whether it was
sealed with a key that is not configured or is corrupt; a key that cannot be loaded is
:class:`~rotator.errors.BackendPermissionDenied` (like missing cloud credentials).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, overload

from backends.base import NAME_PATTERN, Backend, BackendSettings, Capabilities
from backends.retry import LOCK
from rotator.crypto import MAGIC, KeyRing, KeySource
from rotator.errors import (
    BackendConflict,
    BackendCorrupt,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
    ConfigError,
    CryptoError,
    NotFound,
)
from rotator.model import MANAGED_BY, Stage, StoredVersion, VersionInfo, utcnow
from rotator.places import Place, file_place, make_private_dirs


class FileSettings(BackendSettings):
    type: Literal["file"] = "file"
    path: Path
    key: KeySource

    def resolve_paths(self, base: Path) -> FileSettings:
        path = self.path if self.path.is_absolute() else (base / self.path).resolve()
        return self.model_copy(update={"path": path, "key": self.key.resolve_paths(base)})

    def location(self, environment: str) -> str:
        return f"file://{self.path}"

    location_key: ClassVar[str] = "path"

    def place(self, environment: str) -> Place:
        """The folder's real path (``..`` and symbolic links resolved): one folder serves one
        environment, so its place does not depend on ``environment``."""
        return file_place(self.path)

    def key_sources(self) -> dict[str, KeySource]:
        return {"key": self.key}


MARKER = ".environment"
STAGES = "stages.json"
_SLOTS = (STAGES, "stages.1.json")
_CHECK = "sha256"
SUFFIX = ".sealed"
_LOCKS_DIR = ".locks"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".deleted-"
_SCHEMA = 1
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_MAX_FILE_BYTES = 1 << 20

_DIR_MODE = 0o700
_FILE_MODE = 0o600

_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG})
_LAYOUT_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EEXIST})

# One lock per credential lock file for the whole process, so that two backend instances on the
# same folder in one process also exclude each other (flock alone would too, but a thread lock
# keeps waiting threads off the file descriptor table).
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


@dataclass
class _State:
    """The content of one credential's stages file."""

    stages: dict[Stage, str] = field(default_factory=dict)
    readable: dict[str, bool] = field(default_factory=dict)  # version id -> readable, oldest first
    revision: int = 0
    slot: int | None = None
    """The slot file this state was read from (``None``: the credential has none yet)."""

    def stage_of(self, version_id: str) -> Stage | None:
        for stage, vid in self.stages.items():
            if vid == version_id:
                return stage
        return None

    def body(self, environment: str, credential: str) -> dict[str, Any]:
        return {
            "schema": _SCHEMA,
            "managed_by": MANAGED_BY,
            "environment": environment,
            "credential": credential,
            "revision": self.revision,
            "stages": {stage.value: vid for stage, vid in sorted(self.stages.items())},
            "versions": [{"id": vid, "readable": ok} for vid, ok in self.readable.items()],
        }


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _checksum(canonical: str, mac: str) -> str:
    """SHA-256 of a slot's stages and MAC: finds a slot a write died in (torn pages mix old and
    new bytes, and can still parse as JSON). Not a defence against edits: the MAC is."""
    return hashlib.sha256(f"{canonical}\n{mac}".encode()).hexdigest()


class FileBackend(Backend):
    """Sealed files under ``<path>/<environment>/`` (see the module docstring for the layout)."""

    kind = "file"
    capabilities: ClassVar[Capabilities] = Capabilities(
        destroys=True, native_stages=False, local=True
    )
    Settings = FileSettings

    lock_timeout_s: ClassVar[float] = 30.0
    """How long a writer waits for another process's lock on a credential before giving up."""

    def __init__(self, settings: BackendSettings, environment: str) -> None:
        if not isinstance(settings, FileSettings):
            raise TypeError(f"FileBackend needs FileSettings, got {type(settings).__name__}")
        super().__init__(settings, environment)
        self._settings = settings
        if not _NAME_RE.fullmatch(environment):
            raise self._error(BackendInvalidName, f"invalid environment name {environment[:64]!r}")
        self._root = settings.path
        self._env_dir = settings.path / environment
        self._locks_dir = self._env_dir / _LOCKS_DIR
        self._init_lock = threading.Lock()
        self._keyring: KeyRing | None = None
        self._verified = False  # the environment folder exists and carries our marker
        self._writable = False  # ... and its lock folder exists, interrupted deletes finished

    # ------------------------------------------------------------------ the interface

    def stage_pending(self, version: StoredVersion) -> None:
        if version.environment != self.environment:
            raise self._error(
                BackendConflict,
                f"refusing to store a version of environment {version.environment!r} in the "
                f"folder of environment {self.environment!r}",
            )
        cred = self._check_credential(version.credential)
        vid = self._check_version_id(version.version_id)
        ring = self._prepare(create=True)
        with self._locked(cred):
            loaded = self._load_state(cred)
            state = loaded or _State()
            if vid in state.readable:
                return
            cred_dir = self._cred_dir(cred)
            # a state was read from the folder: it exists; one made just now is empty
            made = loaded is None and self._mkdir(cred_dir)
            if not made:
                self._clean_temp_files(cred_dir)
            sealed = ring.seal(version.with_stage(None).to_json().encode(), self._aad(cred, vid))
            self._write_unlisted(cred_dir / f"{vid}{SUFFIX}", sealed)
            state.readable[vid] = True
            state.stages[Stage.PENDING] = vid
            self._save_state(cred, state)

    def promote(self, credential: str, version_id: str) -> None:
        cred = self._check_credential(credential)
        vid = self._check_version_id(version_id)
        self._prepare(create=True)
        with self._locked(cred):
            state = self._load_state(cred)
            if state is not None and state.stages.get(Stage.CURRENT) == vid:
                return
            if state is None or not state.readable.get(vid):
                raise NotFound(
                    f"cannot promote version {vid}: this backend does not hold it",
                    where=f"{self._cred_dir(cred)}",
                )
            old = state.stages.get(Stage.CURRENT)
            if old is not None:
                state.stages[Stage.PREVIOUS] = old
            state.stages[Stage.CURRENT] = vid
            if state.stages.get(Stage.PENDING) == vid:
                del state.stages[Stage.PENDING]
            self._save_state(cred, state)

    def read(self, credential: str, stage: Stage = Stage.CURRENT) -> StoredVersion | None:
        cred = self._check_credential(credential)
        if self._prepare(create=False) is None:
            return None
        state = self._load_state(cred)
        vid = state.stages.get(stage) if state else None
        if state is None or vid is None:
            return None
        return self._read_sealed(cred, vid, state)

    def current_version_id(self, credential: str) -> str | None:
        """The id of the version holding the current stage, without opening the token (what
        ``rotator status`` and the backends-agree check compare). The stages record is read and
        authenticated exactly as :meth:`read` reads it (the newer intact slot, its MAC checked:
        an edited or foreign record is refused as corrupt), and the version's sealed file must
        be present (a version made unreadable, or whose file is gone, is ``None`` as with
        :meth:`read`). Unlike :meth:`read`, the sealed file is not decrypted: a damaged token
        file is found by the commands that open it (``rotator get``, ``verify``, a rotation)."""
        cred = self._check_credential(credential)
        if self._prepare(create=False) is None:
            return None
        state = self._load_state(cred)
        vid = state.stages.get(Stage.CURRENT) if state else None
        if state is None or vid is None or not state.readable.get(vid):
            return None
        return vid if self._exists(self._cred_dir(cred) / f"{vid}{SUFFIX}") else None

    def read_version(self, credential: str, version_id: str) -> StoredVersion | None:
        cred = self._check_credential(credential)
        vid = self._check_version_id(version_id)
        if self._prepare(create=False) is None:
            return None
        state = self._load_state(cred)
        if state is None:
            return None
        return self._read_sealed(cred, vid, state)

    def versions(self, credential: str) -> list[VersionInfo]:
        cred = self._check_credential(credential)
        if self._prepare(create=False) is None:
            return []
        state = self._load_state(cred)
        if state is None:
            return []
        cred_dir = self._cred_dir(cred)
        return [
            VersionInfo(
                vid,
                state.stage_of(vid),
                ok and self._exists(cred_dir / f"{vid}{SUFFIX}"),
            )
            for vid, ok in state.readable.items()
        ]

    def make_unreadable(self, credential: str, version_id: str) -> None:
        """Delete the version's file, then record it as unreadable and drop its stage label.

        The file goes first: a crash in between leaves a record that claims a readable version
        whose material is already gone (reads and ``versions()`` then report it unreadable, a
        retry fixes the record), never material that was meant to be destroyed. A file with no
        record (a stage interrupted before ``stages.json`` was written) is removed too.
        """
        cred = self._check_credential(credential)
        vid = self._check_version_id(version_id)
        if self._prepare(create=False) is None:
            return
        cred_dir = self._cred_dir(cred)
        if not self._exists(cred_dir):
            return
        self._prepare(create=True)
        with self._locked(cred):
            path = cred_dir / f"{vid}{SUFFIX}"
            with self._os_errors("destroy the version file", path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                else:
                    _fsync_dir(cred_dir)
            state = self._load_state(cred)
            if state is None or vid not in state.readable:
                return
            if not state.readable[vid] and state.stage_of(vid) is None:
                return
            state.readable[vid] = False
            for stage in [s for s, v in state.stages.items() if v == vid]:
                del state.stages[stage]
            self._save_state(cred, state)

    def delete(self, credential: str) -> None:
        """Remove the credential's folder: renamed away first (atomic), then removed."""
        cred = self._check_credential(credential)
        if self._prepare(create=False) is None:
            return
        cred_dir = self._cred_dir(cred)
        if not self._exists(cred_dir):
            return
        self._prepare(create=True)
        with self._locked(cred):
            trash = self._env_dir / f"{_TRASH_PREFIX}{cred}-{secrets.token_hex(6)}"
            with self._os_errors("delete the credential folder", cred_dir):
                try:
                    os.rename(cred_dir, trash)
                except FileNotFoundError:
                    return
                _fsync_dir(self._env_dir)
                _rmtree(trash)

    def credentials(self) -> list[str]:
        if self._prepare(create=False) is None:
            return []
        with self._os_errors("list the credential folders", self._env_dir):
            try:
                entries = list(os.scandir(self._env_dir))
            except FileNotFoundError:
                return []
            return sorted(
                e.name
                for e in entries
                if _NAME_RE.fullmatch(e.name)
                and e.is_dir(follow_symlinks=False)
                and any(os.path.exists(os.path.join(e.path, slot)) for slot in _SLOTS)
            )

    def check(self) -> None:
        """The key loads, the folder exists (or can be made), is ours and is writable."""
        self._prepare(create=True)
        probe = self._env_dir / f"{_TMP_PREFIX}check-{secrets.token_hex(6)}"
        with self._os_errors("write to the folder", self._env_dir):
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)

    # ------------------------------------------------------------------ preparation

    def _ring(self) -> KeyRing:
        if self._keyring is None:
            try:
                self._keyring = KeyRing.load(self._settings.key)
            except ConfigError as exc:  # it names the key path, the file and what to do
                raise self._error(
                    BackendPermissionDenied, exc.message, where=exc.where, hint=exc.hint
                ) from exc
        return self._keyring

    @overload
    def _prepare(self, *, create: Literal[True]) -> KeyRing: ...
    @overload
    def _prepare(self, *, create: bool) -> KeyRing | None: ...

    def _prepare(self, *, create: bool) -> KeyRing | None:
        """Load the key and make sure the environment folder is ours (creating it if asked).

        Returns ``None`` when the folder does not exist and ``create`` is False (nothing stored
        yet). Reads never create anything, so a read-only mount serves readers.
        """
        ring = self._ring()
        if self._writable or (self._verified and not create):
            return ring
        with self._init_lock:
            if not self._verified:
                self._refuse_other_environments()
                marker = self._env_dir / MARKER
                present = self._exists(marker)
                if not present and self._foreign_files():
                    # another process may have made the folder, marker last, since we looked
                    present = self._exists(marker)
                    if not present:
                        raise self._error(
                            BackendConflict,
                            f"the folder {self._env_dir} exists but is not managed by the "
                            f"rotator (it has no {MARKER} marker)",
                            where=str(self._env_dir),
                            hint="point the file backend at an empty or new folder, or move "
                            "the files that are there away",
                        )
                if present:
                    self._verify_marker(marker)
                elif not create:
                    return None
                else:
                    self._mkdir(self._root, parents=True)
                    self._mkdir(self._env_dir)
                    self._write_marker(marker, ring)
                self._verified = True
            if create and not self._writable:
                self._mkdir(self._locks_dir)
                self._purge_trash()
                self._writable = True
        return ring

    def _foreign_files(self) -> bool:
        """Whether the folder holds anything but a marker another process is writing (its
        temporary file, linked into place once whole)."""
        being_written = f"{_TMP_PREFIX}{MARKER}-"
        return any(not n.startswith(being_written) for n in self._listdir(self._env_dir))

    def _refuse_other_environments(self) -> None:
        """One path serves one environment: refuse a path whose other folders carry a marker of
        another environment (the configuration refuses this too; this catches a copied or
        hand-edited configuration)."""
        try:
            entries = list(os.scandir(self._root))
        except FileNotFoundError:
            return
        except OSError as exc:
            self._raise_os(exc, "list the folder", self._root)
        for entry in entries:
            if entry.name == self.environment or not entry.is_dir(follow_symlinks=False):
                continue
            marker = Path(entry.path) / MARKER
            try:
                doc = self._read_marker(marker)
            except BackendCorrupt:
                continue  # not a readable marker: not evidence of another environment
            if doc.get("managed_by") == MANAGED_BY and doc.get("environment") != self.environment:
                raise self._error(
                    BackendConflict,
                    f"the folder {self._root} already holds environment "
                    f"{str(doc.get('environment'))[:40]!r}; environment "
                    f"{self.environment!r} may not share it",
                    where=str(marker),
                    hint=f"give environment {self.environment!r} its own file backend path",
                )

    def _read_marker(self, marker: Path) -> dict[str, Any]:
        raw = self._read_bytes(marker)
        try:
            doc = json.loads(raw) if raw is not None else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise self._error(
                BackendCorrupt,
                f"the marker {marker} is missing or not valid JSON",
                where=str(marker),
                hint="restore it from a backup, or move the folder away and start afresh",
            )
        return doc

    def _verify_marker(self, marker: Path) -> None:
        doc = self._read_marker(marker)
        if doc.get("managed_by") != MANAGED_BY:
            raise self._error(
                BackendConflict,
                f"the folder {self._env_dir} is not managed by the rotator "
                f"(its {MARKER} says managed_by={str(doc.get('managed_by'))[:40]!r})",
                where=str(marker),
                hint="point the file backend at a folder of its own",
            )
        if doc.get("environment") != self.environment:
            raise self._error(
                BackendConflict,
                f"the folder {self._env_dir} belongs to environment "
                f"{str(doc.get('environment'))[:40]!r}, not {self.environment!r}",
                where=str(marker),
                hint="environments never share storage: give each its own file backend path",
            )

    def _write_marker(self, marker: Path, ring: KeyRing) -> None:
        doc = {
            "environment": self.environment,
            "managed_by": MANAGED_BY,
            "key_id": ring.key_id,
            "created_at": utcnow().isoformat(),
        }
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        # O_EXCL via link(): if another process created it first, keep theirs and check it
        tmp = self._tmp_name(marker)
        with self._os_errors("write the environment marker", marker):
            self._write_file(tmp, data)
            try:
                os.link(tmp, marker)
            except FileExistsError:
                self._verify_marker(marker)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self._env_dir)

    def _purge_trash(self) -> None:
        """Finish deletes a crash interrupted (leftover ``.deleted-*`` folders)."""
        for name in self._listdir(self._env_dir):
            if name.startswith(_TRASH_PREFIX):
                with self._os_errors("finish deleting", self._env_dir / name):
                    _rmtree(self._env_dir / name)

    # ------------------------------------------------------------------ state and versions

    def _cred_dir(self, credential: str) -> Path:
        return self._env_dir / credential

    def _aad(self, credential: str, version_id: str) -> str:
        return f"{self.environment}/{credential}/{version_id}"

    def _stages_aad(self, credential: str, canonical: str) -> str:
        return f"{self.environment}/{credential}/{STAGES}\n{canonical}"

    def _load_state(self, credential: str) -> _State | None:
        """The newest intact state of the credential's two slot files (see the module
        docstring). A slot a write died in (it does not parse, or its checksum fails) is passed
        over; an intact slot that is not authentic is refused as corrupt."""
        cred_dir = self._cred_dir(credential)
        found: list[tuple[int, int, Path, dict[str, Any]]] = []
        torn: Path | None = None
        for slot, name in enumerate(_SLOTS):
            path = cred_dir / name
            raw = self._read_bytes(path)
            if raw is None:
                continue
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                torn = torn or path
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("revision"), int):
                self._corrupt(path, "is not a stages file written by the rotator")
            found.append((doc["revision"], slot, path, doc))
        for _, slot, path, doc in sorted(found, key=lambda item: item[0], reverse=True):
            mac_text, check = doc.pop("mac", None), doc.pop(_CHECK, None)
            canonical = _canonical(doc)
            if check is not None and check != _checksum(canonical, str(mac_text)):
                torn = torn or path
                continue
            try:
                mac = base64.b64decode(mac_text, validate=True)
            except (ValueError, TypeError, binascii.Error):
                self._corrupt(path, "is not a stages file written by the rotator")
            self._open(path, mac, self._stages_aad(credential, canonical))
            try:
                state = self._parse_state(doc, credential)
            except (ValueError, KeyError, TypeError, AttributeError):
                self._corrupt(path, "has an authentic but unexpected structure")
            state.slot = slot
            return state
        if torn is not None:
            self._corrupt(torn, "is not a stages file written by the rotator")
        return None

    def _parse_state(self, doc: dict[str, Any], credential: str) -> _State:
        if (
            doc["schema"] != _SCHEMA
            or doc["managed_by"] != MANAGED_BY
            or doc["environment"] != self.environment
            or doc["credential"] != credential
        ):
            raise ValueError("header")
        readable: dict[str, bool] = {}
        for item in doc["versions"]:
            vid, ok = item["id"], item["readable"]
            if not isinstance(vid, str) or not isinstance(ok, bool):
                raise TypeError("version entry")
            readable[vid] = ok
        stages = {Stage(name): vid for name, vid in doc["stages"].items()}
        if any(vid not in readable for vid in stages.values()):
            raise ValueError("stage names an unknown version")
        revision = doc["revision"]
        if not isinstance(revision, int):
            raise TypeError("revision")
        return _State(stages=stages, readable=readable, revision=revision)

    def _save_state(self, credential: str, state: _State) -> None:
        state.revision += 1
        body = state.body(self.environment, credential)
        canonical = _canonical(body)
        tag = self._ring().seal(b"", self._stages_aad(credential, canonical))
        body["mac"] = base64.b64encode(tag).decode()
        body[_CHECK] = _checksum(canonical, body["mac"])
        data = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
        # the slot the state was not read from: the state before this write stays intact
        slot = 0 if state.slot is None else 1 - state.slot
        path = self._cred_dir(credential) / _SLOTS[slot]
        if not self._overwrite(path, data):
            self._write_atomic(path, data)  # a new file: whole or absent, never torn
        state.slot = slot

    def _overwrite(self, path: Path, data: bytes) -> bool:
        """Write ``data`` over an existing file in place and fsync it; ``False`` if there is
        no such file. No new inode, no rename, no folder fsync: a rotation writes the stages
        three times, and creating a file per write costs more than the write itself (ext4
        searches for a free inode past every recently deleted one)."""
        with self._os_errors("write", path):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return False
            try:
                _write_all(fd, data)
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # a failed write reads as one that died: not applied
                raise
            finally:
                os.close(fd)
        return True

    def _read_sealed(self, credential: str, version_id: str, state: _State) -> StoredVersion | None:
        if not state.readable.get(version_id):
            return None
        path = self._cred_dir(credential) / f"{version_id}{SUFFIX}"
        blob = self._read_bytes(path)
        if blob is None:
            return None  # made unreadable meanwhile (or a crash did it before the record)
        plain = self._open(path, blob, self._aad(credential, version_id))
        try:
            version = StoredVersion.from_json(plain)
        except ValueError as exc:
            self._corrupt(path, f"opens but is not a version document ({exc})")
        if (
            version.environment != self.environment
            or version.credential != credential
            or version.version_id != version_id
        ):
            self._corrupt(path, "holds a version of another credential")
        return version.with_stage(state.stage_of(version_id))

    def _open(self, path: Path, blob: bytes, aad: str) -> bytes:
        """Open a sealed blob, saying precisely why it does not open."""
        header = len(MAGIC) + 8
        if len(blob) < header or not blob.startswith(MAGIC):
            self._corrupt(path, "is not in the rotator's sealed format (corrupt or foreign)")
        kid = blob[len(MAGIC) : header]
        ring = self._ring()
        try:
            return ring.open(blob, aad)
        except CryptoError:
            if not ring.holds(kid.hex()):
                raise self._error(
                    BackendCorrupt,
                    f"{path} is {'signed' if path.name in _SLOTS else 'encrypted'} with key id "
                    f"{kid.hex()} which is not configured "
                    f"(the configured key is {ring.key_id})",
                    where=str(path),
                    hint=f"configure the key it was written with ({self._settings.key.describe()}"
                    "; keep the old key after the new one while rotating keys)",
                ) from None
            self._corrupt(
                path,
                "is corrupt: it fails authentication (damaged, edited, or moved from another "
                "credential)",
            )

    def _corrupt(self, path: Path, what: str) -> NoReturn:
        raise self._error(
            BackendCorrupt,
            f"{path} {what}",
            where=str(path),
            hint="restore the file from a backup, or delete the credential and rotate it anew",
        )

    # ------------------------------------------------------------------ names and locks

    def _check_credential(self, credential: str) -> str:
        if not isinstance(credential, str) or not _NAME_RE.fullmatch(credential):
            raise self._error(
                BackendInvalidName,
                f"invalid credential name {str(credential)[:64]!r}: expected {NAME_PATTERN}",
            )
        return credential

    def _check_version_id(self, version_id: str) -> str:
        if not isinstance(version_id, str) or not _VERSION_RE.fullmatch(version_id):
            raise self._error(
                BackendInvalidName,
                f"invalid version id {str(version_id)[:64]!r}: expected letters, digits, "
                "'-' and '_'",
            )
        return version_id

    @contextlib.contextmanager
    def _locked(self, credential: str) -> Iterator[None]:
        lock_path = self._locks_dir / f"{credential}.lock"
        with _thread_lock(str(lock_path)), self._os_errors("lock the credential", lock_path):
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != _FILE_MODE:  # just made, umask'd
                    os.fchmod(fd, _FILE_MODE)
                self._flock(fd, lock_path)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _flock(self, fd: int, lock_path: Path) -> None:
        try:
            LOCK.with_timeout(self.lock_timeout_s).call(
                BlockingIOError, lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            )
        except BlockingIOError:
            raise self._error(
                BackendUnavailable,
                f"another process has held the lock {lock_path} for more than "
                f"{self.lock_timeout_s:g} s",
                where=str(lock_path),
                hint="check for a stuck rotator process on this host",
            ) from None

    # ------------------------------------------------------------------ files

    def _tmp_name(self, target: Path) -> Path:
        return target.with_name(f"{_TMP_PREFIX}{target.name}-{secrets.token_hex(6)}")

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)  # exactly 0600 whatever the umask
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self._tmp_name(path)
        with self._os_errors("write", path):
            try:
                self._write_file(tmp, data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)

    def _write_unlisted(self, path: Path, data: bytes) -> None:
        """Write a version file no stages file lists yet: in place (no temporary file, no
        rename), fsynced, then its folder. Nothing reads a version the stages do not list, so
        a write that dies half-way leaves a file nobody opens, which the retry writes over
        (and ``make_unreadable`` removes): whole before any stages file names it."""
        with self._os_errors("write", path):
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                _FILE_MODE,
            )
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != _FILE_MODE:  # umask'd, or left over
                    os.fchmod(fd, _FILE_MODE)
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(path.parent)

    def _clean_temp_files(self, cred_dir: Path) -> None:
        """Remove temporary files a crashed writer left (called under the credential's lock,
        when no other writer can be using one)."""
        for name in self._listdir(cred_dir):
            if name.startswith(_TMP_PREFIX):
                with self._os_errors("remove a stale temporary file", cred_dir / name):
                    (cred_dir / name).unlink(missing_ok=True)

    def _read_bytes(self, path: Path) -> bytes | None:
        """A whole file, or ``None`` if it does not exist; never follows a symbolic link."""
        with self._os_errors("read", path):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self._corrupt(path, "is a symbolic link, which the rotator never writes")
                raise
            try:
                # sized by fstat: a buffered file object would add an isatty ioctl, and a
                # read of the 1 MiB limit maps and unmaps a buffer, on every read
                want = min(os.fstat(fd).st_size, _MAX_FILE_BYTES) + 1
                data = b""
                while True:
                    chunk = os.read(fd, want)
                    data += chunk
                    if len(chunk) < want or len(data) > _MAX_FILE_BYTES:
                        break
                    want = _MAX_FILE_BYTES + 1 - len(data)  # it grew since the fstat
            finally:
                os.close(fd)
        if len(data) > _MAX_FILE_BYTES:
            self._corrupt(path, "is far larger than anything the rotator writes")
        return data

    def _listdir(self, path: Path) -> list[str]:
        with self._os_errors("list", path):
            try:
                return os.listdir(path)
            except FileNotFoundError:
                return []

    def _exists(self, path: Path) -> bool:
        with self._os_errors("look at", path):
            try:
                os.lstat(path)
            except FileNotFoundError:
                return False
            return True

    def _mkdir(self, path: Path, *, parents: bool = False) -> bool:
        """Make the folder (0700); False if it was there already."""
        with self._os_errors("create the folder", path):
            if parents:
                make_private_dirs(path.parent)  # 0700 like the rest, whatever the umask
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                if not path.is_dir():
                    raise
                return False
            os.chmod(path, _DIR_MODE)  # exactly 0700 whatever the umask
            _fsync_dir(path.parent)
        return True

    # ------------------------------------------------------------------ errors

    def _error(
        self,
        cls: type[BackendError],
        message: str,
        *,
        where: str | None = None,
        hint: str | None = None,
    ) -> BackendError:
        return cls(message, backend=self.name, location=self.location, where=where, hint=hint)

    @contextlib.contextmanager
    def _os_errors(self, what: str, path: Path | None) -> Iterator[None]:
        """Map an ``OSError`` to a :class:`BackendError` naming ``path``. Callers that expect a
        missing file catch ``FileNotFoundError`` inside the block."""
        try:
            yield
        except OSError as exc:
            self._raise_os(exc, what, path)

    def _raise_os(self, exc: OSError, what: str, path: Path | None) -> NoReturn:
        reason = exc.strerror or type(exc).__name__
        message = f"cannot {what} {path}: {reason}"
        cls: type[BackendError]
        hint: str | None = None
        if exc.errno in _PERMISSION_ERRNOS:
            cls = BackendPermissionDenied
            hint = "let the rotator's user own the folder (mode 0700) and its files (0600)"
        elif exc.errno in _NAME_ERRNOS:
            cls = BackendInvalidName
        elif exc.errno in _LAYOUT_ERRNOS:
            cls = BackendCorrupt
            hint = "something other than the rotator changed the folder's layout"
        else:  # ENOSPC, EIO, EDQUOT, EMFILE, ENOENT (vanished meanwhile), ...: retry later
            cls = BackendUnavailable
        raise self._error(cls, message, where=str(path) if path else None, hint=hint) from exc


def _write_all(fd: int, data: bytes) -> None:
    """``data`` from the start of the file (a write may be short)."""
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    """``shutil.rmtree`` that tolerates another process removing the same tree meanwhile."""

    def tolerate_missing(func: object, target: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=tolerate_missing)
