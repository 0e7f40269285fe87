"""Crash-safe file writes and bounded reads, shared by every component that
keeps state on disk or reads a file it does not trust.

Callers translate ``OSError`` (and ``FileTooLarge``) into their own
``ZtnetError`` subclass, so the message names the subsystem.
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike[str]


class FileTooLarge(ValueError):
    """A file holds more than the reader's limit (it was not read past it)."""

    def __init__(self, path: PathLike, limit: int) -> None:
        super().__init__(f"{os.fspath(path)} is larger than {limit} bytes")
        self.path = os.fspath(path)
        self.limit = limit


def read_bounded(path: PathLike, limit: int) -> bytes:
    """The content of ``path`` if it is at most ``limit`` bytes, reading no more than
    ``limit + 1`` (a huge or endless file costs nothing); ``FileTooLarge`` otherwise.
    ``OSError`` from opening or reading is left to the caller."""
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(path, limit)
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path``, never replacing or following an existing one (O_EXCL,
    O_NOFOLLOW), with ``mode`` from the start: a private key is never readable
    by others, not even for a moment. Removes the file if writing fails."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def replace_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` so that a crash or power loss leaves the old content or
    the new, never a mixture: ``.NAME.tmp``, fsync, rename, fsync of the
    directory. The temporary file is created afresh (O_EXCL, O_NOFOLLOW) with
    ``mode`` from the start, so a key is never readable by others and a planted
    symlink or hard link is never written through."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
