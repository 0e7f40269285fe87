"""Read a rotated set of line files (``flows.jsonl``, ``.1``, ``.2`` …) in
time order, then follow the current one across rotations.

Following waits on inotify (through ctypes, as ztnet.daemon.watch does) on
the directory, so an appended line is seen as soon as it is written; every
``poll_interval`` it also looks without being woken, which covers systems
without inotify (or out of watches) and is how ``stop`` is noticed.

Rotation is recognised by the current name pointing at another inode. The
old file is then read to its end, then every file rotated after it (found
by its inode among the ``.N`` names), then the new current file from its
start: no line is skipped or read twice, however many rotations happened
while we waited.
"""

from __future__ import annotations

import ctypes
import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path

_IN_MASK = 0x002 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200  # modify, close_write, moves, create,
_IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000                   # delete
_CHUNK = 1 << 16


class DirWatch:
    """inotify on a directory; ``wait`` returns when something in it changed
    or ``timeout`` passed. Without inotify it just waits."""

    def __init__(self, directory: Path) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(_IN_NONBLOCK_CLOEXEC))
            if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MASK) < 0:
                os.close(fd)
                fd = -1
            self.fd = fd
        except (OSError, AttributeError):
            self.fd = -1
        self._poller = select.poll()
        if self.fd >= 0:
            self._poller.register(self.fd, select.POLLIN)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        if self.fd < 0:
            stop.wait(timeout)
            return
        if self._poller.poll(int(timeout * 1000)):
            try:
                while os.read(self.fd, _CHUNK):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def rotated_files(path: Path) -> list[Path]:
    """``path.N`` … ``path.1``: the rotated files, oldest first."""
    numbered = []
    for candidate in path.parent.glob(path.name + ".*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            numbered.append((int(suffix), candidate))
    return [p for _, p in sorted(numbered, reverse=True)]


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def read_lines(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip(b"\n")
    except FileNotFoundError:  # rotated away meanwhile
        return


class LineTail:
    """``history()`` then ``follow(stop)``; lines come without their newline."""

    def __init__(self, path: Path, *, poll_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._fd = -1
        self._id: tuple[int, int] | None = None
        self._offset = 0
        self._partial = b""
        self._positioned = False  # history() read everything so far (maybe nothing)
        self.torn = 0  # incomplete lines abandoned at a rotation

    def _open_current(self, *, at_end: bool) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        self._fd, self._id, self._partial = fd, (st.st_dev, st.st_ino), b""
        self._offset = st.st_size if at_end else 0
        return True

    def _close_current(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._id, self._offset = -1, None, 0
        if self._partial.strip():
            self.torn += 1
        self._partial = b""

    def _read_available(self) -> list[bytes]:
        chunks = []
        while True:
            chunk = os.pread(self._fd, _CHUNK, self._offset)
            if not chunk:
                break
            chunks.append(chunk)
            self._offset += len(chunk)
        if not chunks:
            return []
        data = self._partial + b"".join(chunks)
        *lines, self._partial = data.split(b"\n")
        return [line for line in lines if line.strip()]

    def history(self, *, newer_than: float | None = None) -> Iterator[bytes]:
        """Every line so far, oldest first; rotated files last modified
        before ``newer_than`` (Unix s) are skipped unread."""
        self._positioned = True
        self._open_current(at_end=False)
        for rotated in rotated_files(self.path):
            if self._id is not None and _inode(rotated) == self._id:
                break  # rotated since we opened it: the rest is read through _fd
            try:
                if newer_than is not None and rotated.stat().st_mtime < newer_than:
                    continue
            except FileNotFoundError:
                continue
            yield from read_lines(rotated)
        if self._fd >= 0:
            yield from self._read_available()

    def follow(self, stop: threading.Event) -> Iterator[bytes]:
        """Lines appended from now on (or after ``history``) until ``stop``. A
        file that does not exist yet is read from its start once it appears."""
        if not self._positioned:
            self._positioned = True
            self._open_current(at_end=True)
        watch = DirWatch(self.path.parent)
        try:
            while not stop.is_set():
                if self._fd < 0:
                    if not self._open_current(at_end=False):
                        watch.wait(self.poll_interval, stop)
                    continue
                lines = self._read_available()
                if lines:
                    yield from lines
                    continue
                now = _inode(self.path)
                if now == self._id:
                    if os.fstat(self._fd).st_size < self._offset:  # truncated in place
                        self._offset, self._partial = 0, b""
                        continue
                    watch.wait(self.poll_interval, stop)
                    continue
                yield from self._switch()
        finally:
            watch.close()

    def _switch(self) -> Iterator[bytes]:
        """The current name moved on: finish our file, then the newer ones."""
        yield from self._read_available()
        newer = self._newer_rotated()
        self._close_current()
        for path in newer:
            yield from read_lines(path)
        self._open_current(at_end=False)

    def _newer_rotated(self) -> list[Path]:
        files = rotated_files(self.path)
        for index, path in enumerate(files):
            if _inode(path) == self._id:
                return files[index + 1:]
        # not among the rotated names: deleted (it aged out, or backups=0),
        # so every rotated file is newer; or moved elsewhere: none is ours
        return files if os.fstat(self._fd).st_nlink == 0 else []

    def close(self) -> None:
        self._close_current()
