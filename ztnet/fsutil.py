"""Crash-safe file writes, shared by every component that keeps state on disk.

Callers translate ``OSError`` into their own ``ZtnetError`` subclass, so the
message names the subsystem.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
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
