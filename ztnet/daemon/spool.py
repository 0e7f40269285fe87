"""The flow spool: batches of flow records on disk until the controller acknowledges them.

In controller mode every flow record also goes to the controller (ReportFlows), at least
once. Records are grouped into batches (batcher.py); each batch is one file here, named by
its sequence number, and stays until the controller's FlowAck for that sequence arrives
(uploader.py), so records survive the controller being away and the daemon restarting:

    <state>/spool/00000001732612345678901.jsonl   one record per line (the flows.jsonl schema)
    <state>/spool/sequence                        no sequence at or above it was ever used

Writes are crash-safe (temporary file, fsync, rename, fsync of the directory): a batch is
there whole or not at all, and an interrupted write leaves only a dot-file, removed at the
next start. Sequences only grow, across restarts too. ``sequence`` reserves them in blocks
(one small write every 4096 batches instead of one per batch), so a restart may skip part
of a block: the controller needs sequences increasing, not contiguous. A fresh spool starts
at the current time in microseconds rather than at 1: if the spool directory is lost or
deleted (the controller resets a host's sequence only when it enrolls again), the host
still sends sequences above those the controller has stored from it, which it would
otherwise take for resends and drop.

The spool is bounded (``max_bytes``). When a new batch does not fit, the **oldest** batches
are deleted and their records counted as dropped (``stats()``, metric
``ztnet_flow_upload_dropped_total{reason="spool_full"}``, a log line at most every 10 s).
Oldest first: during a long outage the recent records are the ones an operator is most
likely to need, whereas keeping the oldest would stop recording anything new for the
controller; the dropped records remain in the local flow log (while its rotation keeps
them) and, for denied attempts, in the audit trail. The newest batch is always kept, even
alone above the bound. (A batch dropped while it was in flight may still be stored by the
controller; it is counted as dropped all the same: the count is an upper bound.)
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ztnet import logs
from ztnet.errors import ConfigError
from ztnet.fsutil import replace_atomic

SPOOL_DIR = "spool"
SEQUENCE_FILE = "sequence"
DEFAULT_MAX_BYTES = 64 << 20
_SUFFIX = ".jsonl"
_NAME = re.compile(r"^(\d{1,20})\.jsonl$")
_RESERVE = 4096  # sequences reserved per write of SEQUENCE_FILE
_DROP_LOG_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Batch:
    sequence: int
    records: tuple[bytes, ...]  # one JSON flow record each, without the newline


@dataclass(frozen=True, slots=True)
class SpoolStats:
    batches: int
    records: int
    bytes: int
    dropped_batches: int  # deleted unacknowledged to make room (since this process started)
    dropped_records: int


@dataclass(frozen=True, slots=True)
class _Entry:
    size: int
    records: int


class Spool:
    """The batch files of one spool directory and their index. Thread-safe: batches are
    added by the batcher's thread, read and removed by the uploader's."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        if max_bytes < 1:
            raise ConfigError(f"daemon: the flow spool needs a positive size, not {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # One writer at a time, so that sequences become visible in order: the uploader
        # sends what it sees, and a lower sequence appearing later would be dropped by
        # the controller as a resend.
        self._write_lock = threading.Lock()
        self._order: list[int] = []  # sorted sequences of the batches on disk
        self._entries: dict[int, _Entry] = {}
        self._bytes = self._records = 0
        self._dropped_batches = self._dropped_records = 0
        self._unlogged_batches = self._unlogged_records = 0
        self._last_drop_log = -math.inf
        self._listeners: list[Callable[[], None]] = []
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._load()
            reserved = self._read_reserved()
        except OSError as exc:
            raise ConfigError(f"daemon: cannot use the flow spool {directory}: "
                              f"{exc.strerror or exc}") from exc
        self._reserved = reserved
        self._next = max(reserved, self._order[-1] + 1 if self._order else 1)
        if not reserved:  # a fresh spool (or its sequence file was lost): see above
            self._next = max(self._next, int(clock() * 1e6))
        self._unlink(self._evict(0))  # a smaller bound than last time applies at once
        self._log_drops()

    # --- start-up -------------------------------------------------------------------------

    def _load(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # a write the daemon did not finish
                continue
            match = _NAME.match(path.name)
            if match is None:
                continue
            data = path.read_bytes()
            if not data:
                path.unlink(missing_ok=True)
                continue
            sequence = int(match.group(1))
            entry = self._entries[sequence] = _Entry(len(data), data.count(b"\n"))
            self._bytes += entry.size
            self._records += entry.records
        self._order = sorted(self._entries)

    def _read_reserved(self) -> int:
        try:
            text = (self.directory / SEQUENCE_FILE).read_text()
        except FileNotFoundError:
            return 0
        try:
            return int(text.strip())
        except ValueError:
            logs.event("flow spool sequence file corrupt", logging.WARNING,
                       path=str(self.directory / SEQUENCE_FILE))
            return 0

    # --- the writer's side ----------------------------------------------------------------

    def add(self, records: Sequence[bytes]) -> int:
        """Store one batch (crash-safe, fsync'd) and return its sequence; makes room by
        deleting the oldest batches first."""
        if not records:
            raise ValueError("spool: a batch needs at least one record")
        data = b"".join(record + b"\n" for record in records)
        with self._write_lock:
            sequence = self._next
            if sequence >= self._reserved:
                self._reserved = sequence + _RESERVE
                replace_atomic(self.directory / SEQUENCE_FILE, f"{self._reserved}\n".encode())
            self._next = sequence + 1  # even if the write fails: a sequence is never reused
            with self._lock:
                evicted = self._evict(len(data))
            self._unlink(evicted)
            replace_atomic(self._path(sequence), data)
            with self._lock:
                self._entries[sequence] = _Entry(len(data), len(records))
                self._order.append(sequence)  # the highest so far: the order stays sorted
                self._bytes += len(data)
                self._records += len(records)
        self._log_drops()
        for listener in self._listeners:
            listener()
        return sequence

    def _evict(self, incoming: int) -> list[int]:
        """Under the lock: take the oldest batches out of the index until ``incoming``
        more bytes fit; returns their sequences (the caller deletes the files)."""
        evicted = []
        while self._order and self._bytes + incoming > self.max_bytes:
            sequence = self._order.pop(0)
            entry = self._entries.pop(sequence)
            self._bytes -= entry.size
            self._records -= entry.records
            self._dropped_batches += 1
            self._dropped_records += entry.records
            self._unlogged_batches += 1
            self._unlogged_records += entry.records
            evicted.append(sequence)
        return evicted

    def _log_drops(self) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._unlogged_batches or now - self._last_drop_log < _DROP_LOG_SECONDS:
                return
            batches, records = self._unlogged_batches, self._unlogged_records
            self._unlogged_batches = self._unlogged_records = 0
            self._last_drop_log = now
            total = self._dropped_records
        logs.event("flow spool full: oldest records dropped", logging.WARNING,
                   batches=batches, records=records, dropped_total=total,
                   max_bytes=self.max_bytes)

    # --- the uploader's side --------------------------------------------------------------

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the writer's thread) after every batch added."""
        self._listeners.append(callback)

    def pending(self) -> list[int]:
        with self._lock:
            return list(self._order)

    def next_after(self, sequence: int) -> int | None:
        """The lowest sequence in the spool above ``sequence``."""
        with self._lock:
            index = bisect.bisect_right(self._order, sequence)
            return self._order[index] if index < len(self._order) else None

    def read(self, sequence: int) -> Batch | None:
        """The batch, or None if it is no longer in the spool (acknowledged or dropped)."""
        with self._lock:
            if sequence not in self._entries:
                return None
        try:
            data = self._path(sequence).read_bytes()
        except FileNotFoundError:  # dropped between the check and the read
            return None
        return Batch(sequence, tuple(data.split(b"\n")[:-1]))

    def remove(self, sequence: int) -> bool:
        """Delete an acknowledged batch; False if it was not (or no longer) there."""
        with self._lock:
            entry = self._entries.pop(sequence, None)
            if entry is None:
                return False
            del self._order[bisect.bisect_left(self._order, sequence)]
            self._bytes -= entry.size
            self._records -= entry.records
        self._unlink([sequence])
        return True

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(len(self._order), self._records, self._bytes,
                              self._dropped_batches, self._dropped_records)

    # --- files ----------------------------------------------------------------------------

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence:020d}{_SUFFIX}"

    def _unlink(self, sequences: list[int]) -> None:
        for sequence in sequences:
            self._path(sequence).unlink(missing_ok=True)
