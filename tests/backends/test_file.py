"""The ``file`` backend: the contract suite, plus what only a folder of sealed files can get
wrong (encryption at rest, keys, corruption, permissions, crashes, other processes)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from backends.file import FileBackend, FileSettings
from rotator.crypto import KeyRing, KeySource, generate_key
from rotator.errors import (
    BackendConflict,
    BackendCorrupt,
    BackendError,
    BackendInvalidName,
    BackendPermissionDenied,
    BackendUnavailable,
)
from rotator.model import Stage, StoredVersion, new_version_id
from tests.backends.contract import (
    BackendContract,
    BackendFactory,
    MakeBackend,
    error_texts,
    make_version,
    token_fragments,
)

ENV = "prod"
CRED = "acme-sap"


class TestFileBackend(BackendContract):
    @pytest.fixture
    def make_backend(self, tmp_path: Path, key_env: str) -> Iterator[MakeBackend]:
        settings = FileSettings(path=tmp_path / "store", key=KeySource(env=key_env))
        with BackendFactory(lambda env: FileBackend(settings, env)) as make:
            yield make


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def make(store: Path, key_env: str) -> Callable[..., FileBackend]:
    def build(environment: str = ENV, key: KeySource | None = None) -> FileBackend:
        return FileBackend(FileSettings(path=store, key=key or KeySource(env=key_env)), environment)

    return build


@pytest.fixture
def backend(make: Callable[..., FileBackend]) -> FileBackend:
    return make()


def promote_new(backend: FileBackend, cred: str = CRED) -> StoredVersion:
    v = make_version(ENV, cred)
    backend.stage_pending(v)
    backend.promote(cred, v.version_id)
    return v


def sealed_path(store: Path, v: StoredVersion) -> Path:
    return store / v.environment / v.credential / f"{v.version_id}.sealed"


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# -- layout and encryption at rest -------------------------------------------------------------


def test_layout_and_marker(backend: FileBackend, store: Path, key_env: str) -> None:
    v = promote_new(backend)
    env_dir = store / ENV
    assert sealed_path(store, v).is_file()
    assert (env_dir / CRED / "stages.json").is_file()  # the stage's write
    assert (env_dir / CRED / "stages.1.json").is_file()  # the promotion's, in the other slot
    marker = json.loads((env_dir / ".environment").read_text())
    assert marker["environment"] == ENV
    assert marker["managed_by"] == "makini-rotator"
    assert marker["key_id"] == KeyRing.load(KeySource(env=key_env)).key_id
    assert sorted(p.name for p in (env_dir / CRED).iterdir()) == sorted(
        ["stages.json", "stages.1.json", f"{v.version_id}.sealed"]
    )


def test_tokens_are_encrypted_at_rest(backend: FileBackend, store: Path) -> None:
    made = [promote_new(backend, cred) for cred in ("a", "b", "a")]
    stored = all_bytes(store)
    assert stored
    for v in made:
        for fragment in token_fragments(v):
            assert fragment.encode() not in stored


def newest_slot(store: Path, cred: str = CRED) -> Path:
    slots = [store / ENV / cred / name for name in ("stages.json", "stages.1.json")]
    return max(slots, key=lambda p: json.loads(p.read_text())["revision"])


def test_stages_json_is_readable_and_authenticated(backend: FileBackend, store: Path) -> None:
    v1, v2 = promote_new(backend), promote_new(backend)
    path = newest_slot(store)
    doc = json.loads(path.read_text())
    assert doc["stages"] == {"current": v2.version_id, "previous": v1.version_id}
    assert "mac" in doc
    doc["stages"] = {"current": v1.version_id, "previous": v2.version_id}  # roll back by hand
    mac, _ = doc.pop("mac"), doc.pop("sha256")
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    doc["mac"] = mac
    doc["sha256"] = hashlib.sha256(f"{canonical}\n{mac}".encode()).hexdigest()  # looks intact
    path.write_text(json.dumps(doc))
    with pytest.raises(BackendCorrupt) as info:
        backend.read(CRED)
    assert str(path) in info.value.message
    assert "corrupt" in info.value.message


def test_reads_create_nothing(backend: FileBackend, store: Path) -> None:
    assert backend.read(CRED) is None
    assert backend.versions(CRED) == []
    assert backend.credentials() == []
    backend.make_unreadable(CRED, new_version_id())
    backend.delete(CRED)
    assert not store.exists()


# -- keys --------------------------------------------------------------------------------------


def test_wrong_key_is_reported_by_file_and_key_id(
    make: Callable[..., FileBackend], store: Path, monkeypatch: pytest.MonkeyPatch, key_env: str
) -> None:
    old_key = os.environ[key_env]
    old_id = KeyRing.load(KeySource(env=key_env)).key_id
    v1 = promote_new(make())

    new_key = generate_key()
    monkeypatch.setenv(key_env, f"{new_key},{old_key}")  # rotating: new key first, old kept
    rotating = make()
    assert rotating.read(CRED) is not None
    v2 = promote_new(rotating)  # stages.json is now signed with the new key

    monkeypatch.setenv(key_env, new_key)  # the old key dropped too early
    without_old = make()
    assert without_old.read(CRED) is not None  # v2
    with pytest.raises(BackendCorrupt) as info:
        without_old.read(CRED, Stage.PREVIOUS)
    message = info.value.message
    assert str(sealed_path(store, v1)) in message
    assert f"encrypted with key id {old_id} which is not configured" in message
    assert info.value.hint and key_env in info.value.hint
    for fragment in token_fragments(v1) + token_fragments(v2):
        assert fragment not in error_texts(info.value)

    monkeypatch.setenv(key_env, generate_key())  # a key that never wrote anything here
    with pytest.raises(
        BackendCorrupt,
        match=r"stages(\.1)?\.json is signed with key id \w+ which is not configured",
    ):
        make().read(CRED)


def test_missing_key_is_permission_denied(
    make: Callable[..., FileBackend], monkeypatch: pytest.MonkeyPatch, key_env: str
) -> None:
    monkeypatch.delenv(key_env)
    backend = make()
    with pytest.raises(BackendPermissionDenied) as info:
        backend.check()
    assert key_env in info.value.message
    assert info.value.hint


def test_generated_key_file_is_private(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "sealing.key"
    settings = FileSettings(path=tmp_path / "store", key=KeySource(file=key_file, generate=True))
    backend = FileBackend(settings, ENV)
    backend.check()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    v = promote_new(backend)
    again = FileBackend(settings, ENV).read(CRED)
    assert again is not None and again.tokens.access == v.tokens.access


# -- corruption --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "is corrupt"),
        (lambda b: b[: len(b) // 2], "is corrupt"),
        (lambda b: b"hello", "not in the rotator's sealed format"),
        (lambda b: b"", "not in the rotator's sealed format"),
    ],
    ids=["bit-flip", "truncated", "foreign", "empty"],
)
def test_corrupt_version_file(
    backend: FileBackend, store: Path, damage: Callable[[bytes], bytes], expect: str
) -> None:
    v = promote_new(backend)
    path = sealed_path(store, v)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(BackendCorrupt, match=expect) as info:
        backend.read(CRED)
    assert str(path) in info.value.message
    assert info.value.__traceback__ is not None
    assert not any(f in error_texts(info.value) for f in token_fragments(v))


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b'{"mac": "!!"}', b'{"stages": {}}'], ids=repr
)
def test_corrupt_stages_file(backend: FileBackend, store: Path, content: bytes) -> None:
    promote_new(backend)
    for name in ("stages.json", "stages.1.json"):
        (store / ENV / CRED / name).write_bytes(content)
    for call in (
        lambda: backend.read(CRED),
        lambda: backend.versions(CRED),
        lambda: backend.promote(CRED, new_version_id()),
    ):
        with pytest.raises(BackendCorrupt, match=r"stages\.json"):
            call()


def test_current_version_id_agrees_with_read_without_opening_the_token(
    backend: FileBackend, store: Path
) -> None:
    """What ``rotator status`` asks: the current version's id from the authenticated stages
    record, None where :meth:`read` finds no current version; the token file is not opened."""
    assert backend.current_version_id(CRED) is None  # nothing stored yet
    first = promote_new(backend)
    assert backend.current_version_id(CRED) == first.version_id
    second = make_version(ENV, CRED)
    backend.stage_pending(second)  # pending is not current
    assert backend.current_version_id(CRED) == first.version_id
    backend.promote(CRED, second.version_id)
    current = backend.read(CRED)
    assert current is not None and backend.current_version_id(CRED) == current.version_id
    assert current.version_id == second.version_id
    # its file gone (a crash between the delete and the record): no current version, as read
    sealed = sealed_path(store, second)
    saved = sealed.read_bytes()
    sealed.unlink()
    assert backend.read(CRED) is None and backend.current_version_id(CRED) is None
    # a damaged token file is for the commands that open it; the display still names it
    sealed.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(BackendCorrupt):
        backend.read(CRED)
    assert backend.current_version_id(CRED) == second.version_id
    backend.make_unreadable(CRED, second.version_id)
    assert backend.current_version_id(CRED) is None


def test_current_version_id_refuses_an_edited_stages_record(
    backend: FileBackend, store: Path
) -> None:
    a, b = promote_new(backend, "alpha"), promote_new(backend, "beta")
    for name in ("stages.json", "stages.1.json"):  # beta's record names alpha's version
        doc = json.loads((store / ENV / "beta" / name).read_text())
        doc["stages"] = {k: a.version_id for k in doc["stages"]}
        doc["versions"] = [{"id": a.version_id, "readable": True}]
        del doc["sha256"]  # not a torn write: the MAC is what refuses it
        (store / ENV / "beta" / name).write_text(json.dumps(doc))
    with pytest.raises(BackendCorrupt, match=r"stages.*fails authentication"):
        backend.current_version_id("beta")
    assert backend.current_version_id("alpha") == a.version_id
    assert b.version_id != a.version_id


def test_a_file_moved_to_another_credential_does_not_open(
    backend: FileBackend, store: Path
) -> None:
    a, b = promote_new(backend, "alpha"), promote_new(backend, "beta")
    sealed_path(store, b).write_bytes(sealed_path(store, a).read_bytes())
    with pytest.raises(BackendCorrupt, match="corrupt"):
        backend.read("beta")


# -- permissions -------------------------------------------------------------------------------


def test_permissions_are_private_whatever_the_umask(backend: FileBackend, store: Path) -> None:
    old = os.umask(0)
    try:
        promote_new(backend)
        promote_new(backend)
        backend.check()
    finally:
        os.umask(old)
    paths = [store, *store.rglob("*")]
    assert len(paths) > 6
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {oct(mode)}"


@pytest.mark.parametrize("umask", [0o022, 0o277], ids=["umask-022", "umask-277"])
def test_folders_made_above_the_path_and_for_the_key_are_private_too(
    tmp_path: Path, umask: int
) -> None:
    # the store and its key sit below folders that do not exist yet: the rotator makes them,
    # 0700 (mkdir's mode is masked by the umask, so it must be set), and its files 0600
    settings = FileSettings(
        path=tmp_path / "srv" / "rotator" / "store",
        key=KeySource(file=tmp_path / "keys" / "prod" / "file.key", generate=True),
    )
    old = os.umask(umask)
    try:
        backend = FileBackend(settings, ENV)
        promote_new(backend)
        backend.check()
    finally:
        os.umask(old)
    made = list(tmp_path.rglob("*"))
    assert {p.name for p in made} >= {"srv", "rotator", "store", "keys", "prod", "file.key"}
    assert any(p.suffix == ".lock" for p in made)
    assert any(p.suffix == ".sealed" for p in made)
    for p in made:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), f"{p}: {oct(mode)}"


# -- names and environments --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", ".locks", "..", "", "A", "x" * 80, "a\x00b"])
def test_bad_credential_names_are_refused(backend: FileBackend, name: str) -> None:
    promote_new(backend)
    for call in (
        lambda: backend.read(name),
        lambda: backend.read_version(name, new_version_id()),
        lambda: backend.versions(name),
        lambda: backend.delete(name),
        lambda: backend.make_unreadable(name, new_version_id()),
        lambda: backend.stage_pending(make_version(ENV, name)),
        lambda: backend.promote(name, new_version_id()),
    ):
        with pytest.raises(BackendInvalidName):
            call()
    assert backend.credentials() == [CRED]


@pytest.mark.parametrize("vid", ["../stages", "../../x", "a/b", ".tmp-x", "", "x" * 200, "a\nb"])
def test_bad_version_ids_are_refused(backend: FileBackend, vid: str) -> None:
    v = promote_new(backend)
    calls: list[Callable[[], object]] = [
        lambda: backend.read_version(CRED, vid),
        lambda: backend.make_unreadable(CRED, vid),
        lambda: backend.promote(CRED, vid),
        lambda: backend.stage_pending(replace(make_version(ENV, CRED), version_id=vid)),
    ]
    for call in calls:
        with pytest.raises(BackendInvalidName):
            call()
    assert [i.version_id for i in backend.versions(CRED)] == [v.version_id]


def test_foreign_or_unmanaged_folders_are_refused(
    make: Callable[..., FileBackend], store: Path
) -> None:
    env_dir = store / ENV
    env_dir.mkdir(parents=True)
    (env_dir / "notes.txt").write_text("someone else's folder")
    with pytest.raises(BackendConflict, match="not managed by the rotator") as info:
        make().stage_pending(make_version(ENV, CRED))
    assert info.value.where == str(env_dir) and info.value.hint

    (env_dir / ".environment").write_text(json.dumps({"managed_by": "other-tool"}))
    with pytest.raises(BackendConflict, match="not managed by the rotator"):
        make().read(CRED)

    (env_dir / ".environment").write_text(
        json.dumps({"managed_by": "makini-rotator", "environment": "staging"})
    )
    with pytest.raises(BackendConflict, match="belongs to environment 'staging'") as info:
        make().check()
    assert info.value.hint and "own" in info.value.hint


def test_an_empty_existing_folder_is_adopted(make: Callable[..., FileBackend], store: Path) -> None:
    (store / ENV).mkdir(parents=True)
    backend = make()
    backend.check()
    assert json.loads((store / ENV / ".environment").read_text())["environment"] == ENV
    promote_new(backend)


def test_second_environment_on_one_path_is_refused(
    make: Callable[..., FileBackend], store: Path
) -> None:
    promote_new(make(ENV))
    dev = make("dev")
    with pytest.raises(BackendConflict, match="already holds environment 'prod'") as info:
        dev.check()
    assert str(store) in info.value.message
    assert info.value.hint and "own file backend path" in info.value.hint
    assert not (store / "dev").exists()


# -- crashes and faults ------------------------------------------------------------------------


def test_a_crash_mid_write_leaves_the_last_state(backend: FileBackend, store: Path) -> None:
    v1 = promote_new(backend)
    cred_dir = store / ENV / CRED
    v2 = make_version(ENV, CRED)
    # what a writer killed at each point leaves behind: half-written temporary files, and a
    # version file whose stages.json update never happened
    (cred_dir / ".tmp-stages.json-0badc0de").write_bytes(b'{"stages": {"curr')
    (cred_dir / f".tmp-{v2.version_id}.sealed-0badc0de").write_bytes(b"RS1\x00")
    sealed_path(store, v2).write_bytes(sealed_path(store, v1).read_bytes())

    fresh = FileBackend(backend.settings, ENV)
    current = fresh.read(CRED)
    assert current is not None and current.version_id == v1.version_id
    assert fresh.read_version(CRED, v2.version_id) is None  # never recorded: not there
    assert fresh.credentials() == [CRED]

    fresh.stage_pending(v2)  # the retry finishes the job and sweeps the debris
    fresh.promote(CRED, v2.version_id)
    current = fresh.read(CRED)
    assert current is not None and current.tokens.access == v2.tokens.access
    assert not [p for p in cred_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("left", [lambda b: b[: len(b) // 2], lambda b: b + b], ids=["cut", "long"])
def test_a_version_file_left_before_it_was_listed_is_written_again(
    backend: FileBackend, store: Path, left: Callable[[bytes], bytes]
) -> None:
    """A version file is written in place before any stages file lists it: one a crash left
    behind (cut off, or longer, with another mode) is never read, and the retry writes it
    whole, 0600."""
    v1 = make_version(ENV, CRED)
    backend.stage_pending(v1)
    whole = sealed_path(store, v1).read_bytes()
    v2 = make_version(ENV, CRED)
    path = sealed_path(store, v2)
    path.write_bytes(left(whole))
    path.chmod(0o644)
    assert backend.read_version(CRED, v2.version_id) is None  # not listed: never opened
    assert [i.version_id for i in backend.versions(CRED)] == [v1.version_id]
    backend.stage_pending(v2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pending = backend.read(CRED, Stage.PENDING)
    assert pending is not None and pending.tokens.access == v2.tokens.access
    assert not [p for p in (store / ENV / CRED).iterdir() if p.name.startswith(".tmp-")]


def test_a_write_that_dies_in_a_stages_slot_leaves_the_state_before_it(
    backend: FileBackend, store: Path
) -> None:
    v1 = promote_new(backend)
    v2 = make_version(ENV, CRED)
    backend.stage_pending(v2)
    slot = store / ENV / CRED / "stages.1.json"  # the slot the promotion writes to
    before = slot.read_bytes()
    backend.promote(CRED, v2.version_id)
    after = slot.read_bytes()
    # what a power loss in the promotion's write can leave: its first bytes over the old ones
    # (parses as JSON, checksum fails), or a cut-off file
    for torn in (after[:60] + before[60:], after[: len(after) // 2]):
        slot.write_bytes(torn)
        current = backend.read(CRED)
        assert current is not None and current.version_id == v1.version_id
        pending = backend.read(CRED, Stage.PENDING)
        assert pending is not None and pending.version_id == v2.version_id
    backend.promote(CRED, v2.version_id)  # the retry writes the torn slot again
    current = backend.read(CRED)
    assert current is not None and current.version_id == v2.version_id
    assert slot.read_bytes() != after[: len(after) // 2]


def test_make_unreadable_destroys_the_file_even_without_a_record(
    backend: FileBackend, store: Path
) -> None:
    v1 = promote_new(backend)
    v2 = promote_new(backend)
    backend.make_unreadable(CRED, v1.version_id)
    assert not sealed_path(store, v1).exists()
    # a stage that died before recording its version, then rolled back
    stray = make_version(ENV, CRED)
    sealed_path(store, stray).write_bytes(sealed_path(store, v2).read_bytes())
    backend.make_unreadable(CRED, stray.version_id)
    assert not sealed_path(store, stray).exists()
    assert [i.version_id for i in backend.versions(CRED)] == [v1.version_id, v2.version_id]


def fail_on(monkeypatch: pytest.MonkeyPatch, call: str, name: str) -> Callable[[], None]:
    """Make ``os.<call>`` fail with EIO for the file ``name`` (given by path or descriptor);
    returns the undo."""
    real = getattr(os, call)

    def names_it(arg: object) -> bool:
        path = os.readlink(f"/proc/self/fd/{arg}") if isinstance(arg, int) else str(arg)
        return path.endswith(f"/{name}")

    def fail(*args: object) -> object:
        if names_it(args[-1] if call == "replace" else args[0]):
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(os, call, fail)
    return lambda: monkeypatch.setattr(os, call, real)


@pytest.mark.parametrize("call", ["pwrite", "fsync"])
def test_a_failed_write_in_place_changes_nothing(
    backend: FileBackend, store: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    v1 = promote_new(backend)  # both slots exist: the next write goes over stages.json
    undo = fail_on(monkeypatch, call, "stages.json")
    v2 = make_version(ENV, CRED)
    with pytest.raises(BackendUnavailable, match=r"stages\.json: Input/output error"):
        backend.stage_pending(v2)
    undo()
    assert [i.version_id for i in backend.versions(CRED)] == [v1.version_id]
    assert not [p for p in (store / ENV / CRED).iterdir() if p.name.startswith(".tmp-")]
    backend.stage_pending(v2)
    backend.promote(CRED, v2.version_id)
    assert backend.versions(CRED)[-1].stage is Stage.CURRENT


def test_a_failed_new_slot_changes_nothing(
    backend: FileBackend, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = make_version(ENV, CRED)
    backend.stage_pending(v1)  # stages.json only: the promotion creates stages.1.json
    undo = fail_on(monkeypatch, "replace", "stages.1.json")
    with pytest.raises(BackendUnavailable, match=r"stages\.1\.json: Input/output error"):
        backend.promote(CRED, v1.version_id)
    undo()
    assert backend.read(CRED) is None
    pending = backend.read(CRED, Stage.PENDING)
    assert pending is not None and pending.version_id == v1.version_id
    assert not (store / ENV / CRED / "stages.1.json").exists()
    backend.promote(CRED, v1.version_id)
    current = backend.read(CRED)
    assert current is not None and current.version_id == v1.version_id


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EACCES, BackendPermissionDenied),
        (errno.EPERM, BackendPermissionDenied),
        (errno.EROFS, BackendPermissionDenied),
        (errno.ENOSPC, BackendUnavailable),
        (errno.EIO, BackendUnavailable),
        (errno.EDQUOT, BackendUnavailable),
    ],
    ids=errno.errorcode.get,
)
def test_os_errors_are_mapped_with_the_path(
    make: Callable[..., FileBackend],
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    expected: type[BackendError],
) -> None:
    backend = make()
    v = promote_new(backend)
    real_open = os.open

    def failing_open(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        if str(path).startswith(str(store)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", failing_open)
    calls: list[Callable[[], object]] = [
        lambda: backend.stage_pending(make_version(ENV, CRED)),
        lambda: backend.promote(CRED, v.version_id + "0"),
        lambda: backend.read(CRED),
        lambda: backend.read_version(CRED, v.version_id),
        lambda: backend.versions(CRED),
        lambda: backend.make_unreadable(CRED, v.version_id),
        lambda: make().check(),
    ]
    for call in calls:
        with pytest.raises(expected) as info:
            call()
        assert str(store) in info.value.message
        assert os.strerror(code) in info.value.message


def test_a_lock_held_too_long_is_unavailable(
    backend: FileBackend, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    promote_new(backend)
    monkeypatch.setattr(FileBackend, "lock_timeout_s", 0.05)
    fd = os.open(store / ENV / ".locks" / f"{CRED}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BackendUnavailable, match="lock"):
            backend.stage_pending(make_version(ENV, CRED))
        assert backend.read(CRED) is not None  # readers take no lock
    finally:
        os.close(fd)
    backend.stage_pending(make_version(ENV, CRED))


# -- other processes ---------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys, json
    from backends.file import FileBackend, FileSettings
    from rotator.crypto import KeySource
    from rotator.model import Secret, StoredVersion, TokenPair, new_version_id

    store, key_env, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = FileBackend(FileSettings(path=store, key=KeySource(env=key_env)), "prod")
    made = []
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(rounds):
        v = StoredVersion("prod", "acme-sap", new_version_id(),
                          TokenPair(Secret(os.urandom(16).hex())))
        b.stage_pending(v)
        b.promote("acme-sap", v.version_id)
        if made:
            b.make_unreadable("acme-sap", made[0])
        made.append(v.version_id)
    print(json.dumps(made), flush=True)
    """
)


