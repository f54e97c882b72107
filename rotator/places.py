"""Where things are stored: private folders to store them in."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def make_private_dirs(path: Path, mode: int = 0o700) -> None:
    """Create the folder ``path`` and every missing folder above it with exactly ``mode``
    (``mkdir``'s mode is masked by the umask: each folder made here is chmod-ed). Folders that
    already exist are left as they are."""
    missing: list[Path] = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         str(folder)) from None
            continue  # another process made it meanwhile: theirs
        os.chmod(folder, mode)
