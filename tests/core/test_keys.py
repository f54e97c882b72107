"""Key errors say which key (its key path and role), which file or variable, and what to do;
a key file the rotator creates is private whatever the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from backends.file import FileBackend
from rotator.crypto import KeyRing, KeySource, generate_key
from rotator.errors import BackendPermissionDenied, ConfigError, RotatorError
from rotator.settings import Config, load_config

CONFIG = """
[environments.prod]
sealing_key = {{ {prod_seal} }}
[environments.prod.makini]
client_id = "p"
client_secret_env = "KEYS_P_SECRET"
[[environments.prod.backends]]
type = "file"
name = "local"
path = "prod-files"
key = {{ {prod_file} }}

[environments.dev]
sealing_key = {{ env = "KEYS_DEV_SEAL" }}
[environments.dev.makini]
client_id = "d"
client_secret_env = "KEYS_D_SECRET"
[[environments.dev.backends]]
type = "file"
path = "dev-files"
key = {{ file = "dev-file.key", generate = true }}
"""


def config(tmp_path: Path, prod_seal: str, prod_file: str = 'file = "file.key"') -> Config:
    path = tmp_path / "rotator.toml"
    path.write_text(CONFIG.format(prod_seal=prod_seal, prod_file=prod_file))
    return load_config(path)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KEYS_DEV_SEAL", generate_key())
    (tmp_path / "file.key").write_text(generate_key() + "\n")
    (tmp_path / "file.key").chmod(0o600)


def _binary(path: Path) -> None:
    path.write_bytes(b"\xff\xfe\x00garbage\x80" * 3)


def _short(path: Path) -> None:
    path.write_text("c2hvcnQ=\n")  # base64, but 5 bytes


def _empty(path: Path) -> None:
    path.write_text("\n\n")


def _folder(path: Path) -> None:
    path.mkdir()


def _second_line(path: Path) -> None:
    path.write_text(generate_key() + "\nnot a key at all\n")


# (how to break the file, what the message says about it, a word of what to do)
FILE_DAMAGE: list[tuple[Callable[[Path], None], str, str]] = [
    (lambda p: None, "does not exist", "rotator keygen >"),
    (_binary, "binary data, not 32 bytes of base64", "rotator keygen >"),
    (_short, "line 1 of the key file", "rotator keygen >"),
    (_second_line, "line 2 of the key file", "rotator keygen >"),
    (_empty, "is empty", "rotator keygen >"),
    (_folder, "it is a folder", "point environments.prod."),
]
IDS = ["missing", "binary", "wrong-length", "second-line", "empty", "folder"]


def _assert_names_everything(exc: RotatorError, key_path: str, role: str, path: Path) -> None:
    text = exc.describe()
    assert key_path in text, text
    assert role in text, text
    assert str(path) in text, text
    assert exc.hint, text


@pytest.mark.parametrize(("damage", "says", "todo"), FILE_DAMAGE, ids=IDS)
def test_a_sealing_key_file_error_names_the_key_the_file_and_what_to_do(
    tmp_path: Path, damage: Callable[[Path], None], says: str, todo: str
) -> None:
    path = tmp_path / "prod-sealing.key"
    damage(path)
    cfg = config(tmp_path, 'file = "prod-sealing.key"')
    with pytest.raises(ConfigError) as info:
        KeyRing.load(cfg.environments["prod"].sealing_key)
    _assert_names_everything(
        info.value, "environments.prod.sealing_key", "the sealing key of environment 'prod'", path
    )
    assert says in info.value.describe() and todo in str(info.value.hint)


@pytest.mark.parametrize(("damage", "says", "todo"), FILE_DAMAGE, ids=IDS)
def test_a_file_backend_key_error_names_the_backend_key(
    tmp_path: Path, damage: Callable[[Path], None], says: str, todo: str
) -> None:
    path = tmp_path / "prod-file.key"
    damage(path)
    cfg = config(tmp_path, 'env = "KEYS_DEV_SEAL_UNUSED"', 'file = "prod-file.key"')
    backend = FileBackend(cfg.environments["prod"].backend_settings[0], "prod")
    with pytest.raises(BackendPermissionDenied) as info:
        backend.check()
    _assert_names_everything(
        info.value,
        "environments.prod.backends[0].key",
        "the key of backend 'local' of environment 'prod'",
        path,
    )
    assert says in info.value.describe() and todo in str(info.value.hint)
    assert not (tmp_path / "prod-files").exists()  # nothing was written without a key


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "KEYS_PROD_SEAL is not set"),
        ("", "KEYS_PROD_SEAL is empty"),
        ("c2hvcnQ=", "the environment variable KEYS_PROD_SEAL"),
        (f"{generate_key()},nonsense", "entry 2 of the environment variable KEYS_PROD_SEAL"),
    ],
    ids=["unset", "empty", "wrong-length", "second-entry"],
)
def test_a_sealing_key_variable_error_names_the_key_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, says: str
) -> None:
    if value is None:
        monkeypatch.delenv("KEYS_PROD_SEAL", raising=False)
    else:
        monkeypatch.setenv("KEYS_PROD_SEAL", value)
    cfg = config(tmp_path, 'env = "KEYS_PROD_SEAL"')
    with pytest.raises(ConfigError) as info:
        KeyRing.load(cfg.environments["prod"].sealing_key)
    text = info.value.describe()
    assert "environments.prod.sealing_key" in text and "sealing key of environment 'prod'" in text
    assert says in text and "rotator keygen" in str(info.value.hint)
    if value:
        for part in value.split(","):
            assert part not in text  # never the value, not even a wrong one


def test_a_key_file_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    # generate = true below a regular file: an OSError escaped before (an "internal error")
    (tmp_path / "keys").write_text("a file, not a folder")
    cfg = config(tmp_path, 'file = "keys/prod.key", generate = true')
    with pytest.raises(ConfigError) as info:
        KeyRing.load(cfg.environments["prod"].sealing_key)
    _assert_names_everything(
        info.value,
        "environments.prod.sealing_key",
        "the sealing key of environment 'prod'",
        tmp_path / "keys" / "prod.key",
    )
    assert "cannot create the key file" in info.value.message


def test_an_unreadable_key_file_says_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "prod-sealing.key"
    path.write_text(generate_key() + "\n")
    config(tmp_path, 'file = "prod-sealing.key"')  # valid as a configuration
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(ConfigError) as info:
            KeyRing.load(config(tmp_path, 'file = "prod-sealing.key"').environments[
                "prod"].sealing_key)
        text = info.value.describe()
    else:  # root reads anything: load it as an unprivileged user
        path.chmod(0o600)
        script = (
            "import os, sys\n"
            "from rotator.crypto import KeyRing\n"
            "from rotator.errors import ConfigError\n"
            "from rotator.settings import load_config\n"
            "cfg = load_config(sys.argv[1])\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    KeyRing.load(cfg.environments['prod'].sealing_key)\n"
            "except ConfigError as exc:\n"
            "    print(exc.describe()); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "rotator.toml")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert proc.returncode == 3, proc.stdout + proc.stderr
        text = proc.stdout
    assert "permission denied" in text and str(path) in text, text
    assert "environments.prod.sealing_key" in text and "chmod 600" in text, text
    assert path.read_text().strip() not in text


@pytest.mark.parametrize("umask", [0o022, 0o277], ids=["umask-022", "umask-277"])
def test_a_generated_key_file_and_its_folders_are_private(tmp_path: Path, umask: int) -> None:
    key = tmp_path / "run" / "keys" / "prod.key"
    tmp_path.chmod(0o755)
    old = os.umask(umask)
    try:
        KeyRing.load(KeySource(file=key, generate=True))
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for folder in (tmp_path / "run", tmp_path / "run" / "keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # a folder it did not make: as it was
