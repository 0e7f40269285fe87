"""Prometheus metrics: counted from flow records and set by the daemon, in a
registry of their own, valid for `promtool check metrics`."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.test_observe_records import denied_event, flow_end_event, make_ctx, make_event
from ztnet.datapath.abi import ZtReason
from ztnet.errors import ConfigError
from ztnet.observe.metrics import FlowMetrics, parse_listen, start_http_server
from ztnet.observe.records import from_event
from ztnet.observe.sinks import DispatcherStats

REQUIRE_ENV = "ZTNET_REQUIRE_BPF"


def require(condition: bool, reason: str) -> None:
    """Skip unless ``condition``; fail instead under ZTNET_REQUIRE_BPF=1 (CI), where
    every prerequisite must be present (same rule as tests/kernel/conftest.py)."""
    if condition:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (a prerequisite, and {REQUIRE_ENV}=1 is set)", pytrace=False)
    pytest.skip(reason)


def fed_metrics() -> FlowMetrics:
    metrics = FlowMetrics()
    ctx = make_ctx()
    for event in (make_event(), make_event(), denied_event(suppressed=7), flow_end_event(),
                  denied_event(agent_index=0, reason=ZtReason.NOT_AGENT)):
        metrics.on_flow(from_event(event, ctx))
    metrics.set_active_grants({"bot": 3, "other": 1})
    metrics.bundle_applied(7)
    metrics.bundle_rejected("SignatureInvalid")
    metrics.set_kernel_counters({"events_lost": 2, "events_suppressed": 9, "connect_allow": 5})
    metrics.set_dispatcher_stats(DispatcherStats(10, 8, 1, {"queue_full": 4},
                                                 {"jsonl": 1}))
    return metrics


def value(metrics: FlowMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_flow_records_are_counted() -> None:
    metrics = fed_metrics()
    assert value(metrics, "ztnet_flows_total", agent="bot", verdict="allowed",
                 reason="GRANTED") == 2
    assert value(metrics, "ztnet_flows_total", agent="bot", verdict="denied",
                 reason="NO_GRANT") == 1
    assert value(metrics, "ztnet_flows_total", agent="-", verdict="denied",
                 reason="NOT_AGENT") == 1
    assert value(metrics, "ztnet_flow_ends_total", agent="bot") == 1
    assert value(metrics, "ztnet_flow_bytes_total", agent="bot", direction="out") == 1300
    assert value(metrics, "ztnet_flow_bytes_total", agent="bot", direction="in") == 2600
    assert value(metrics, "ztnet_flow_packets_total", agent="bot", direction="in") == 4
    assert value(metrics, "ztnet_flow_suppressed_reported_total", agent="bot") == 7


def test_daemon_values_are_exported() -> None:
    metrics = fed_metrics()
    assert value(metrics, "ztnet_active_grants", agent="other") == 1
    assert value(metrics, "ztnet_bundle_version") == 7
    assert value(metrics, "ztnet_bundle_rejects_total", reason="SignatureInvalid") == 1
    assert value(metrics, "ztnet_events_lost_total") == 2
    assert value(metrics, "ztnet_events_suppressed_total") == 9
    assert value(metrics, "ztnet_datapath_total", counter="connect_allow") == 5
    assert value(metrics, "ztnet_flow_records_dropped_total", reason="queue_full") == 4
    assert value(metrics, "ztnet_flow_sink_errors_total", sink="jsonl") == 1
    assert value(metrics, "ztnet_flow_records_queued") == 1
    metrics.set_active_grants({"bot": 2})  # "other" lost its last grant: the series goes
    assert value(metrics, "ztnet_active_grants", agent="other") is None
    assert value(metrics, "ztnet_active_grants", agent="bot") == 2


def test_each_instance_has_its_own_registry() -> None:
    a, b = FlowMetrics(), FlowMetrics()
    a.bundle_applied(3)
    assert value(b, "ztnet_bundle_version") == 0
    shared = CollectorRegistry()
    assert FlowMetrics(shared).registry is shared


def test_the_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (Debian package prometheus) on PATH")
    assert promtool is not None
    text = fed_metrics().render()
    assert b"ztnet_flows_total{" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    for bad in ("9464", "127.0.0.1:", "127.0.0.1:99999", "example.com:80", "1.2.3.4:x"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_the_http_server_serves_the_registry() -> None:
    metrics = fed_metrics()
    server = start_http_server("127.0.0.1:0", metrics.registry)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    finally:
        server.close()
    assert b"ztnet_events_lost_total 2.0" in body


def test_per_agent_event_losses_are_exported_by_side_and_cause() -> None:
    from ztnet.observe.metrics import FlowMetrics

    metrics = FlowMetrics()
    metrics.set_agent_events({"bot": {("allowed", "budget"): 7, ("deny", "ring_full"): 2}})
    text = metrics.render().decode()
    assert 'ztnet_agent_events_dropped_total{agent="bot",cause="budget",side="allowed"} 7.0' \
        in text
    assert 'ztnet_agent_events_dropped_total{agent="bot",cause="ring_full",side="deny"} 2.0' \
        in text
