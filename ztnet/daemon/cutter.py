"""Destroy the sockets whose flows a byte budget cut (docs/policy.md, "Byte budgets").

The kernel drops every packet of such a flow already and refuses its datagrams; destroying
the socket (SOCK_DESTROY through inet_diag, as `ss -K`) makes the holder see an error at
once (ECONNABORTED on its next call) rather than retransmitting into the void. The kernel
marks those records (``KernelEvent.cut``); this thread acts on them off the flow pipeline's
thread, at most ``QUEUE`` waiting: a flood of cut flows costs the pipeline nothing, and a cut
the queue cannot take is counted and its flow stays dropped (it is never unblocked).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
from contextlib import suppress

from ztnet import logs
from ztnet.datapath import sockets
from ztnet.datapath.events import KernelEvent
from ztnet.grants.model import IPAddress
from ztnet.instance import Instance

QUEUE = 256
_Cut = tuple[int, tuple[IPAddress, int], tuple[IPAddress, int]]


class BudgetCutter:
    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.destroyed = 0
        self.not_found = 0
        self.overflow = 0
        self._queue: queue.Queue[_Cut | None] = queue.Queue(QUEUE)
        self._thread = threading.Thread(target=self._run, name="ztnet-budget-cuts", daemon=True)
        self._thread.start()

    def submit(self, event: KernelEvent) -> None:
        """Queue the socket of a cut record (one without a source: nothing to destroy)."""
        if not event.cut or not event.source or not event.source_port:
            return
        cut = (event.proto, (ipaddress.ip_address(event.source), event.source_port),
               (ipaddress.ip_address(event.destination), event.destination_port))
        try:
            self._queue.put_nowait(cut)
        except queue.Full:
            self.overflow += 1

    def _run(self) -> None:
        while (cut := self._queue.get()) is not None:
            proto, local, remote = cut
            try:
                destroyed = sockets.destroy_matching(self.instance, proto, local, remote)
            except Exception as exc:  # a cut that failed leaves the flow dropped, never open
                logs.event("budget cut failed", logging.WARNING, reason=repr(exc))
                continue
            if destroyed:
                self.destroyed += len(destroyed)
            else:  # closed by its holder in the meantime, or unconnected UDP
                self.not_found += 1
            logs.event("budget cut", logging.INFO, proto=proto,
                       local=f"{local[0]}:{local[1]}", remote=f"{remote[0]}:{remote[1]}",
                       destroyed=len(destroyed))

    def close(self) -> None:
        with suppress(queue.Full):  # full: the thread works the queue off and stays parked
            self._queue.put_nowait(None)
        self._thread.join(timeout=5)
