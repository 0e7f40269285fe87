"""The controller-upload sink: flow records into spool batches.

The dispatcher's worker thread calls ``on_flow``, which only encodes the record and appends
it to the open batch. A thread of its own ("ztnet-spool") closes the batch when it holds
``batch_records`` records or ``batch_bytes`` bytes, or when its first record has waited
``batch_delay`` seconds (so a lone record is on its way within 200 ms, not when 499 others
have joined it), and writes it to the spool: one fsync per batch, never on the dispatcher's
thread. Only this thread writes, so sequences reach the spool in order.

If writing falls more than ``backlog`` closed batches behind (a stalled disk), ``on_flow``
waits for it: the dispatcher's bounded queue absorbs the burst, and what it cannot hold is
dropped there and counted (``queue_full``). The ring-buffer reader never waits. A batch the
spool cannot store (disk full, I/O error) is logged and its records counted as lost
(``lost_records``): retrying could wedge the pipeline on a disk that stays full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ztnet.daemon import logs
from ztnet.daemon.spool import Spool
from ztnet.errors import ConfigError
from ztnet.observe.records import FlowRecord, to_json
from ztnet.observe.sinks import SinkConfig

JOIN_TIMEOUT = 30.0


class SpoolSink:
    name = "spool"

    def __init__(self, spool: Spool, *, batch_records: int = 500, batch_bytes: int = 1 << 20,
                 batch_delay: float = 0.2, backlog: int = 4) -> None:
        self.spool = spool
        self.batch_records, self.batch_bytes, self.batch_delay = 0, 0, 0.0
        self.configure({"batch_records": batch_records, "batch_bytes": batch_bytes,
                        "batch_delay": batch_delay})
        self.backlog = backlog
        self.lost_records = 0
        self._cond = threading.Condition()
        self._open: list[bytes] = []
        self._open_bytes = 0
        self._opened_at = 0.0
        self._closed: deque[list[bytes]] = deque()  # the head is being written
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ztnet-spool", daemon=True)
        self._thread.start()

    def configure(self, cfg: SinkConfig) -> None:
        records = cfg.get("batch_records", self.batch_records)
        size = cfg.get("batch_bytes", self.batch_bytes)
        delay = cfg.get("batch_delay", self.batch_delay)
        if not isinstance(records, int) or records < 1:
            raise ConfigError(f"daemon: batch_records must be at least 1, not {records!r}")
        # the controller accepts messages up to 4 MiB
        if not isinstance(size, int) or not 1024 <= size <= 2 << 20:
            raise ConfigError(f"daemon: batch_bytes must be 1024..2097152, not {size!r}")
        if not isinstance(delay, int | float) or delay <= 0:
            raise ConfigError(f"daemon: batch_delay must be positive, not {delay!r}")
        self.batch_records, self.batch_bytes, self.batch_delay = records, size, float(delay)

    # --- the dispatcher's thread ----------------------------------------------------------

    def on_flow(self, record: FlowRecord) -> None:
        line = to_json(record).encode()
        with self._cond:
            if self._stopping:  # closed: no writer any more (the dispatcher never does this)
                self.lost_records += 1
                return
            if not self._open:
                self._opened_at = time.monotonic()
                self._cond.notify_all()  # starts the delay timer
            self._open.append(line)
            self._open_bytes += len(line) + 1
            if len(self._open) >= self.batch_records or self._open_bytes >= self.batch_bytes:
                self._close_open()
                while len(self._closed) > self.backlog and self._thread.is_alive():
                    self._cond.wait(1.0)

    def close(self) -> None:
        """Write what is left (the open batch too) and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(JOIN_TIMEOUT)
        if self._thread.is_alive():
            logs.event("flow spool writer stuck", logging.ERROR,
                       batches_not_written=len(self._closed))

    # --- the writer thread ----------------------------------------------------------------

    def _close_open(self) -> None:
        self._closed.append(self._open)
        self._open, self._open_bytes = [], 0
        self._cond.notify_all()

    def _next_batch(self) -> list[bytes] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._open and (self._stopping
                                   or now - self._opened_at >= self.batch_delay):
                    self._close_open()
                if self._closed:
                    return self._closed[0]
                if self._stopping:
                    return None
                self._cond.wait(self._opened_at + self.batch_delay - now if self._open
                                else None)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.spool.add(batch)
            except Exception as exc:  # disk full, I/O error: count, never stop recording
                self.lost_records += len(batch)
                logs.event("flow spool write failed", logging.ERROR, records=len(batch),
                           lost_total=self.lost_records, reason=repr(exc))
            with self._cond:
                self._closed.popleft()
                self._cond.notify_all()
