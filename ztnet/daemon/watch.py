"""Notice when the bundle file changes: inotify on its directory (editors and
`policy compile` replace the file by rename, which a watch on the file itself
would miss)."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class FileWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(self.fd, str(path.parent).encode(), mask) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"cannot watch {path.parent}")

    def fileno(self) -> int:
        return self.fd

    def changed(self) -> bool:
        """Drain pending events; True if one concerned our file."""
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
                hit |= name.decode(errors="replace") == self.path.name
                offset += _EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)
