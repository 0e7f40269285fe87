"""The daemon's flow pipeline: kernel events → flow records → sinks.

A thread of its own polls the ring buffer (the daemon's main loop never
waits on it), makes each batch of events into records and hands them to the
sinks itself (``Dispatcher.deliver``): the JSONL flow log, the Prometheus
metrics and the audit trail. While it writes, the kernel's ring holds what comes
(4 MiB: about 25,000 records, 0.5 s at 50,000 a second) and counts what does not fit.
The main thread tells it about bundles (new grant metadata, audit records of
grant changes). DNS records of ztnet's resolver go through the dispatcher's queue
(``submit_many``): its worker threads answer queries and must not wait on a sink.
In controller mode a fourth sink spools the records for the controller (uploader.py).
With an OTLP endpoint the reader also hands each batch to the OpenTelemetry exporter
(ztnet/observe/otlp.py), which queues it and never makes the reader wait.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ztnet import logs
from ztnet.daemon.cutter import BudgetCutter
from ztnet.daemon.dnsflows import DnsRecords
from ztnet.daemon.resolverconf import QueryRecord
from ztnet.datapath import events
from ztnet.datapath.datapath import Datapath
from ztnet.datapath.drift import Drift
from ztnet.datapath.events import KernelEvent
from ztnet.grants.bundle import VerifiedBundle
from ztnet.grants.delta import HeldGrants
from ztnet.grants.model import Grant, IPNetwork, Proto, format_grant_id
from ztnet.grants.payload import GrantRecord
from ztnet.instance import AUDIT_FILE, FLOWS_FILE
from ztnet.observe import audit, metrics, records, sinks
from ztnet.observe.context import GrantInfo

if TYPE_CHECKING:
    from ztnet.daemon.uploader import FlowUpload, UploadSettings
    from ztnet.observe.otlp import OtlpExporter

# The reader's timer: records the kernel queued without a wake-up (below) wait for it at
# most this long, so it bounds a lone record's connect() -> flow log latency (it was 200 ms:
# p50 91 ms / p99 199 ms at 50 connections a second). Each timer wake-up that finds the
# rings empty costs a poll and a look at each ring's positions, about 10-20 us: 100 a
# second are 0.1-0.2 % of a CPU on an idle host.
_POLL_MS = 10
_COUNTERS_EVERY = 1.0  # seconds between kernel-counter snapshots for the metrics
# After a poll that found records, let more gather before the next: under load each wake-up
# then takes a batch instead of a record or two (a third of the CPU at 8,000 records a
# second), for at most this much more latency. 10 ms, not 2: at 50,000 records a second a
# wake-up then takes about 500 records instead of 100, and the fixed cost of each (poll,
# consume, the sinks' flush) is paid a fifth as often. A lone record is written before
# the linger, so it waits no longer. A poll that read a whole batch (events.READ_BATCH) or
# more found a backlog: the reader reads on without the pause (with it, 50,000 records a
# second for 60 s lost 79,000-176,000 records in the ring in two runs; without, none in
# two runs of three, docs/performance.md).
_LINGER = 0.010
# The kernel wakes this reader with every _WAKEUP_EVERY-th allowed-side record per CPU and
# queues the others silently (a wake-up per record costs the agent an interrupt per connect);
# the poll timer (_POLL_MS) collects them. Deny records and budget cuts always wake it.
_WAKEUP_EVERY = 64


def _event_losses(datapath: Datapath) -> dict[str, dict[tuple[str, str], int]]:
    stats = datapath.agent_stats()
    result = {}
    for agent, a in datapath.event_accounting().items():
        deny_budget = stats[agent].events_suppressed if agent in stats else 0
        result[agent] = {("deny", "budget"): deny_budget, ("deny", "ring_full"): a.deny_lost,
                         ("allowed", "budget"): a.allow_suppressed,
                         ("allowed", "ring_full"): a.allow_lost}
    return result


def _audit_failed(what: str, exc: OSError) -> None:
    logs.event("audit not recorded", logging.ERROR,
               reason=f"daemon: audit trail: {what} not recorded: {exc.strerror or exc}")


def _live_by_agent(grants: Iterable[Grant], agents: set[str], now: float) -> Counter[str]:
    """Grants live at ``now``, by agent, of the agents that have a cgroup: the grants the
    kernel enforces for them (install writes every grant of a registered agent)."""
    return Counter(g.agent for g in grants if g.agent in agents and g.live_at(now))


def grant_fields(grant: Grant) -> dict[str, object]:
    """A grant as its audit record's fields."""
    return {"id": format_grant_id(grant.grant_id), "agent": grant.agent,
            "proto": str(grant.proto), "to": str(grant.network),
            "ports": str(grant.ports) if grant.ports else "any",
            "not_before": grant.not_before, "not_after": grant.not_after}


