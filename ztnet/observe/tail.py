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
import itertools
import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path

_IN_MASK = 0x002 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200  # modify, close_write, moves, create,
_IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000                   # delete
_CHUNK = 1 << 16
_BATCH_LINES = 4096  # follow_batches' lists from a rotated file
_SNAPSHOT_TRIES = 20  # to see the names while no rotation moves them


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


def _open_with_id(path: Path) -> tuple[int, tuple[int, int]] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino)


def _lines_of(fd: int) -> Iterator[bytes]:
    """The non-blank lines of an open file from its start, without their newline (the fd
    stays open)."""
    with open(fd, "rb", closefd=False) as fh:
        fh.seek(0)
        for line in fh:
            if line.strip():
                yield line.rstrip(b"\n")


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
        opened = _open_with_id(self.path)
        if opened is not None:
            self._follow_from(opened, at_end=at_end)
        return opened is not None

    def _follow_from(self, opened: tuple[int, tuple[int, int]], *, at_end: bool) -> None:
        """Make ``opened`` (fd, identity) the file followed, from its start or its end."""
        (self._fd, self._id), self._partial = opened, b""
        self._offset = os.fstat(self._fd).st_size if at_end else 0

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
        before ``newer_than`` (Unix s) are skipped unread. The files are those the names
        held at one moment (``_snapshot``), opened first: a rotation while they are read
        moves names, not the files held, and ``follow`` then picks up from the current one."""
        self._positioned = True
        rotated, current = self._snapshot()
        if current is not None:
            self._follow_from(current, at_end=False)
        try:
            for fd, _ in rotated:
                if newer_than is None or os.fstat(fd).st_mtime >= newer_than:
                    yield from _lines_of(fd)
        finally:
            for fd, _ in rotated:
                os.close(fd)
        if self._fd >= 0:
            yield from self._read_available()

    def follow(self, stop: threading.Event) -> Iterator[bytes]:
        """Lines appended from now on (or after ``history``) until ``stop``. A
        file that does not exist yet is read from its start once it appears."""
        for lines in self.follow_batches(stop):
            yield from lines

    def follow_batches(self, stop: threading.Event) -> Iterator[list[bytes]]:
        """``follow`` a read at a time: each list holds the lines one read found (never
        empty), for a reader that can take them whole (a file rotated away meanwhile comes
        in lists of at most ``_BATCH_LINES``)."""
        if not self._positioned:
            self._positioned = True
            self._open_current(at_end=True)
        watch = DirWatch(self.path.parent)
        try:
            while not stop.is_set():
                if self._fd < 0:
                    if self._id is not None and _inode(self.path) is not None:
                        yield from self._switch()  # on from the rotated file we read last
                    elif self._id is not None or not self._open_current(at_end=False):
                        watch.wait(self.poll_interval, stop)
                    continue
                lines = self._read_available()
                if lines:
                    yield lines
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

    def _switch(self) -> Iterator[list[bytes]]:
        """The current name moved on from the file we read last (``_id``): finish it, then
        every file rotated after it, then the current file from its start. What is read is
        what the names held at one moment (``_snapshot``), opened before it is read: a
        writer that rotates again meanwhile moves names, not the files we hold."""
        if self._fd >= 0:
            if lines := self._read_available():
                yield lines
            deleted = os.fstat(self._fd).st_nlink == 0
        else:  # ours is a rotated file read to its end and closed: if gone, it aged out
            deleted = True
        rotated, current = self._snapshot()
        try:
            if current is not None and current[1] == self._id:
                # the name points at our file again (or still): nothing moved; if we had
                # read it as a rotated file, to its end, we follow it from there
                if self._fd < 0:
                    self._follow_from(current, at_end=True)
                    current = None
                return
            ids = [ident for _, ident in rotated]
            if self._id in ids:
                newer = rotated[ids.index(self._id) + 1:]
            else:
                # not among the rotated names: deleted (it aged out, or backups=0), so
                # every rotated file is newer; or moved elsewhere: none is ours
                newer = rotated if deleted else []
            last = self._id
            self._close_current()
            for fd, ident in newer:
                lines_of = _lines_of(fd)
                while lines := list(itertools.islice(lines_of, _BATCH_LINES)):
                    yield lines
                last = ident
            if current is None:  # between a rotation's rename and the new file
                self._id = last
            else:
                self._follow_from(current, at_end=False)
                current = None
        finally:
            for fd, _ in [*rotated, *([current] if current else [])]:
                os.close(fd)

    def _snapshot(self) -> tuple[list[tuple[int, tuple[int, int]]],
                                 tuple[int, tuple[int, int]] | None]:
        """The rotated files, oldest first, and the current one, each opened (fd, identity):
        names and files as they were at one moment, i.e. unchanged from before the files were
        opened until after (tried again while a rotation moves them, a few times at most)."""
        for attempt in range(_SNAPSHOT_TRIES):
            names = [*rotated_files(self.path), self.path]
            before = [_inode(path) for path in names]
            opened = [_open_with_id(path) for path in names]
            if [o[1] if o else None for o in opened] == before == \
                    [_inode(path) for path in names] and rotated_files(self.path) == names[:-1]:
                break
            if attempt < _SNAPSHOT_TRIES - 1:  # the last try's files are taken as they are
                for o in opened:
                    if o is not None:
                        os.close(o[0])
        rotated = [o for o in opened[:-1] if o is not None]
        return rotated, opened[-1]

    def close(self) -> None:
        self._close_current()
