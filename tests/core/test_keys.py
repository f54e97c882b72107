"""Keys: a key file the rotator creates is private whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rotator.crypto import KeyRing, KeySource


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
