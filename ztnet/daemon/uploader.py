"""Flow records to the controller: ReportFlows, at least once, from the spool.

One thread ("ztnet-upload") keeps a ReportFlows stream open over a mutual-TLS connection of
its own (channel.py, the host's credentials). Not the grant stream's connection: a backlog
of flow records must never delay a grant push (a revocation waits for no flow record). It
sends the spool's batches in sequence order, at most ``window`` unacknowledged at a time (a
backlog drains at the link's pace without reading the whole spool into memory), and
deletes a batch file only when the controller's FlowAck for its sequence arrives. When the
stream ends (the controller went away, restarted, failed) it reconnects with the same
backoff as the grant stream and starts again at the oldest batch still in the spool, as a
restarted daemon does. A batch whose ack was lost is sent again: delivery is at least once,
and the controller drops duplicates (sequences it has stored, record uuids).

The stream is recycled at once when the host certificate was renewed (the next connection
presents the new one), and when the oldest batch in flight has waited ``ack_timeout`` for
its ack (a controller that accepts and never answers).

``FlowUpload`` assembles the controller mode's flow export for the daemon's pipeline:
SpoolSink (batcher.py) → Spool (spool.py) → FlowUploader, and their metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ztnet import logs
from ztnet.daemon.backoff import Backoff
from ztnet.daemon.batcher import SpoolSink
from ztnet.daemon.channel import CallScope, Replicas, controller_channel, describe, wait_ready
from ztnet.daemon.client import CONNECT_TIMEOUT
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.spool import DEFAULT_MAX_BYTES, SPOOL_DIR, Spool
from ztnet.v1 import node_pb2, node_pb2_grpc

WINDOW = 8
ACK_TIMEOUT = 30.0
HEALTHY_AFTER = 10.0  # a stream up this long resets the backoff, acked or not
_RECHECK = 1.0  # how often a waiting sender looks at the certificate and the ack timer
RENEWED = "the host certificate was renewed"


class _Session(CallScope):
    """One ReportFlows stream and the batches in flight on it (sequence → (records, sent
    at)); guarded by the uploader's condition."""

    def __init__(self, cert_pem: bytes) -> None:
        super().__init__()
        self.cert_pem = cert_pem
        self.inflight: dict[int, tuple[int, float]] = {}
        self.acked = 0
        self.reason = ""


@dataclass(frozen=True, slots=True)
class UploadStats:
    connected: bool
    batches: int  # acknowledged by the controller, since this process started
    records: int
    refused: int  # records of batches the controller refused (INVALID_ARGUMENT)


class FlowUploader:
    def __init__(self, spool: Spool, credentials: HostCredentials, address: str, *,
                 backoff_cap: float = 30.0, window: int = WINDOW,
                 ack_timeout: float = ACK_TIMEOUT) -> None:
        self.spool = spool
        self.credentials = credentials
        self.replicas = Replicas(address)
        self.backoff = Backoff(cap=backoff_cap)
        self.window = window
        self.ack_timeout = ack_timeout
        self._cond = threading.Condition()
        self._session: _Session | None = None
        self._connected = False
        self._batches = self._records = self._refused_records = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ztnet-upload", daemon=True)
        spool.listen(self._wake)

    def start(self) -> FlowUploader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            session = self._session
        if session is not None:
            self._end(session, "the daemon is stopping")
        self._thread.join(timeout=5)

    def stats(self) -> UploadStats:
        with self._cond:
            return UploadStats(self._connected, self._batches, self._records,
                               self._refused_records)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _end(self, session: _Session, reason: str) -> None:
        with self._cond:
            session.reason = session.reason or reason  # before the cancel is seen
        session.close()
        with self._cond:
            self._cond.notify_all()  # a sender waiting for a batch sees the stream is over

    # --- the upload thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                session = self._stream_once()
            except Exception as exc:  # a bug here must not end uploading for good
                logs.event("flow upload failed", logging.ERROR, error=repr(exc))
                session = None
            if self._stopping.is_set():
                return
            if session is not None and session.reason == RENEWED:
                continue  # present the new certificate now
            if (session is not None and session.acked) \
                    or time.monotonic() - started >= HEALTHY_AFTER:
                self.backoff.reset()
            self._stopping.wait(self.backoff.next_delay())

    def _stream_once(self) -> _Session | None:
        """One connection and its stream until either ends."""
        session = _Session(self.credentials.cert_pem)
        with self._cond:
            if self._stopping.is_set():
                return None
            self._session = session
        address = self.replicas.current
        channel = controller_channel(address, self.credentials.ca_pem,
                                     self.credentials.identity.server_name,
                                     key_pem=self.credentials.key_pem, cert_pem=session.cert_pem)
        try:
            # an unreachable controller is logged by the grant stream, not twice
            if wait_ready(channel, session,
                          self.replicas.connect_timeout(CONNECT_TIMEOUT)) != "ready":
                return session
            call = node_pb2_grpc.NodeServiceStub(channel).ReportFlows(self._requests(session))
            if not session.attach(call.cancel):
                return session
            with self._cond:
                self._connected = True
            logs.event("flow upload connected", controller=address,
                       pending_batches=len(self.spool.pending()))
            try:
                for ack in call:
                    self._acked(session, ack.sequence)
                reason = "stream ended by the controller"
            except grpc.RpcError as exc:
                reason = session.reason or describe(exc)
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._refused(session, reason)
            if not self._stopping.is_set():
                logs.event("flow upload disconnected", logging.WARNING, controller=address,
                           reason=reason, batches_acked=session.acked)
            return session
        finally:
            with self._cond:
                self._connected = False
                if self._session is session:
                    self._session = None
            self._end(session, "stream over")
            channel.close()
            self.replicas.advance()

    def _acked(self, session: _Session, sequence: int) -> None:
        with self._cond:
            sent = session.inflight.pop(sequence, None)
            if sent is None:
                return  # not in flight on this stream: nothing to release
            session.acked += 1
            self._batches += 1
            self._records += sent[0]
            self._cond.notify_all()  # room in the window
        self.spool.remove(sequence)

    def _refused(self, session: _Session, reason: str) -> None:
        """The controller refused a batch (a record it cannot store): the oldest in
        flight, as it handles batches in order. Sending it again would be refused again
        and hold up every later batch, so it is dropped and counted."""
        with self._cond:
            if not session.inflight:
                return
            sequence = min(session.inflight)
            records = session.inflight.pop(sequence)[0]
            self._refused_records += records
        self.spool.remove(sequence)
        logs.event("flow batch refused by the controller", logging.ERROR, sequence=sequence,
                   records=records, reason=reason)

    # --- gRPC's sending thread ------------------------------------------------------------

    def _requests(self, session: _Session) -> Iterator[node_pb2.FlowBatch]:
        last = 0
        while (sequence := self._next_to_send(session, last)) is not None:
            last = sequence
            batch = self.spool.read(sequence)
            if batch is None:
                continue  # dropped from the spool (it was full) since it was listed
            with self._cond:
                session.inflight[sequence] = (len(batch.records), time.monotonic())
            yield node_pb2.FlowBatch(sequence=sequence, records=batch.records)

    def _next_to_send(self, session: _Session, last: int) -> int | None:
        """Wait for a batch after ``last`` and room in the window; None once the stream
        is over (or must be recycled)."""
        problem = ""
        with self._cond:
            while not session.closed and not problem:
                if len(session.inflight) < self.window:
                    sequence = self.spool.next_after(last)
                    if sequence is not None:
                        return sequence
                problem = self._problem(session)
                if not problem:
                    self._cond.wait(_RECHECK)
        if problem:
            self._end(session, problem)
        return None

    def _problem(self, session: _Session) -> str:
        if self.credentials.cert_pem != session.cert_pem:
            return RENEWED
        oldest = min((sent for _, sent in session.inflight.values()), default=None)
        if oldest is not None and time.monotonic() - oldest > self.ack_timeout:
            return f"no acknowledgement within {self.ack_timeout:g} s"
        return ""