def test_processes_rotating_one_credential_stay_consistent(
    backend: FileBackend, store: Path, key_env: str
) -> None:
    first = promote_new(backend)
    rounds, workers = 12, 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(store), key_env, str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # start them together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * workers
    made = [vid for out in outputs for vid in json.loads(out.strip().splitlines()[-1])]
    unreadable = {json.loads(out.strip().splitlines()[-1])[0] for out in outputs}

    infos = backend.versions(CRED)
    assert len(infos) == 1 + workers * rounds
    assert {i.version_id for i in infos} == {first.version_id, *made}
    for info in infos:
        assert info.readable == (info.version_id not in unreadable)
        assert info.readable == (store / ENV / CRED / f"{info.version_id}.sealed").exists()
    current = backend.read(CRED)
    assert current is not None and current.version_id in made
    labelled = [i for i in infos if i.stage is not None]
    assert len({i.version_id for i in labelled}) == len(labelled)
    assert backend.read(CRED, Stage.PENDING) is None
    for info in infos:
        if info.readable:
            assert backend.read_version(CRED, info.version_id) is not None


def test_a_marker_being_written_by_another_process_is_not_a_foreign_folder(
    make: Callable[..., FileBackend], store: Path
) -> None:
    # another process made the folder and is writing its marker (a temporary file so far)
    (store / ENV).mkdir(parents=True)
    (store / ENV / ".tmp-.environment-0123456789ab").write_text("{}")
    v = promote_new(make())
    current = make().read(CRED)
    assert current is not None and current.version_id == v.version_id


def test_backends_starting_together_on_a_new_folder_all_work(
    make: Callable[..., FileBackend], tmp_path: Path, key_env: str
) -> None:
    # run-due's workers (or any processes) storing their first versions at once
    for attempt in range(10):
        settings = FileSettings(path=tmp_path / f"new-{attempt}", key=KeySource(env=key_env))
        backends = [FileBackend(settings, ENV) for _ in range(4)]
        barrier = threading.Barrier(len(backends))

        def first(
            n: int, backends: list[FileBackend] = backends, barrier: threading.Barrier = barrier
        ) -> StoredVersion:
            barrier.wait()
            return promote_new(backends[n], f"cred-{n}")

        with ThreadPoolExecutor(len(backends)) as pool:
            stored = list(pool.map(first, range(len(backends))))
        for n, v in enumerate(stored):
            current = backends[0].read(f"cred-{n}")
            assert current is not None and current.version_id == v.version_id


def test_an_oversized_file_is_refused(backend: FileBackend, store: Path) -> None:
    v = promote_new(backend)
    sealed_path(store, v).write_bytes(b"x" * (2 << 20))
    with pytest.raises(BackendCorrupt, match="far larger than anything the rotator writes"):
        backend.read(CRED)
