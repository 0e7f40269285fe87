"""Prometheus metrics of the flow pipeline and the daemon.

``FlowMetrics`` is a sink (counts every FlowRecord it sees) and also holds
what the daemon reports directly: live grants, bundle rejects, the kernel's
counters (events lost, events suppressed) and the dispatcher's drops. It
uses its own ``CollectorRegistry``, never the process-global one, so several
instances (tests, the lab) never collide. ``start_http_server(addr, registry)`` exposes
a registry over HTTP (``ztnet daemon --metrics 127.0.0.1:9464``).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ztnet.errors import ConfigError
from ztnet.observe.records import EventType, FlowRecord
from ztnet.observe.sinks import DispatcherStats

NO_AGENT = "-"  # the agent label of records from no known agent


class _Snapshots(Collector):
    """Counters and gauges whose values are owned elsewhere (the kernel's
    percpu counters, the dispatcher) and are copied in, not incremented."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kernel: dict[str, int] = {}
        self._drops: dict[str, dict[str, int]] = {}
        self._events: dict[str, dict[tuple[str, str], int]] = {}
        self._dispatcher: DispatcherStats | None = None

    def set_drops(self, drops: Mapping[str, Mapping[str, int]]) -> None:
        with self._lock:
            self._drops = {agent: dict(reasons) for agent, reasons in drops.items()}

    def set_events(self, events: Mapping[str, Mapping[tuple[str, str], int]]) -> None:
        with self._lock:
            self._events = {agent: dict(counts) for agent, counts in events.items()}

    def set_kernel(self, counters: Mapping[str, int]) -> None:
        with self._lock:
            self._kernel = dict(counters)

    def set_dispatcher(self, stats: DispatcherStats) -> None:
        with self._lock:
            self._dispatcher = stats

    def collect(self) -> Iterator[Any]:
        with self._lock:
            kernel, dispatcher, drops = dict(self._kernel), self._dispatcher, self._drops
            events = self._events
        lost = CounterMetricFamily("ztnet_events_lost", "Kernel events lost because the "
                                   "ring buffer was full (reservation failed).")
        lost.add_metric([], kernel.get("events_lost", 0))
        suppressed = CounterMetricFamily("ztnet_events_suppressed", "Deny events the "
                                         "kernel's per-agent rate limit dropped (counted).")
        suppressed.add_metric([], kernel.get("events_suppressed", 0))
        datapath = CounterMetricFamily("ztnet_datapath", "The datapath's counters "
                                       "(zt_counters_v1), by name.", labels=["counter"])
        for name, value in sorted(kernel.items()):
            datapath.add_metric([name], value)
        egress_drops = CounterMetricFamily("ztnet_egress_dropped", "Packets the egress "
                                           "backstop dropped, by agent and reason.",
                                           labels=["agent", "reason"])
        for agent, reasons in sorted(drops.items()):
            for reason, count in sorted(reasons.items()):
                egress_drops.add_metric([agent, reason], count)
        agent_events = CounterMetricFamily(
            "ztnet_agent_events_dropped", "Kernel events of each agent that never reached "
            "user space, by side (deny, allowed) and cause (budget: the per-agent rate limit, "
            "reported by the agent's next event; ring_full).", labels=["agent", "side", "cause"])
        for agent, counts in sorted(events.items()):
            for (side, cause), count in sorted(counts.items()):
                agent_events.add_metric([agent, side, cause], count)
        yield from (lost, suppressed, datapath, egress_drops, agent_events)
        dropped = CounterMetricFamily("ztnet_flow_records_dropped", "Flow records that "
                                      "reached no sink, by reason.", labels=["reason"])
        errors = CounterMetricFamily("ztnet_flow_sink_errors", "Failed sink calls, by "
                                     "sink.", labels=["sink"])
        queued = GaugeMetricFamily("ztnet_flow_records_queued", "Flow records waiting "
                                   "for the sinks.")
        if dispatcher is not None:
            for reason, count in sorted(dispatcher.dropped.items()):
                dropped.add_metric([reason], count)
            for sink, count in sorted(dispatcher.sink_errors.items()):
                errors.add_metric([sink], count)
            queued.add_metric([], dispatcher.queued)
        yield from (dropped, errors, queued)


