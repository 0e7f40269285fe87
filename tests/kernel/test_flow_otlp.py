"""`ztnet daemon --otlp-endpoint`: the real daemon exports every flow record of real kernel
events to a real OTLP receiver (opentelemetry-proto's LogsService, ztnet.testing.otlp),
the same records as its flow log, with their attributes; with the receiver gone,
enforcement and the flow log carry on and the losses are counted in the metrics."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import FLOWS_FILE, Instance
from ztnet.lab.netns import NetnsPair, poll_until
from ztnet.lab.servers import ServerProcess
from ztnet.observe.otlp import attributes
from ztnet.observe.records import FlowRecord, from_json
from ztnet.testing.daemon import BundleFileHost, bundle_applied
from ztnet.testing.otlp import OtlpReceiver
from ztnet.testing.ports import free_port

pytestmark = pytest.mark.kernel

ALLOWED, DENIED = 8080, 9090


@pytest.fixture
def host(instance: Instance, tmp_path: Path) -> Iterator[BundleFileHost]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4],
                                            tcp=[ALLOWED, DENIED]):
        setup = BundleFileHost(instance, pair, load_private_key(key_path), pub,
                               tmp_path / "bundle.json", tmp_path / "state")
        setup.publish(1, [ALLOWED])
        yield setup


def flow_log(host: BundleFileHost) -> list[FlowRecord]:
    path = host.state / FLOWS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [from_json(line) for line in lines if line]


def at_least(host: BundleFileHost, count: int) -> list[FlowRecord]:
    return poll_until(lambda: r if len(r := flow_log(host)) >= count else None, 15.0,
                      f"{count} records in the flow log")


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_the_collector_gets_every_record_of_the_flow_log(host: BundleFileHost) -> None:
    with OtlpReceiver() as receiver, \
            host.daemon("--otlp-endpoint", receiver.endpoint) as daemon:
        daemon.wait_event(bundle_applied(1))
        outcomes = [host.attempt(ALLOWED) for _ in range(5)] + \
            [host.attempt(DENIED) for _ in range(3)]
        assert outcomes == ["OK"] * 5 + ["EPERM"] * 3
        # 5 connects, 5 flow ends, 3 denials
        records = at_least(host, 13)
        assert receiver.wait_count(len(records), 15), (len(receiver.logs), len(records))
    got = {log.attributes["log.record.uid"]: log for log in receiver.logs}
    assert set(got) == {r.uuid for r in records} and len(receiver.logs) == len(records)
    for record in records:
        assert got[record.uuid].attributes == attributes(record)
        assert got[record.uuid].time_ns == record.time_ns
    assert {got[r.uuid].attributes["ztnet.verdict"] for r in records} == {"ALLOWED", "DENIED"}
    assert receiver.logs[0].resource["service.name"] == "ztnet-daemon"


def test_collector_down_enforcement_and_the_flow_log_carry_on(host: BundleFileHost) -> None:
    dead = socket.socket()  # a loopback port nobody listens on, held for the test
    dead.bind(("127.0.0.1", 0))
    port = free_port()
    try:
        with host.daemon("--otlp-endpoint", f"127.0.0.1:{dead.getsockname()[1]}",
                         "--metrics", f"127.0.0.1:{port}") as daemon:
            daemon.wait_event(bundle_applied(1))
            assert [host.attempt(ALLOWED) for _ in range(3)] == ["OK"] * 3
            assert host.attempt(DENIED) == "EPERM"
            records = at_least(host, 7)
            assert metric(port, "ztnet_otlp_records_exported_total") == 0
            # every record is queued, being retried, or counted as dropped: none vanished
            poll_until(lambda: metric(port, "ztnet_otlp_records_dropped_total")
                       + metric(port, "ztnet_otlp_records_queued") == len(records) or None,
                       15.0, "every record accounted for in the OTLP metrics")
    finally:
        dead.close()