_PROTO_TEXT = {proto: str(proto) for proto in Proto}


def _network_text(network: IPNetwork) -> str:
    """``str(network)``; an IPv4 one in a third of the time (``ipaddress`` formats the
    address in Python)."""
    if network.version == 4:
        address = int(network.network_address).to_bytes(4, "big")
        return f"{socket.inet_ntoa(address)}/{network.prefixlen}"
    return str(network)


def grant_fields_json(grant: Grant) -> str:
    """``canonical(grant_fields(grant))`` from a template, a third of the cost (100,000 of
    them for a first bundle). Every value is a number or text that JSON need not escape:
    a DNS-label agent, a ``g-`` hex id, a protocol and port name, a network; ``repr`` of
    an int or a finite float is what the encoder writes."""
    ports = str(grant.ports) if grant.ports else "any"
    return (f'{{"agent":"{grant.agent}","id":"{format_grant_id(grant.grant_id)}",'
            f'"not_after":{grant.not_after!r},"not_before":{grant.not_before!r},'
            f'"ports":"{ports}","proto":"{_PROTO_TEXT[grant.proto]}",'
            f'"to":"{_network_text(grant.network)}"}}')


class GrantInfos(Mapping[int, GrantInfo]):
    """Grant id -> GrantInfo for flow records, as ``{**before, **bundle's}`` would be
    after each bundle, without a 100,000-entry dict per bundle: the grants of the
    bundle in force share its one GrantInfo, and only ids that left it are kept
    apart (with the info they last had)."""

    def __init__(self) -> None:
        self._current: Mapping[int, object] = {}
        self._info = GrantInfo(0, "")
        self._earlier: dict[int, GrantInfo] = {}

    def applied(self, grants: Mapping[int, object], info: GrantInfo) -> GrantInfos:
        view = GrantInfos()
        view._earlier = dict(self._earlier)
        for grant_id in self._current.keys() - grants.keys():
            view._earlier[grant_id] = self._info
        for grant_id in view._earlier.keys() & grants.keys():
            del view._earlier[grant_id]
        view._current, view._info = grants, info
        return view

    def changed(self, grants: Mapping[int, object], revoked: Iterable[int],
                added: Iterable[int], info: GrantInfo) -> GrantInfos:
        """``applied`` for a delta: ``grants`` differ from this view's by ``revoked`` and
        ``added`` only, so only those ids are looked at."""
        view = GrantInfos()
        view._earlier = dict(self._earlier)
        for grant_id in revoked:
            view._earlier[grant_id] = self._info
        for grant_id in added:
            view._earlier.pop(grant_id, None)
        view._current, view._info = grants, info
        return view

    def __getitem__(self, grant_id: int) -> GrantInfo:
        return self._info if grant_id in self._current else self._earlier[grant_id]

    def __iter__(self) -> Iterator[int]:
        yield from self._current
        yield from self._earlier

    def __len__(self) -> int:
        return len(self._current) + len(self._earlier)


def _named(batch: list[records.FlowRecord],
           hostnames: Mapping[tuple[int, str], str]) -> list[records.FlowRecord]:
    """Each record with the host name ztnet's resolver handed its agent for its destination,
    if any; the others as they are."""
    get = hostnames.get
    return [record._replace(destination_names=(name,))
            if record.agent.index and (name := get((record.agent.index, record.destination)))
            else record for record in batch]


