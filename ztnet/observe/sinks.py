"""Where flow records go: sinks are addons behind one dispatcher.

A sink is any object with ``configure(cfg)``, ``on_flow(record)`` and
``close()`` (and optionally ``on_flows(records)``, which takes a whole batch
in one call, and ``flush()``, called after each batch). The ``Dispatcher``
takes records in two ways. ``submit_many`` never blocks its caller: a bounded queue
(of batches, bounded in records) feeds one worker thread, and a full queue drops
the records and counts them (``DispatcherStats.dropped``). ``deliver`` hands a batch
to the sinks in the caller's own thread, for a producer whose own backlog is bounded
and counted elsewhere: the kernel event reader, whose ring buffer holds what it
has not read yet. Handing each batch to another thread made the GIL change hands
at every batch, and under load each hand-off waited for the other thread to be
scheduled (docs/performance.md). The sinks are called by one thread at a time.
Every sink call runs in ``safecall`` so a failing sink is logged and counted,
never fatal to the pipeline or to the other sinks. Every sink of a batch gets the
same list object, so ``records.encode_lines`` encodes each record once for all sinks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ztnet.errors import ConfigError
from ztnet.observe.records import FlowRecord, encode_lines

log = logging.getLogger("ztnet.observe")

SinkConfig = Mapping[str, Any]
# Reasons a record never reached the sinks (DispatcherStats.dropped keys).
DROP_QUEUE_FULL = "queue_full"
DROP_CLOSED = "closed"
# files rotated away that the flow log's sync thread may hold open, waiting to fsync them
_RETIRED_AT_MOST = 8


class Sink(Protocol):
    def configure(self, cfg: SinkConfig) -> None:
        """Take the options this sink knows from ``cfg`` (ignore the rest);
        raise ConfigError on a bad value."""

    def on_flow(self, record: FlowRecord) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Flushable(Protocol):
    def flush(self) -> None: ...


@runtime_checkable
class BatchSink(Protocol):
    def on_flows(self, records: list[FlowRecord]) -> None: ...


def sink_name(sink: object) -> str:
    return str(getattr(sink, "name", type(sink).__name__))


_TRACEBACK_FRAMES = 3
_REPEAT_LOG_SECONDS = 60.0


class _SafeCaller:
    """mitmproxy's safecall: log a trimmed traceback and carry on. Repeats
    of a failure are logged at most once a minute per sink and hook, with
    a count."""

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}

    def __call__(self, sink: object, hook: str, fn: Callable[..., None], *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # a sink must never take the pipeline down
            name = sink_name(sink)
            self.errors[name] += 1
            now, key = time.monotonic(), f"{name}.{hook}"
            if now - self._last_log.get(key, -_REPEAT_LOG_SECONDS) >= _REPEAT_LOG_SECONDS:
                self._last_log[key] = now
                # the sink's frames only (not this one), the innermost few
                frames = traceback.format_list(
                    traceback.extract_tb(exc.__traceback__)[1:][-_TRACEBACK_FRAMES:])
                log.error("observe: sink %s failed in %s (%d errors so far): %s: %s\n%s",
                          name, hook, self.errors[name], type(exc).__name__, exc,
                          "".join(frames).rstrip())
            return False


@dataclass(frozen=True, slots=True)
class DispatcherStats:
    submitted: int                 # accepted into the queue
    delivered: int                 # handed to every sink (whether the sink coped or not)
    queued: int
    dropped: Mapping[str, int]     # reason -> records that reached no sink
    sink_errors: Mapping[str, int]  # sink name -> failed calls


class Dispatcher:
    """Fans records out to sinks on one worker thread.

    ``submit`` never blocks; ``deliver`` returns once the sinks have the batch;
    ``close`` delivers what is queued, then closes the sinks. ``wait_idle``
    returns once everything submitted so far has been delivered and flushed
    (for tests and orderly shutdown)."""

    def __init__(self, sinks: Iterable[Sink], *, queue_size: int = 65536,
                 batch_size: int = 4096) -> None:
        self.sinks = list(sinks)
        self._kinds: list[tuple[bool, bool]] | None = None
        self._queue: deque[list[FlowRecord] | None] = deque()  # batches; None: stop
        self._queue_size = queue_size  # in records
        self._queued = 0
        self._batch_size = batch_size  # records handed to the sinks at once, at most
        self._safecall = _SafeCaller()
        self._lock = threading.Lock()
        self._sinks_lock = threading.Lock()  # held while a thread calls the sinks
        self._idle = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._submitted = self._delivered = self._pending = 0
        self._dropped: Counter[str] = Counter()
        self._closed = False
        self._thread: threading.Thread | None = None

    def configure(self, cfg: SinkConfig) -> None:
        """Configure every sink; a ConfigError propagates (bad options are fatal)."""
        for sink in self.sinks:
            sink.configure(cfg)

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._run, name="ztnet-observe", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Dispatcher:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, record: FlowRecord) -> bool:
        """Queue ``record``; False (and counted) if it was dropped."""
        return self.submit_many((record,)) == 1

    def submit_many(self, records: Sequence[FlowRecord]) -> int:
        """Queue ``records`` in order under one lock; how many were accepted (the rest are
        dropped and counted). A producer that hands over a batch instead of one record at a
        time takes the lock once and wakes the worker once per batch."""
        with self._lock:
            if self._closed:
                self._dropped[DROP_CLOSED] += len(records)
                return 0
            room = self._queue_size - self._queued
            accepted = list(records) if len(records) <= room else list(records[:max(room, 0)])
            if len(accepted) < len(records):
                self._dropped[DROP_QUEUE_FULL] += len(records) - len(accepted)
            if accepted:
                self._queue.append(accepted)
                self._queued += len(accepted)
                self._submitted += len(accepted)
                self._pending += len(accepted)
                self._work.notify()
            return len(accepted)

    def deliver(self, records: list[FlowRecord]) -> int:
        """Hand ``records`` to every sink now, in this thread (waiting for a batch the
        worker is handing out meanwhile); how many (0 once closed, counted as dropped)."""
        with self._lock:
            if self._closed:
                self._dropped[DROP_CLOSED] += len(records)
                return 0
            self._submitted += len(records)
        if records:
            with self._sinks_lock:
                self._fan_out(records)
        with self._lock:
            self._delivered += len(records)
        return len(records)

    def stats(self) -> DispatcherStats:
        with self._lock:
            return DispatcherStats(self._submitted, self._delivered, self._queued,
                                   dict(self._dropped), dict(self._safecall.errors))

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.append(None)  # behind every queued batch; nothing can follow it
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("observe: dispatcher stuck, %d records not delivered", self._queued)
        if not self._sinks_lock.acquire(timeout=timeout):  # a deliver() stuck in a sink
            log.error("observe: a sink is stuck; the sinks are left open")
            return
        try:
            for sink in self.sinks:
                self._safecall(sink, "close", sink.close)
        finally:
            self._sinks_lock.release()

    def _take(self) -> tuple[list[FlowRecord], bool]:
        """The next batch (queued batches joined up to batch_size), and whether to stop."""
        with self._work:
            self._work.wait_for(lambda: bool(self._queue))
            first = self._queue.popleft()
            if first is None:
                return [], True
            batch = first  # submit_many's own copy: extending it is safe
            while (following := self._queue[0] if self._queue else None) is not None \
                    and len(batch) + len(following) <= self._batch_size:
                batch.extend(following)
                self._queue.popleft()
            self._queued -= len(batch)
            return batch, False

    def _run(self) -> None:
        while True:
            batch, stop = self._take()
            if batch:
                with self._sinks_lock:
                    self._fan_out(batch)
                with self._idle:
                    self._delivered += len(batch)
                    self._pending -= len(batch)
                    self._idle.notify_all()
            if stop:
                return

    def _fan_out(self, batch: list[FlowRecord]) -> None:
        if self._kinds is None:  # Protocol isinstance checks are slow: once per sink
            self._kinds = [(isinstance(s, BatchSink), isinstance(s, Flushable))
                           for s in self.sinks]
        safecall = self._safecall
        for sink, (batched, _) in zip(self.sinks, self._kinds, strict=True):
            if batched:
                safecall(sink, "on_flows", sink.on_flows, batch)  # type: ignore[attr-defined]
            else:
                on_flow = sink.on_flow
                for record in batch:
                    safecall(sink, "on_flow", on_flow, record)
        for sink, (_, flushable) in zip(self.sinks, self._kinds, strict=True):
            if flushable:
                safecall(sink, "flush", sink.flush)  # type: ignore[attr-defined]


class JsonlSink:
    """Flow records as JSON lines, size-bounded like logging's
    RotatingFileHandler: ``flows.jsonl`` is current; when the next line
    would take it past ``max_bytes`` it becomes ``flows.jsonl.1`` (older
    files shift up, the one beyond ``backups`` is deleted). At most
    ``(backups + 1) * max_bytes`` bytes are kept (a single longer line gets a
    file of its own). ``backups=0`` starts a new file, dropping the old.

    Durability: lines are written to the OS after each dispatcher batch
    (``flush``). Every ``fsync_interval`` seconds (default 1) a thread of the
    sink's own fsyncs what was written, and a file rotated away since is
    fsynced there before it is closed, so the thread writing the records (the
    kernel event reader) never waits for the disk: an fsync took 20-30 ms a
    second at 50,000 records a second, time in which the kernel's ring only
    fills. ``fsync_interval=0`` fsyncs in ``flush``, after every batch, and
    before each rotation. ``close`` fsyncs what is left. A crash of the daemon
    loses nothing that was flushed; a power loss at most the last interval.
    Files are created mode 0640."""

    name = "jsonl"

    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, backups: int = 5,
                 fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups, self.fsync_interval = 0, 0, 0.0
        self.configure({"max_bytes": max_bytes, "backups": backups,
                        "fsync_interval": fsync_interval})
        self._fd = -1
        self._size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        # shared with the sync thread: the current file's fd and whether it has unsynced
        # writes, and the fds of files rotated away, to fsync and close
        self._sync_lock = threading.Lock()
        self._dirty = False
        self._retired: list[int] = []
        self._closing = threading.Event()
        self._open()
        self._syncer = threading.Thread(target=self._sync_every_interval,
                                        name="ztnet-flowlog-sync", daemon=True)
        self._syncer.start()

    def configure(self, cfg: SinkConfig) -> None:
        max_bytes = cfg.get("max_bytes", self.max_bytes)
        backups = cfg.get("backups", self.backups)
        interval = cfg.get("fsync_interval", self.fsync_interval)
        if not isinstance(max_bytes, int) or max_bytes < 1024:
            raise ConfigError(f"observe: jsonl max_bytes must be at least 1024, not {max_bytes!r}")
        if not isinstance(backups, int) or not 0 <= backups <= 1000:
            raise ConfigError(f"observe: jsonl backups must be 0..1000, not {backups!r}")
        if not isinstance(interval, int | float) or interval < 0:
            raise ConfigError(f"observe: jsonl fsync_interval must be >= 0, not {interval!r}")
        self.max_bytes, self.backups, self.fsync_interval = max_bytes, backups, float(interval)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o640)
        os.fchmod(self._fd, 0o640)  # whatever the umask
        self._size = os.fstat(self._fd).st_size

    def on_flow(self, record: FlowRecord) -> None:
        self.on_flows([record])

    def on_flows(self, records: list[FlowRecord]) -> None:
        lines = encode_lines(records)
        data = b"\n".join([*lines, b""])  # one copy: the lines, each with its newline
        if self._size + self._buffered + len(data) <= self.max_bytes:
            self._buffer.append(data)
            self._buffered += len(data)
            return
        for line in lines:  # this batch crosses the bound: rotate at the right line
            self._add_line(line + b"\n")

    def _add_line(self, line: bytes) -> None:
        if self._size + self._buffered + len(line) > self.max_bytes \
                and self._size + self._buffered > 0:
            self._write_out()
            self._rotate()
        self._buffer.append(line)
        self._buffered += len(line)

    def _write_out(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)
        with self._sync_lock:
            self._dirty = True

    def _rotate(self) -> None:
        with self._sync_lock:
            if self.fsync_interval and len(self._retired) < _RETIRED_AT_MOST:
                self._retired.append(self._fd)  # the sync thread fsyncs it, then closes it
            else:  # a tiny max_bytes must not hold an fd per rotation for a whole interval
                os.fsync(self._fd)
                os.close(self._fd)
            self._fd, self._dirty = -1, False
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self.rotated(self.backups).unlink(missing_ok=True)
            for n in range(self.backups - 1, 0, -1):
                if self.rotated(n).exists():
                    os.replace(self.rotated(n), self.rotated(n + 1))
            os.replace(self.path, self.rotated(1))
        with self._sync_lock:
            self._open()

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def flush(self) -> None:
        self._write_out()
        if self.fsync_interval == 0:
            self._sync()

    def _sync_every_interval(self) -> None:
        while not self._closing.wait(self.fsync_interval or 1.0):
            if self.fsync_interval:
                try:
                    self._sync()
                except OSError as exc:  # e.g. EIO: say so, keep the thread for the next one
                    log.error("observe: fsync of %s failed: %s", self.path, exc)

    def _sync(self) -> None:
        """fsync the files rotated away (then close them) and the current file if it has
        unsynced writes; the disk is waited for outside the lock, on a duplicate of the
        current fd, so the writer can go on writing and even rotate meanwhile."""
        with self._sync_lock:
            retired, self._retired = self._retired, []
            current = os.dup(self._fd) if self._dirty and self._fd >= 0 else -1
            self._dirty = False
        failed: OSError | None = None
        for fd in [*retired, current]:
            if fd < 0:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:  # still close this one and sync the others
                failed = failed or exc
            finally:
                os.close(fd)
        if failed is not None:
            raise failed

    def close(self) -> None:
        if self._fd < 0:
            return
        self._closing.set()
        self._syncer.join()
        try:
            self._write_out()
            with self._sync_lock:
                self._dirty = True  # whatever the sync thread left
            self._sync()
        finally:
            os.close(self._fd)
            self._fd = -1