class _Collector(Collector):
    def __init__(self, spool: Spool, sink: SpoolSink, uploader: FlowUploader) -> None:
        self.spool, self.sink, self.uploader = spool, sink, uploader

    def collect(self) -> Iterator[Any]:
        spool, upload = self.spool.stats(), self.uploader.stats()
        yield GaugeMetricFamily("ztnet_flow_spool_bytes", "Bytes of flow-record batches in "
                                "the spool, not yet acknowledged by the controller.",
                                value=spool.bytes)
        yield GaugeMetricFamily("ztnet_flow_spool_batches", "Batches in the spool, not yet "
                                "acknowledged by the controller.", value=spool.batches)
        yield GaugeMetricFamily("ztnet_flow_spool_records", "Flow records in the spool, not "
                                "yet acknowledged by the controller.", value=spool.records)
        yield CounterMetricFamily("ztnet_flow_upload_records", "Flow records the controller "
                                  "acknowledged.", value=upload.records)
        dropped = CounterMetricFamily("ztnet_flow_upload_dropped", "Flow records that will "
                                      "never reach the controller, by reason (spool_full: "
                                      "deleted unacknowledged to make room; write_backlog: "
                                      "the spool's writer was too far behind; write_failed: "
                                      "could not be spooled; refused: in a batch the "
                                      "controller refused).", labels=["reason"])
        dropped.add_metric(["spool_full"], spool.dropped_records)
        dropped.add_metric(["write_backlog"], self.sink.backlog_records)
        dropped.add_metric(["write_failed"], self.sink.lost_records)
        dropped.add_metric(["refused"], upload.refused)
        yield dropped
        yield GaugeMetricFamily("ztnet_flow_upload_connected", "1 while the ReportFlows "
                                "stream to the controller is open.", value=int(upload.connected))


@dataclass(frozen=True, slots=True)
class UploadSettings:
    address: str
    credentials: HostCredentials
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    backoff_cap: float = 30.0


class FlowUpload:
    """The controller mode's flow export: ``sink`` (add it to the dispatcher) → spool
    (``<state>/spool``) → uploader thread, started at once."""

    def __init__(self, state: Path, settings: UploadSettings,
                 registry: CollectorRegistry) -> None:
        self.spool = Spool(state / SPOOL_DIR, max_bytes=settings.spool_max_bytes)
        self.sink = SpoolSink(self.spool)
        self.uploader = FlowUploader(self.spool, settings.credentials, settings.address,
                                     backoff_cap=settings.backoff_cap)
        registry.register(_Collector(self.spool, self.sink, self.uploader))
        self.uploader.start()

    def stop(self) -> None:
        """Stop uploading; the dispatcher closes the sink (which spools what is left)."""
        self.uploader.stop()
