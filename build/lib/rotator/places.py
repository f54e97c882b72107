"""Canonical forms of where things are stored, and private folders to store them in.

Two settings name the same place when their canonical forms are equal, whatever way they are
written: a file path through ``..`` or a symbolic link, a URL in another case, with its default
port or a trailing slash, a path prefix with ``//``, ``./`` or ``..`` in it. A :class:`Place` also
says when one place is *inside* another (a folder in a folder, a Vault path under another, a
secret name prefix that starts another): the configuration refuses both between environments.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Place:
    """A canonical storage location.

    ``store`` names the store (the kind of backend and the server, account or folder tree);
    ``path`` is the place inside it, as segments (one place is inside another when its segments
    start with the other's) or, for a ``flat`` store whose names are plain strings (AWS secret
    names, Key Vault secret names), as one string (inside when it starts with the other's).
    """

    store: str
    path: tuple[str, ...] = ()
    flat: bool = False
    inode: tuple[int, int] | None = field(default=None, compare=False)
    """Device and inode of an existing file or folder: two paths to one (a hard link, a bind
    mount) are the same place."""

    def relation(self, other: Place) -> str | None:
        """``"same"``, ``"inside"`` (self is inside other), ``"contains"`` or ``None``."""
        if self.inode is not None and self.inode == other.inode:
            return "same"
        if self.store != other.store or self.flat != other.flat:
            return None
        if self.path == other.path:
            return "same"
        if _starts(self.path, other.path, flat=self.flat):
            return "inside"
        if _starts(other.path, self.path, flat=self.flat):
            return "contains"
        return None

    def __str__(self) -> str:
        if self.flat:
            return f"{self.store} names starting {''.join(self.path)!r}"
        if self.store == "file":
            return "/" + "/".join(self.path)
        return f"{self.store}/{'/'.join(self.path)}"


def _starts(inner: tuple[str, ...], outer: tuple[str, ...], *, flat: bool) -> bool:
    if flat:
        return "".join(inner).startswith("".join(outer))
    return inner[: len(outer)] == outer


def segments(*paths: str) -> tuple[str, ...]:
    """The segments of ``paths`` joined, with empty and ``.`` segments dropped and each ``..``
    taking away the segment before it (never above the root)."""
    out: list[str] = []
    for path in paths:
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            out.append(part)
    return tuple(out)


def canonical_url(url: str) -> str:
    """``scheme://host[:port][/path]``: scheme and host in lower case, the host without a
    trailing dot, no default port, no user part, the path's segments normalised."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # e.g. an unbalanced "[": compare what was written, in one case
        return url.strip().lower()
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    try:
        port = parts.port
    except ValueError:  # not a number: keep what was written, in one case
        return f"{scheme}://{parts.netloc.lower()}/" + "/".join(segments(parts.path))
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = "/".join(segments(parts.path))
    return f"{scheme}://{netloc}" + (f"/{path}" if path else "")


def canonical_path(path: Path | str) -> Path:
    """The real path: ``..`` and symbolic links resolved, absolute. Parts that do not exist yet
    are kept as written (below the real path of the longest prefix that does exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def file_place(path: Path | str) -> Place:
    """The place of a file or folder: its real path, and its inode if it exists."""
    real = canonical_path(path)
    try:
        info = os.stat(real)
    except OSError:
        inode = None
    else:
        inode = (info.st_dev, info.st_ino)
    return Place("file", real.parts[1:], inode=inode)


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
