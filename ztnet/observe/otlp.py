"""Flow records to an OpenTelemetry collector: one OTLP log record each, over gRPC.

``OtlpExporter`` is a flow sink (``configure``/``on_flow``/``close``, and ``submit_many`` for
callers holding a batch). The caller's thread only appends the record to a bounded queue: the
daemon's dispatcher and the controller's ingest never wait for the collector, never encode
for it, and a full queue drops the *newest* record and counts it (``queue_full``), as the
SDK's own batch processor does. A thread of its own ("ztnet-otlp") takes up to
``batch_size`` records at a time (or what is there after ``delay`` seconds), turns each into
an SDK ``ReadableLogRecord`` (resource: ``service.name``, ``host.name``, ``process.pid``;
scope ``ztnet.flows``), and hands the batch to the SDK's ``OTLPLogExporter``, which retries
transient gRPC errors (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED …) with
exponential backoff within its ``timeout``. A batch that still fails is tried again up to
``attempts`` times in all, then dropped and counted (``export_failed``). While the
collector is away, the queue fills and the overflow is counted; nothing else slows down.

Attributes follow OpenTelemetry's semantic conventions where they have the field
(``network.*``, ``source.*``, ``destination.*``, ``process.*``, ``thread.id``, ``user.id``,
``log.record.uid``) and use ``ztnet.*`` for the rest; docs/flows.md lists them all.
Counters are read at scrape time from ``stats()`` (``OtlpCollector``), so the hot path
touches no Prometheus object.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.context import set_value
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ztnet import logs
from ztnet.errors import ConfigError
from ztnet.observe.records import EventType, FlowRecord, Verdict
from ztnet.observe.sinks import SinkConfig

__all__ = ["DROP_CLOSED", "DROP_EXPORT_FAILED", "DROP_QUEUE_FULL", "EVENT_NAME", "LogExporter",
           "OtlpCollector", "OtlpExporter", "OtlpStats", "attributes", "parse_endpoint"]

EVENT_NAME = "ztnet.flow"
SCOPE = "ztnet.flows"
# why a record never reached the collector (OtlpStats.dropped keys, metric label "reason")
DROP_QUEUE_FULL = "queue_full"
DROP_EXPORT_FAILED = "export_failed"
DROP_CLOSED = "closed"
_REASONS = (DROP_QUEUE_FULL, DROP_EXPORT_FAILED, DROP_CLOSED)
_LOG_SECONDS = 10.0
_TRANSPORT = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


def parse_endpoint(text: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> the exporter's endpoint; ConfigError names
    what is wrong. Plain gRPC (no TLS): a collector on the host or a trusted network."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c in host for c in "/[]@ ") or (":" in host and not text.startswith("[")):
        raise ConfigError(f"otlp: endpoint {text!r}: expected HOST:PORT (or [IPv6]:PORT), "
                          "like 127.0.0.1:4317")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def attributes(record: FlowRecord) -> dict[str, Any]:
    """The OTLP attributes of one record (semantic conventions first, then ``ztnet.*``).
    Fields the kernel did not know (no source on a connect, no executable) are left out."""
    proc = record.process
    exe = proc.exe
    attrs: dict[str, Any] = {
        "log.record.uid": record.uuid,
        "network.transport": _TRANSPORT.get(record.proto, str(record.proto)),
        "network.type": f"ipv{record.ip_version}",
        "destination.address": record.destination,
        "destination.port": record.destination_port,
        "process.pid": proc.pid,
        "process.executable.name": exe.rsplit("/", 1)[-1] if exe else proc.comm,
        "thread.id": proc.tid,
        "user.id": str(proc.uid),
        "process.user.id": proc.uid,
        "ztnet.host": record.host,
        "ztnet.event_type": str(record.event_type),
        "ztnet.verdict": str(record.verdict),
        "ztnet.reason": record.drop_reason,
        "ztnet.process.comm": proc.comm,
        "ztnet.agent": record.agent.name,
        "ztnet.socket_cookie": record.socket_cookie,
        "ztnet.cgroup_id": record.cgroup_id,
        "ztnet.suppressed": record.suppressed,
    }
    if record.source:
        attrs["source.address"] = record.source
    if record.source_port:
        attrs["source.port"] = record.source_port
    if exe:
        attrs["process.executable.path"] = exe
    if record.agent.spiffe_id:
        attrs["ztnet.agent.spiffe_id"] = record.agent.spiffe_id
    if record.grant is not None:
        attrs["ztnet.grant.id"] = record.grant.name
        attrs["ztnet.policy_version"] = record.grant.policy_version
        if record.grant.key_id:
            attrs["ztnet.grant.key_id"] = record.grant.key_id
    flow = record.flow
    if flow is not None:
        attrs["ztnet.flow.packets_out"] = flow.packets_out
        attrs["ztnet.flow.bytes_out"] = flow.bytes_out
        attrs["ztnet.flow.packets_in"] = flow.packets_in
        attrs["ztnet.flow.bytes_in"] = flow.bytes_in
        attrs["ztnet.flow.first_seen_ns"] = flow.first_seen_ns
        attrs["ztnet.flow.duration_ns"] = flow.duration_ns
    dns = record.dns
    if dns is not None:
        attrs["dns.question.name"] = dns.name
        attrs["dns.answers"] = list(dns.answers)
        attrs["ztnet.dns.type"] = dns.type
        attrs["ztnet.dns.rcode"] = dns.rcode
    return attrs


def _body(record: FlowRecord) -> str:
    kind = "end" if record.event_type == EventType.FLOW_END else str(record.event_type)
    who = record.agent.name or "-"
    return (f"{kind} {record.verdict} {who} {record.process.pid}/{record.process.comm} -> "
            f"{record.destination}:{record.destination_port}")


class LogExporter(Protocol):
    """What OtlpExporter needs of the SDK's OTLPLogExporter."""

    def export(self, batch: Sequence[ReadableLogRecord], /) -> LogRecordExportResult: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OtlpStats:
    submitted: int              # accepted into the queue
    exported: int               # acknowledged by the collector
    queued: int                 # waiting (in the queue or the batch being sent)
    dropped: Mapping[str, int]  # reason -> records that will never reach the collector
    failed_exports: int         # export calls that failed (each retried or dropped)


