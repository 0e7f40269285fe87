"""Replicas over one PostgreSQL: how a change made through one replica reaches the
hosts connected to every other (docs/controller.md, "Running several replicas").

Each change that starts a version NOTIFYs ``ztnet_changes`` in its own transaction
(ztnet.controller.pgstore), so the notification arrives after the commit. Every
replica keeps one extra connection LISTENing on that channel, in a thread of its own
(``ChangeListener``); a notification wakes the publisher's ``follow()``, which reads
the store's snapshot and pushes the new epoch to this replica's hosts. Notifications
can be lost (a dropped connection, a replica restarting), so the listener also wakes
the publisher every ``POLL_INTERVAL`` seconds, and once after each reconnection.

Each replica also anchors its audit trail's head (ztnet.observe.audit: the last seq and
hash) in the database's ``audit_heads`` every ``POLL_INTERVAL`` when it moved, so a
replica's log cut short or rewritten on its own host shows against a copy it cannot
reach (`ztnet audit verify --head SEQ:HASH`).

The same connection is the replica's view of the database's health: when it fails,
the store is marked unavailable (every RPC is then UNAVAILABLE at once, health says
NOT_SERVING) and the listener reconnects every ``RETRY_INTERVAL`` until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import psycopg

from ztnet import logs
from ztnet.controller.pgschema import CHANNEL
from ztnet.controller.pgstore import CONNECT_TIMEOUT, PgStore
from ztnet.controller.publisher import Publisher
from ztnet.observe.audit import AuditLog

POLL_INTERVAL = 2.0
RETRY_INTERVAL = 1.0
_TICK = 0.25  # how often the listening thread looks at its stop flag


class ChangeListener:
    def __init__(self, store: PgStore, wake: Callable[[], object], *,
                 poll: float = POLL_INTERVAL, retry: float = RETRY_INTERVAL) -> None:
        self.store = store
        self.wake = wake
        self.poll = poll
        self.retry = retry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ztnet-db-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except psycopg.Error as exc:
                self.store.set_available(False, str(exc).strip().splitlines()[0]
                                         if str(exc).strip() else type(exc).__name__)
            except Exception as exc:  # never let the thread die quietly
                logs.event("database listener failed", logging.ERROR, error=repr(exc))
            self._stop.wait(self.retry)

    def _listen(self) -> None:
        with psycopg.connect(self.store.url, autocommit=True,
                             connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute(f"LISTEN {CHANNEL}".encode())
            self.store.set_available(True)
            self.wake()  # whatever changed while we were not listening
            last = time.monotonic()
            while not self._stop.is_set():
                notified = any(True for _ in conn.notifies(timeout=_TICK, stop_after=1))
                if notified or time.monotonic() - last >= self.poll:
                    if not notified:
                        conn.execute("SELECT 1")  # is the database still there?
                    self.wake()
                    last = time.monotonic()


async def follow_changes(publisher: Publisher, wake: asyncio.Event) -> None:
    """The publisher's side: each wake-up, catch up with the database."""
    while True:
        await wake.wait()
        wake.clear()
        try:
            await publisher.follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database went away, a policy we cannot parse …
            logs.event("following the database failed", logging.WARNING, error=repr(exc))


async def anchor_audit(store: PgStore, audit: AuditLog, replica: str,
                       clock: Callable[[], float], interval: float = POLL_INTERVAL) -> None:
    """Copy the audit trail's head into the database whenever it moved."""
    anchored = (-1, "")
    while True:
        head = audit.head
        if (head.seq, head.hash) != anchored and store.available:
            try:
                store.record_audit_head(replica, head.seq, head.hash, clock())
                anchored = (head.seq, head.hash)
            except Exception as exc:  # the database went away: next time
                logs.event("anchoring the audit head failed", logging.DEBUG, error=repr(exc))
        await asyncio.sleep(interval)
