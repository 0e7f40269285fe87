"""The controller-upload sink: flow records into spool batches.

The dispatcher's worker thread calls ``on_flow``, which only encodes the record and appends
it to the open batch; it never waits. The batch closes when it holds ``batch_records``
records or ``batch_bytes`` bytes, or when its first record has waited ``batch_delay``
seconds (so a lone record is on its way within 200 ms, not when 499 others have joined it).
A thread of its own ("ztnet-spool") writes closed batches to the spool, one fsync each, in
order (only this thread writes, so sequences reach the spool in order).

A disk that is slow to fsync (other I/O on the host) must not slow down the flow log, the
metrics and the audit trail, which share the dispatcher's thread. So the writer commits in
groups: the batches that closed while it was writing become one spool batch (up to
``MERGE_BYTES``, well under the controller's 4 MiB message limit), one fsync for all of
them, and the slower the disk, the larger the groups. If still more than ``backlog`` closed
batches wait, the oldest of them is dropped and its records counted (``backlog_records``,
metric reason ``write_backlog``): as for a full spool, the newest records are kept. A batch
the spool cannot store (disk full, I/O error) is logged and its records counted
(``lost_records``, reason ``write_failed``): retrying could wedge the writer on a disk that
stays full.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque

from ztnet import logs
from ztnet.daemon.spool import Spool
from ztnet.errors import ConfigError
from ztnet.observe.records import FlowRecord, encode_lines
from ztnet.observe.sinks import SinkConfig

JOIN_TIMEOUT = 30.0
MERGE_BYTES = 2 << 20  # the largest group commit
_LOG_SECONDS = 10.0


class _Batch:
    __slots__ = ("records", "size")

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.size = 0  # bytes in the spool: each record and its newline


class SpoolSink:
    name = "spool"

    def __init__(self, spool: Spool, *, batch_records: int = 500, batch_bytes: int = 1 << 20,
                 batch_delay: float = 0.2, backlog: int = 16) -> None:
        self.spool = spool
        self.batch_records, self.batch_bytes, self.batch_delay = 0, 0, 0.0
        self.configure({"batch_records": batch_records, "batch_bytes": batch_bytes,
                        "batch_delay": batch_delay})
        self.backlog = backlog
        self.lost_records = 0     # the spool refused them (or the sink was closed)
        self.backlog_records = 0  # dropped while the writer was too far behind
        self._cond = threading.Condition()
        self._open = _Batch()
        self._opened_at = 0.0
        self._closed: deque[_Batch] = deque()  # waiting for the writer, oldest first
        self._stopping = False
        self._last_backlog_log = -math.inf
        self._thread = threading.Thread(target=self._run, name="ztnet-spool", daemon=True)
        self._thread.start()

    def configure(self, cfg: SinkConfig) -> None:
        records = cfg.get("batch_records", self.batch_records)
        size = cfg.get("batch_bytes", self.batch_bytes)
        delay = cfg.get("batch_delay", self.batch_delay)
        if not isinstance(records, int) or records < 1:
            raise ConfigError(f"daemon: batch_records must be at least 1, not {records!r}")
        if not isinstance(size, int) or not 1024 <= size <= MERGE_BYTES:
            raise ConfigError(f"daemon: batch_bytes must be 1024..{MERGE_BYTES}, not {size!r}")
        if not isinstance(delay, int | float) or delay <= 0:
            raise ConfigError(f"daemon: batch_delay must be positive, not {delay!r}")
        self.batch_records, self.batch_bytes, self.batch_delay = records, size, float(delay)

    # --- the dispatcher's thread ----------------------------------------------------------

    def on_flow(self, record: FlowRecord) -> None:
        self.on_flows([record])

    def on_flows(self, records: list[FlowRecord]) -> None:
        lines = encode_lines(records)  # the flow log's lines: encoded once for both
        with self._cond:
            if self._stopping:  # closed: no writer any more (the dispatcher never does this)
                self.lost_records += len(lines)
                return
            for line in lines:
                batch = self._open
                if not batch.records:
                    self._opened_at = time.monotonic()
                    self._cond.notify_all()  # starts the delay timer
                batch.records.append(line)
                batch.size += len(line) + 1
                if len(batch.records) >= self.batch_records or batch.size >= self.batch_bytes:
                    self._close_open()
                    if len(self._closed) > self.backlog:
                        self._drop_oldest()

    def close(self) -> None:
        """Write what is left (the open batch too) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(JOIN_TIMEOUT)
        if self._thread.is_alive():
            logs.event("flow spool writer stuck", logging.ERROR,
                       batches_not_written=len(self._closed))

    def _close_open(self) -> None:
        self._closed.append(self._open)
        self._open = _Batch()
        self._cond.notify_all()

    def _drop_oldest(self) -> None:
        dropped = len(self._closed.popleft().records)
        self.backlog_records += dropped
        now = time.monotonic()
        if now - self._last_backlog_log >= _LOG_SECONDS:
            self._last_backlog_log = now
            logs.event("flow spool writer behind: oldest records dropped", logging.WARNING,
                       records=dropped, dropped_total=self.backlog_records)

    # --- the writer thread ----------------------------------------------------------------

    def _next_group(self) -> list[bytes] | None:
        """The closed batches waiting, as one (up to MERGE_BYTES); None once stopped."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._open.records and (self._stopping
                                           or now - self._opened_at >= self.batch_delay):
                    self._close_open()
                if self._closed:
                    group = self._closed.popleft()
                    while self._closed and group.size + self._closed[0].size <= MERGE_BYTES:
                        more = self._closed.popleft()
                        group.records += more.records
                        group.size += more.size
                    return group.records
                if self._stopping:
                    return None
                self._cond.wait(self._opened_at + self.batch_delay - now
                                if self._open.records else None)

    def _run(self) -> None:
        while (records := self._next_group()) is not None:
            try:
                self.spool.add(records)
            except Exception as exc:  # disk full, I/O error: count, never stop recording
                with self._cond:
                    self.lost_records += len(records)
                logs.event("flow spool write failed", logging.ERROR, records=len(records),
                           lost_total=self.lost_records, reason=repr(exc))
