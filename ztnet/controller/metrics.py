"""Prometheus metrics of `ztnet controller serve` (``--metrics ADDR``).

A registry of its own (never the process-global one), served by
``ztnet.observe.metrics.start_http_server``. Counters are incremented on the
event loop; gauges that mirror the controller's state read it when scraped
(from the HTTP thread: only plain attribute reads, no database access).
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# QueryFlows latency: interactive queries land in the low buckets; a bad
# plan over millions of rows would show in the top ones.
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


DETECTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 60.0)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.hosts_connected = Gauge("ztnet_controller_hosts_connected", "Hosts with an open "
                                     "grant stream.", registry=r)
        self.bundle_version = Gauge("ztnet_controller_bundle_version", "Version of the "
                                    "current epoch (the bundles being pushed).", registry=r)
        self.policy_version = Gauge("ztnet_controller_policy_version", "Version of the "
                                    "current policy.", registry=r)
        self.pushes = Counter("ztnet_controller_pushes", "Bundles sent to hosts.", registry=r)
        self.answers = Counter("ztnet_controller_push_answers", "Hosts' answers to pushes, "
                               "by answer (ack, nack).", ["answer"], registry=r)
        self.flow_batches = Counter("ztnet_controller_flow_batches", "ReportFlows batches, by "
                                    "outcome: stored, duplicate (at or below the host's "
                                    "sequence: acknowledged, not stored), refused.",
                                    ["outcome"], registry=r)
        self.flow_records = Counter("ztnet_controller_flow_records", "Flow records in stored "
                                    "batches, by outcome: stored, duplicate (uuid already "
                                    "stored).", ["outcome"], registry=r)
        self.flow_rows = Gauge("ztnet_controller_flows_stored", "Flow records in the "
                               "database.", registry=r)
        self.flows_pruned = Counter("ztnet_controller_flows_pruned", "Flow records deleted "
                                    "by retention (age or row limit).", registry=r)
        self.query_seconds = Histogram("ztnet_controller_flow_query_seconds", "QueryFlows "
                                       "latency (database part).", buckets=QUERY_BUCKETS,
                                       registry=r)
        self.host_limited = Counter("ztnet_controller_host_limited", "Calls refused by a "
                                    "per-host limit (subscribe, renew, flow_records, "
                                    "streams).", ["limit"], registry=r)
        self.alerts = Counter("ztnet_controller_alerts", "Alerts the detectors raised, by "
                              "detector and action (alert, quarantine).",
                              ["detector", "action"], registry=r)
        self.detection_seconds = Histogram(
            "ztnet_controller_detection_seconds", "From the earliest evidence record's time "
            "(the host's clock) to the alert.", buckets=DETECTION_BUCKETS, registry=r)
        self.auto_refused = Counter("ztnet_controller_auto_quarantines_refused", "Automatic "
                                    "quarantines the hourly rate limit refused.", registry=r)
        self.quarantined = Gauge("ztnet_controller_quarantines", "Quarantines in force "
                                 "(agent and host, or every host).", registry=r)
        self.alerts_held_back = Gauge("ztnet_controller_alerts_held_back", "Repeats of an "
                                      "alert (same detector, agent and host within a minute) "
                                      "not raised again, since the controller started.",
                                      registry=r)
        self.observations_untracked = Gauge(
            "ztnet_controller_detection_untracked", "Flow records the detectors did not "
            "judge because their agent-host window limit was reached (since start).",
            registry=r)
        # exported from the start, at 0, so rate() and alerts see them
        for limit in ("subscribe", "renew", "flow_records", "streams"):
            self.host_limited.labels(limit)
        for answer in ("ack", "nack"):
            self.answers.labels(answer)
        for outcome in ("stored", "duplicate", "refused"):
            self.flow_batches.labels(outcome)
        for outcome in ("stored", "duplicate"):
            self.flow_records.labels(outcome)

    def follow(self, *, hosts: Callable[[], int], bundle_version: Callable[[], int],
               policy_version: Callable[[], int]) -> None:
        """Read these when scraped."""
        self.hosts_connected.set_function(hosts)
        self.bundle_version.set_function(bundle_version)
        self.policy_version.set_function(policy_version)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