class FlowMetrics:
    """The daemon's metrics; a flow sink too (``on_flow``)."""

    name = "metrics"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.flows = Counter("ztnet_flows", "Verdicts (connect and sendmsg events) by agent, "
                             "verdict and reason.", ["agent", "verdict", "reason"], registry=r)
        self.flow_ends = Counter("ztnet_flow_ends", "Allowed flows that ended (socket "
                                 "released), by agent.", ["agent"], registry=r)
        self.bytes = Counter("ztnet_flow_bytes", "Bytes of ended flows, by agent and "
                             "direction (out, in).", ["agent", "direction"], registry=r)
        self.packets = Counter("ztnet_flow_packets", "Packets of ended flows, by agent and "
                               "direction (out, in).", ["agent", "direction"], registry=r)
        self.suppressed_reported = Counter(
            "ztnet_flow_suppressed_reported", "Events the kernel's per-agent budgets "
            "dropped, as reported by the agent's next record of the same side (deny, "
            "allowed).", ["agent"], registry=r)
        self.active_grants = Gauge("ztnet_active_grants", "Live grants installed, by agent.",
                                   ["agent"], registry=r)
        self.bundle_version = Gauge("ztnet_bundle_version", "Policy version of the applied "
                                    "bundle.", registry=r)
        self.bundle_rejects = Counter("ztnet_bundle_rejects", "Bundles refused, by reason.",
                                      ["reason"], registry=r)
        self.drift = Counter("ztnet_datapath_drift", "Grant-map entries found by a resync "
                             "to differ from what the daemon installed, and repaired, by kind "
                             "(extra, missing, changed, levels).", ["kind"], registry=r)
        self._snapshots = _Snapshots()
        r.register(self._snapshots)
        self._agents: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    # --- sink ---------------------------------------------------------------------------

    def configure(self, cfg: Mapping[str, Any]) -> None:
        pass

    def on_flows(self, records: list[FlowRecord]) -> None:
        """A batch: each labelled counter incremented once per batch, not per record (the
        records summed by agent and verdict first, the flow ends' totals by agent)."""
        decisions: dict[tuple[str, str, str], int] = {}
        # agent -> [flow ends, bytes out, bytes in, packets out, packets in, any counters]
        ends: dict[str, list[int]] = {}
        suppressed: dict[str, int] = {}
        flow_end = EventType.FLOW_END
        for record in records:
            agent = record.agent.name or NO_AGENT
            if record.event_type == flow_end:
                totals = ends.get(agent)
                if totals is None:
                    totals = ends[agent] = [0, 0, 0, 0, 0, 0]
                totals[0] += 1
                flow = record.flow
                if flow is not None:
                    totals[1] += flow.bytes_out
                    totals[2] += flow.bytes_in
                    totals[3] += flow.packets_out
                    totals[4] += flow.packets_in
                    totals[5] = 1
            else:
                key = (agent, record.verdict, record.drop_reason)
                decisions[key] = decisions.get(key, 0) + 1
            if record.suppressed:
                suppressed[agent] = suppressed.get(agent, 0) + record.suppressed
        inc = self._inc
        for (agent, verdict, reason), count in decisions.items():
            inc(self.flows, (agent, str(verdict).lower(), reason), count)
        for agent, (count, bytes_out, bytes_in, packets_out, packets_in, counted) in \
                ends.items():
            inc(self.flow_ends, (agent,), count)
            if counted:
                inc(self.bytes, (agent, "out"), bytes_out)
                inc(self.bytes, (agent, "in"), bytes_in)
                inc(self.packets, (agent, "out"), packets_out)
                inc(self.packets, (agent, "in"), packets_in)
        for agent, count in suppressed.items():
            inc(self.suppressed_reported, (agent,), count)

    def on_flow(self, record: FlowRecord) -> None:
        agent = record.agent.name or NO_AGENT
        inc = self._inc
        if record.event_type == EventType.FLOW_END:
            inc(self.flow_ends, (agent,))
            if record.flow is not None:
                inc(self.bytes, (agent, "out"), record.flow.bytes_out)
                inc(self.bytes, (agent, "in"), record.flow.bytes_in)
                inc(self.packets, (agent, "out"), record.flow.packets_out)
                inc(self.packets, (agent, "in"), record.flow.packets_in)
        else:
            inc(self.flows, (agent, record.verdict.value.lower(), record.drop_reason))
        if record.suppressed:
            inc(self.suppressed_reported, (agent,), record.suppressed)

    def _inc(self, counter: Counter, labels: tuple[str, ...], amount: float = 1) -> None:
        """``counter.labels(*labels).inc(amount)`` with the child looked up once: labels()
        validates and locks on every call, a few µs per record. The flow counters' label
        sets are never removed, so a cached child stays the registered one."""
        key = (id(counter), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc(amount)

    def close(self) -> None:
        pass

    # --- set by the daemon ----------------------------------------------------------------

    def set_active_grants(self, counts: Mapping[str, int]) -> None:
        """Live grants per agent; agents no longer listed are removed."""
        with self._lock:
            for gone in self._agents - set(counts):
                self.active_grants.remove(gone)
            for agent, count in counts.items():
                self.active_grants.labels(agent).set(count)
            self._agents = set(counts)

    def move_active_grants(self, added: Mapping[str, int], removed: Mapping[str, int]) -> None:
        """Live grants per agent changed by a delta (counts, by agent)."""
        with self._lock:
            for agent in added.keys() | removed.keys():
                gauge = self.active_grants.labels(agent)
                gauge.inc(added.get(agent, 0) - removed.get(agent, 0))
                self._agents.add(agent)

    def bundle_applied(self, version: int) -> None:
        self.bundle_version.set(version)

    def bundle_rejected(self, reason: str) -> None:
        """``reason``: a short, bounded word (the error's class name), never free text."""
        self.bundle_rejects.labels(reason).inc()

    def datapath_drift(self, counts: Mapping[str, int]) -> None:
        for kind, count in counts.items():
            self.drift.labels(kind).inc(count)

    def set_kernel_counters(self, counters: Mapping[str, int]) -> None:
        """``Datapath.counters()`` (events_lost, events_suppressed, …)."""
        self._snapshots.set_kernel(counters)

    def set_agent_drops(self, drops: Mapping[str, Mapping[str, int]]) -> None:
        """The kernel's per-agent, per-reason egress drop counts (copied in)."""
        self._snapshots.set_drops(drops)

    def set_agent_events(self, events: Mapping[str, Mapping[tuple[str, str], int]]) -> None:
        """Per agent, (side, cause) -> events dropped in the kernel (copied in)."""
        self._snapshots.set_events(events)

    def set_dispatcher_stats(self, stats: DispatcherStats) -> None:
        self._snapshots.set_dispatcher(stats)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def parse_listen(addr: str) -> tuple[str, int]:
    """``127.0.0.1:9464``, ``[::1]:9464`` or ``:9464`` (loopback) -> (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"metrics: bad listen address {addr!r}: expected HOST:PORT, "
                          "like 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = host or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"metrics: bad listen address {addr!r}: the host must be an "
                              "IP address") from None
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_http_server(addr: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` at ``http://addr/metrics`` from a daemon thread."""
    host, port = parse_listen(addr)
    try:
        server, thread = prometheus_client.start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError(f"metrics: cannot listen on {addr}: {exc.strerror}") from None
    return MetricsServer(server, thread)

