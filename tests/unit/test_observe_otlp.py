"""The OTLP flow exporter (ztnet.observe.otlp) against a real OTLP receiver: a gRPC server
built from opentelemetry-proto's generated LogsService (ztnet.testing.otlp). Every record
arrives once with its attributes; a receiver that refuses is retried; a receiver that is
gone costs a bounded queue and counted drops, never a blocked caller."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.controller.flow_support import make_record
from ztnet.errors import ConfigError
from ztnet.observe.otlp import (
    DROP_CLOSED,
    DROP_EXPORT_FAILED,
    DROP_QUEUE_FULL,
    EVENT_NAME,
    OtlpCollector,
    OtlpExporter,
    attributes,
    parse_endpoint,
)
from ztnet.observe.records import (
    AgentRef,
    EventType,
    FlowRecord,
    Process,
    Verdict,
    record_uuid,
)
from ztnet.testing.otlp import OtlpReceiver

HOST = "otlp-host"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def dead_endpoint() -> str:
    """A loopback port with nothing listening (bound, never listened on, while the test runs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_endpoint.held.append(sock)  # type: ignore[attr-defined]
    return f"127.0.0.1:{sock.getsockname()[1]}"


dead_endpoint.held = []  # type: ignore[attr-defined]


def denied_v6_udp() -> FlowRecord:
    """A denied sendmsg of a process in no agent: no grant, no agent, no executable."""
    time_ns = 1_800_000_000_123_456_000
    return FlowRecord(
        uuid=record_uuid(HOST, 77, EventType.SENDMSG, time_ns, "2001:db8::5", 53),
        time_ns=time_ns, host=HOST, event_type=EventType.SENDMSG, verdict=Verdict.DENIED,
        drop_reason="NOT_AGENT", ip_version=6, proto=17, source="", source_port=0,
        destination="2001:db8::5", destination_port=53, socket_cookie=77, cgroup_id=9,
        process=Process(31, 32, "dig", "", 65534), agent=AgentRef("", "", 0), grant=None,
        flow=None, suppressed=4)


def test_every_record_arrives_once_with_its_attributes(receiver: OtlpReceiver) -> None:
    records = [make_record(HOST, port=1000 + i,
                           event_type=EventType.FLOW_END if i % 3 == 0 else EventType.CONNECT,
                           verdict=Verdict.DENIED if i % 5 == 0 else Verdict.ALLOWED)
               for i in range(1200)] + [denied_v6_udp()]
    exporter = OtlpExporter(receiver.endpoint, service="ztnet-test", host=HOST, batch_size=100)
    try:
        assert exporter.submit_many(records) == len(records)
        assert receiver.wait_count(len(records), 30), exporter.stats()
        assert exporter.wait_idle(10)
        stats = exporter.stats()
    finally:
        exporter.close()
    assert stats.exported == len(records) and stats.queued == 0
    assert not any(stats.dropped.values())
    got = {log.attributes["log.record.uid"]: log for log in receiver.logs}
    assert len(receiver.logs) == len(got) == len(records)  # each once
    assert receiver.requests >= len(records) // 100  # batched, not one call per record
    for record in records:
        log = got[record.uuid]
        assert log.attributes == attributes(record)
        assert log.time_ns == record.time_ns and log.event_name == EVENT_NAME
        assert log.severity_text == ("WARN" if record.verdict == Verdict.DENIED else "INFO")
        assert log.resource["service.name"] == "ztnet-test"
        assert log.resource["host.name"] == HOST
        assert log.scope == "ztnet.flows"
    # what the attributes are, spelled out once: semantic conventions, then ztnet.*
    end = next(r for r in records if r.event_type == EventType.FLOW_END
               and r.verdict == Verdict.ALLOWED)
    assert got[end.uuid].attributes == {
        "log.record.uid": end.uuid, "network.transport": "tcp", "network.type": "ipv4",
        "destination.address": "10.0.0.1", "destination.port": end.destination_port,
        "process.pid": 4242, "process.executable.name": "curl",
        "process.executable.path": "/usr/bin/curl", "thread.id": 4242, "user.id": "1000",
        "process.user.id": 1000, "ztnet.host": HOST, "ztnet.event_type": "flow_end",
        "ztnet.verdict": "ALLOWED", "ztnet.reason": "GRANTED", "ztnet.process.comm": "curl",
        "ztnet.agent": "bot", "ztnet.agent.spiffe_id": "spiffe://test.example/agent/bot",
        "ztnet.socket_cookie": end.socket_cookie, "ztnet.cgroup_id": 77,
        "ztnet.suppressed": 0, "ztnet.grant.id": "g-0000000000000abc",
        "ztnet.policy_version": 3, "ztnet.grant.key_id": "ab" * 32,
        "ztnet.flow.packets_out": 3, "ztnet.flow.bytes_out": 300,
        "ztnet.flow.packets_in": 2, "ztnet.flow.bytes_in": 2000,
        "ztnet.flow.first_seen_ns": end.time_ns - 1_000_000_000,
        "ztnet.flow.duration_ns": 1_000_000_000}
    denied = denied_v6_udp()
    assert got[denied.uuid].attributes == {
        "log.record.uid": denied.uuid, "network.transport": "udp", "network.type": "ipv6",
        "destination.address": "2001:db8::5", "destination.port": 53, "process.pid": 31,
        "process.executable.name": "dig", "thread.id": 32, "user.id": "65534",
        "process.user.id": 65534, "ztnet.host": HOST, "ztnet.event_type": "sendmsg",
        "ztnet.verdict": "DENIED", "ztnet.reason": "NOT_AGENT", "ztnet.process.comm": "dig",
        "ztnet.agent": "", "ztnet.socket_cookie": 77, "ztnet.cgroup_id": 9,
        "ztnet.suppressed": 4}
    assert got[denied.uuid].severity_text == "WARN"


def test_a_refusing_receiver_is_retried_and_nothing_is_lost(receiver: OtlpReceiver) -> None:
    receiver.refuse(grpc.StatusCode.UNAVAILABLE)
    exporter = OtlpExporter(receiver.endpoint, service="ztnet-test", host=HOST, batch_size=10,
                            delay=0.05, timeout=30)
    try:
        records = [make_record(HOST) for _ in range(25)]
        exporter.submit_many(records)
        assert receiver.wait_refused(2, 30)  # tried, and tried again
        receiver.refuse(None)
        assert receiver.wait_count(len(records), 60), exporter.stats()
        assert exporter.wait_idle(10)
        assert exporter.stats().exported == len(records)
        assert not any(exporter.stats().dropped.values())
    finally:
        exporter.close()
    assert sorted(log.attributes["log.record.uid"] for log in receiver.logs) == \
        sorted(r.uuid for r in records)


def test_receiver_down_the_queue_is_bounded_and_every_loss_counted() -> None:
    exporter = OtlpExporter(dead_endpoint(), service="ztnet-test", host=HOST, queue_size=300,
                            batch_size=50, delay=0.05, timeout=1, attempts=2)
    records = [make_record(HOST) for _ in range(2000)]
    accepted = 0
    try:
        for start in range(0, len(records), 100):
            accepted += exporter.submit_many(records[start:start + 100])  # returns at once
            stats = exporter.stats()
            assert stats.queued <= 300 + 50  # the queue and the one batch being sent
        assert accepted < len(records)
        assert exporter.stats().dropped[DROP_QUEUE_FULL] == len(records) - accepted
    finally:
        exporter.close(timeout=3)
    stats = exporter.stats()
    assert stats.exported == 0 and stats.queued == 0
    assert stats.failed_exports >= 2
    assert stats.dropped[DROP_EXPORT_FAILED] > 0
    assert sum(stats.dropped.values()) == len(records)  # every record accounted for
    assert exporter.submit_many(records[:5]) == 0
    assert exporter.stats().dropped[DROP_CLOSED] >= 5


def test_metrics_name_the_losses(receiver: OtlpReceiver) -> None:
    registry = CollectorRegistry()
    exporter = OtlpExporter(receiver.endpoint, service="ztnet-test", host=HOST, queue_size=10,
                            batch_size=10)
    OtlpCollector.register(exporter, registry)
    try:
        receiver.refuse(grpc.StatusCode.UNAVAILABLE)  # the first batch waits for its retry
        exporter.submit_many([make_record(HOST) for _ in range(10)])
        assert receiver.wait_refused(1, 30)
        exporter.submit_many([make_record(HOST) for _ in range(25)])  # 10 fit, 15 do not
        receiver.refuse(None)
        assert receiver.wait_count(20, 60)
        assert exporter.wait_idle(10)
        text = generate_latest(registry).decode()
    finally:
        exporter.close()
    assert 'ztnet_otlp_records_dropped_total{reason="queue_full"} 15.0' in text
    assert 'ztnet_otlp_records_dropped_total{reason="export_failed"} 0.0' in text
    assert "ztnet_otlp_records_exported_total 20.0" in text
    assert "ztnet_otlp_records_queued 0.0" in text


@pytest.mark.parametrize("text", ["", "localhost", "host:0", "host:65536", "host:http",
                                  ":4317", "http://host:4317", "::1:4317", "a b:1"])
def test_a_bad_endpoint_is_refused_with_what_was_expected(text: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        parse_endpoint(text)


@pytest.mark.parametrize(("text", "endpoint"), [("127.0.0.1:4317", "127.0.0.1:4317"),
                                                ("collector.example:4317",
                                                 "collector.example:4317"),
                                                ("[::1]:4317", "[::1]:4317")])
def test_good_endpoints(text: str, endpoint: str) -> None:
    assert parse_endpoint(text) == endpoint


def test_bad_options_are_refused() -> None:
    for options in ({"queue_size": 0}, {"batch_size": 0}, {"batch_size": 10_000},
                    {"delay": 0}, {"attempts": 0}):
        with pytest.raises(ConfigError, match="otlp: "):
            OtlpExporter("127.0.0.1:4317", service="x", host=HOST, **options)  # type: ignore[arg-type]