class FlowPipeline:
    def __init__(self, datapath: Datapath, state: Path, *, host: str, trust_domain: str,
                 metrics_listen: str | None, upload: UploadSettings | None = None,
                 otlp_endpoint: str | None = None,
                 hostnames: Mapping[tuple[int, str], str] | None = None) -> None:
        self.datapath = datapath
        # ztnet's resolver: (agent index, address) -> the name it resolved (hostname grants)
        self.hostnames = hostnames
        self.audit_log = audit.AuditLog(state / AUDIT_FILE)
        self.metrics = metrics.FlowMetrics()
        # controller mode: every record is also spooled and uploaded (uploader.py, which
        # loads gRPC: imported here so that a file-mode daemon does without it)
        self.upload: FlowUpload | None = None
        if upload is not None:
            from ztnet.daemon.uploader import FlowUpload

            self.upload = FlowUpload(state, upload, self.metrics.registry)
        self.otlp: OtlpExporter | None = None
        if otlp_endpoint is not None:
            from ztnet.observe import otlp  # the SDK loads only when asked for

            self.otlp = otlp.OtlpExporter(otlp_endpoint, service="ztnet-daemon", host=host)
            otlp.OtlpCollector.register(self.otlp, self.metrics.registry)
        self.dispatcher = sinks.Dispatcher([
            sinks.JsonlSink(state / FLOWS_FILE), self.metrics, audit.AuditSink(self.audit_log),
            *([self.upload.sink] if self.upload else []),
        ]).start()
        self.context = records.RecordContext(host=host, trust_domain=trust_domain,
                                             agent_names=datapath.agent_names(),
                                             exe=records.CachedExe())
        self.server = (metrics.start_http_server(metrics_listen, self.metrics.registry)
                       if metrics_listen else None)
        # the grants held, by id: the daemon's HeldGrants index, shared (100,000 grants
        # are a 5 MiB dict); a delta changes a copy of it
        self._granted: Mapping[int, GrantRecord] = {}
        self._infos = GrantInfos()
        self._dns = DnsRecords()
        self._reader = datapath.event_reader(on_batch=self._on_events)
        self.cutter = BudgetCutter(datapath.instance)
        datapath.set_wakeup_every(_WAKEUP_EVERY)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ztnet-flows", daemon=True)
        self._thread.start()

    def _on_events(self, events: list[KernelEvent]) -> None:
        # each batch read from the rings (up to events.READ_BATCH) becomes records at once
        # and goes to the sinks whole, from this thread
        for event in events:
            if event.cut:
                self.cutter.submit(event)
        batch = records.from_events(events, self.context)
        if self.hostnames:  # an agent resolved a name: its records may carry it
            batch = _named(batch, self.hostnames)
        self.dispatcher.deliver(batch)
        if self.otlp is not None:
            self.otlp.submit_many(batch)

    def dns_query(self, query: QueryRecord) -> None:
        """A query ztnet's resolver answered (from one of its worker threads): a record of
        event type dns, to the same sinks as the kernel's."""
        batch = [self._dns.record(query, self.context)]
        self.dispatcher.submit_many(batch)
        if self.otlp is not None:
            self.otlp.submit_many(batch)

    def _run(self) -> None:
        snapshot = time.monotonic() + _COUNTERS_EVERY
        lingered = False
        while not self._stop.is_set():
            try:
                # after a linger, what gathered is read at once: records queued without a
                # wake-up would otherwise wait for the poll timer too
                read = self._reader.poll(0 if lingered else _POLL_MS)
                lingered = read > 0
                if 0 < read < events.READ_BATCH:  # a backlog is read on without a pause
                    self._stop.wait(_LINGER)
                if time.monotonic() >= snapshot:  # by time: a busy ring is polled often
                    snapshot = time.monotonic() + _COUNTERS_EVERY
                    self.metrics.set_kernel_counters(self.datapath.counters())
                    self.metrics.set_agent_drops(self.datapath.agent_drops())
                    self.metrics.set_agent_events(_event_losses(self.datapath))
                    self.metrics.set_dispatcher_stats(self.dispatcher.stats())
            except Exception as exc:  # the trace must not take enforcement down with it
                logs.event("flow pipeline error", logging.ERROR, reason=repr(exc))
                self._stop.wait(1.0)

    def bundle_applied(self, verified: VerifiedBundle, held: HeldGrants, *,
                       restored: bool = False) -> None:
        """New grant metadata for records; the grant changes into the audit trail.
        ``held``: the index of ``verified`` the daemon keeps. ``restored``: the state
        directory's state, enforced again at start; if the trail already ends with it
        applied, whole, one ``bundle.restored`` record says so instead of a
        ``grant.added`` for each of its grants again."""
        registered = self.datapath.agent_names()
        names = {**self.context.agent_names, **registered}
        new = held.shared_by_id()
        self._infos = self._infos.applied(new, GrantInfo(verified.version, verified.key_id))
        self.context = dataclasses.replace(self.context, agent_names=names, grants=self._infos)
        fields: dict[str, object] = {"version": verified.version, "key_id": verified.key_id,
                                     "payload_sha256": verified.payload_sha256,
                                     "grants": len(new)}
        try:
            recorded = self._recorded(verified) if restored and not self._granted else None
            if recorded is not None:
                self.audit_log.append(audit.BUNDLE_RESTORED, {**fields, "recorded": recorded})
            else:
                added = sorted(new.keys() - self._granted.keys())
                removed = sorted(self._granted.keys() - new.keys())
                self.audit_log.append(audit.BUNDLE_APPLIED, {
                    **fields, "added": len(added), "removed": len(removed)}, sync=False)
                self.audit_log.append_encoded(audit.GRANT_ADDED, (
                    grant_fields_json(new[grant_id].grant) for grant_id in added))
                self.audit_log.append_encoded(audit.GRANT_REMOVED, (
                    grant_fields_json(self._granted[grant_id].grant) for grant_id in removed))
            self.audit_log.sync()
        except OSError as exc:  # e.g. ENOSPC: enforcement went ahead; say what is missing
            _audit_failed(f"version {verified.version} applied", exc)
        self._granted = new
        self.metrics.bundle_applied(verified.version)
        # what the kernel now holds, without reading 100,000 entries back from it
        self.metrics.set_active_grants(_live_by_agent(
            verified.grants, set(registered.values()), time.time()))

    def _recorded(self, verified: VerifiedBundle) -> int | None:
        """The seq of the trail's last ``bundle.applied`` record if it records ``verified``
        and every grant record it announced follows it (a process that died while writing
        them left fewer); else None."""
        last = audit.last_applied(self.audit_log.path)
        if last is None or last.fields.get("version") != verified.version \
                or last.fields.get("payload_sha256") != verified.payload_sha256:
            return None
        counts = last.fields.get("delta", last.fields)  # a delta's: {added, revoked}
        if not isinstance(counts, dict):
            return None
        added, removed = counts.get("added"), counts.get("removed", counts.get("revoked"))
        if not isinstance(added, int) or not isinstance(removed, int):
            return None  # written by an older version: its grant records are not counted
        return last.seq if added + removed == last.grant_records else None

    def delta_applied(self, verified: VerifiedBundle, added: tuple[Grant, ...],
                      revoked: tuple[Grant, ...], held: HeldGrants) -> None:
        """bundle_applied for a delta: only the changed grants are looked at (the live
        grant gauge moves by them instead of being read back from the kernel). ``held``
        has the delta applied already."""
        registered = self.datapath.agent_names()
        names = {**self.context.agent_names, **registered}
        granted = held.shared_by_id()
        self._infos = self._infos.changed(granted, [g.grant_id for g in revoked],
                                          [g.grant_id for g in added],
                                          GrantInfo(verified.version, verified.key_id))
        self.context = dataclasses.replace(self.context, agent_names=names, grants=self._infos)
        try:
            self.audit_log.append(audit.BUNDLE_APPLIED, {
                "version": verified.version, "key_id": verified.key_id,
                "payload_sha256": verified.payload_sha256, "grants": len(granted),
                "delta": {"added": len(added), "revoked": len(revoked)}})
            self.audit_log.append_encoded(audit.GRANT_ADDED, (
                grant_fields_json(grant) for grant in sorted(added, key=lambda g: g.grant_id)))
            self.audit_log.append_encoded(audit.GRANT_REMOVED, (
                grant_fields_json(grant)
                for grant in sorted(revoked, key=lambda g: g.grant_id)))
            self.audit_log.sync()
        except OSError as exc:
            _audit_failed(f"version {verified.version} applied", exc)
        self._granted = granted
        self.metrics.bundle_applied(verified.version)
        agents, now = set(registered.values()), time.time()
        self.metrics.move_active_grants(_live_by_agent(added, agents, now),
                                        _live_by_agent(revoked, agents, now))

    def datapath_drift(self, drift: Drift, version: int) -> None:
        """Kernel entries someone else wrote (or removed), found and repaired by a resync."""
        self.audit_log.append(audit.DATAPATH_DRIFT, {
            "version": version, **drift.counts(), "samples": list(drift.samples)})
        self.metrics.datapath_drift(drift.counts())

    def bundle_rejected(self, source: str, reason: str) -> None:
        try:
            self.audit_log.append(audit.BUNDLE_REJECTED, {"source": source, "reason": reason})
        except OSError as exc:
            _audit_failed("bundle rejected", exc)
        self.metrics.bundle_rejected(reason.split(":")[0] or "bundle")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # else it may still be in a poll of the rings
            self._reader.close()
        self.cutter.close()
        if self.upload is not None:
            self.upload.stop()
        self.dispatcher.close()  # the spool sink writes its last batch for the next start
        if self.otlp is not None:
            self.otlp.close()
        if self.server is not None:
            self.server.close()
        self.audit_log.close()