class OtlpExporter:
    name = "otlp"

    def __init__(self, endpoint: str, *, service: str, host: str, queue_size: int = 65536,
                 batch_size: int = 512, delay: float = 0.2, timeout: float = 10.0,
                 attempts: int = 3, exporter: LogExporter | None = None) -> None:
        self.endpoint = parse_endpoint(endpoint)
        self.queue_size, self.batch_size, self.delay = 0, 0, 0.0
        self.configure({"queue_size": queue_size, "batch_size": batch_size, "delay": delay})
        if attempts < 1:
            raise ConfigError(f"otlp: attempts must be at least 1, not {attempts!r}")
        self.attempts = attempts
        self._exporter: LogExporter = exporter if exporter is not None else OTLPLogExporter(
            endpoint=self.endpoint, insecure=True, timeout=timeout)
        # the SDK exporter logs every retry at WARNING: keep our own rate-limited summary
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(
            logging.CRITICAL)
        self._resource = Resource.create(
            {"service.name": service, "host.name": host, "process.pid": os.getpid()})
        self._scope = InstrumentationScope(SCOPE)
        # a non-empty context: LogRecord then skips looking up the current one per record
        self._context = set_value("ztnet.flows", True)
        self._queue: deque[FlowRecord] = deque()
        self._cond = threading.Condition()
        self._submitted = self._exported = self._failed_exports = self._in_flight = 0
        self._dropped: Counter[str] = Counter({reason: 0 for reason in _REASONS})
        self._stopping = False
        self._deadline = 0.0  # set by close(): until then the queue is drained
        self._last_log = -_LOG_SECONDS
        self._thread = threading.Thread(target=self._run, name="ztnet-otlp", daemon=True)
        self._thread.start()

    def configure(self, cfg: SinkConfig) -> None:
        queue_size = cfg.get("queue_size", self.queue_size)
        batch_size = cfg.get("batch_size", self.batch_size)
        delay = cfg.get("delay", self.delay)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"otlp: queue_size must be at least 1, not {queue_size!r}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 8192:
            raise ConfigError(f"otlp: batch_size must be 1..8192, not {batch_size!r}")
        if not isinstance(delay, int | float) or delay <= 0:
            raise ConfigError(f"otlp: delay must be positive, not {delay!r}")
        self.queue_size, self.batch_size, self.delay = queue_size, batch_size, float(delay)

    # --- the callers' side: never waits ------------------------------------------------------

    def on_flow(self, record: FlowRecord) -> None:
        self.submit_many((record,))

    def submit_many(self, records: Sequence[FlowRecord]) -> int:
        """Queue ``records``; how many were accepted (the rest are dropped and counted)."""
        with self._cond:
            if self._stopping:
                self._dropped[DROP_CLOSED] += len(records)
                return 0
            room = self.queue_size - len(self._queue)
            accepted = records if len(records) <= room else records[:max(room, 0)]
            self._queue.extend(accepted)
            self._submitted += len(accepted)
            if len(accepted) < len(records):
                self._dropped[DROP_QUEUE_FULL] += len(records) - len(accepted)
                self._log_loss("otlp export queue full: newest records dropped")
            if len(self._queue) >= self.batch_size or len(self._queue) == len(accepted):
                self._cond.notify()  # a full batch, or the first record starts the timer
            return len(accepted)

    def stats(self) -> OtlpStats:
        with self._cond:
            return OtlpStats(self._submitted, self._exported, len(self._queue) + self._in_flight,
                             dict(self._dropped), self._failed_exports)

    def wait_idle(self, timeout: float) -> bool:
        """True once everything submitted so far was exported or dropped (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for about ``timeout`` s at most), then stop; the rest is
        counted as ``closed``."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout)
        self._exporter.shutdown()  # interrupts a retry backoff and cancels the call
        self._thread.join(5)
        with self._cond:
            self._dropped[DROP_CLOSED] += len(self._queue)
            self._queue.clear()

    # --- the worker ----------------------------------------------------------------------------

    def _take(self) -> list[FlowRecord] | None:
        with self._cond:
            while True:
                if self._stopping and (not self._queue or time.monotonic() > self._deadline):
                    return None
                if len(self._queue) >= self.batch_size or (self._queue and self._stopping):
                    break
                if self._queue:
                    # a partial batch waits at most ``delay`` for company
                    self._cond.wait(self.delay)
                    if self._queue:
                        break
                else:
                    self._cond.wait()
            count = min(self.batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight = count
            return batch

    def _run(self) -> None:
        while (records := self._take()) is not None:
            try:
                self._send(records)
            except Exception as exc:  # never let the exporter thread die
                self._finish(len(records), exported=False)
                logs.event("otlp export error", logging.ERROR, reason=repr(exc))

    def _send(self, records: list[FlowRecord]) -> None:
        # The SDK's records, built directly: Logger.emit would wrap every record's attributes
        # in BoundedAttributes and check each value (a quarter of the cost), and attributes()
        # only ever makes str and int values, within the limits.
        now = time.time_ns()
        resource, scope, context = self._resource, self._scope, self._context
        batch = []
        for record in records:
            denied = record.verdict == Verdict.DENIED
            batch.append(ReadableLogRecord(LogRecord(
                timestamp=record.time_ns, observed_timestamp=now, context=context,
                severity_number=SeverityNumber.WARN if denied else SeverityNumber.INFO,
                severity_text="WARN" if denied else "INFO", body=_body(record),
                attributes=attributes(record), event_name=EVENT_NAME), resource, scope))
        for attempt in range(1, self.attempts + 1):
            if self._exporter.export(batch) == LogRecordExportResult.SUCCESS:
                self._finish(len(batch), exported=True)
                return
            with self._cond:
                self._failed_exports += 1
                if self._stopping and time.monotonic() > self._deadline:
                    break
            if attempt < self.attempts:
                self._log_loss("otlp export failed: retrying", attempt=attempt)
        self._finish(len(batch), exported=False)
        self._log_loss("otlp export failed: records dropped", records=len(batch))

    def _finish(self, count: int, *, exported: bool) -> None:
        with self._cond:
            if exported:
                self._exported += count
            else:
                self._dropped[DROP_EXPORT_FAILED] += count
            self._in_flight = 0
            self._cond.notify_all()

    def _log_loss(self, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_SECONDS:
            self._last_log = now
            logs.event(message, logging.WARNING, endpoint=self.endpoint,
                       dropped=dict(self._dropped), **fields)


class OtlpCollector(Collector):
    """The exporter's counters for a Prometheus registry, read from ``stats()`` when scraped."""

    def __init__(self, exporter: OtlpExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.exporter.stats()
        yield CounterMetricFamily("ztnet_otlp_records_exported", "Flow records the OTLP "
                                  "collector acknowledged.", value=stats.exported)
        dropped = CounterMetricFamily("ztnet_otlp_records_dropped", "Flow records that will "
                                      "never reach the OTLP collector, by reason (queue_full, "
                                      "export_failed, closed).", labels=["reason"])
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily("ztnet_otlp_export_failures", "OTLP export calls that "
                                  "failed after the exporter's own retries.",
                                  value=stats.failed_exports)
        yield GaugeMetricFamily("ztnet_otlp_records_queued", "Flow records waiting for the "
                                "OTLP collector.", value=stats.queued)

    @classmethod
    def register(cls, exporter: OtlpExporter, registry: CollectorRegistry) -> None:
        registry.register(cls(exporter))

