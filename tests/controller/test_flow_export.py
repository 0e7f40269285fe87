"""`ztnet controller serve --otlp-endpoint`: every stored flow record also reaches a real
OTLP receiver (opentelemetry-proto's LogsService, ztnet.testing.otlp) with its attributes;
a resend is not exported twice; with the receiver gone, ReportFlows still stores and
acknowledges every batch and the losses are counted in the controller's metrics."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.flow_support import NS, make_record, query, uuids
from ztnet.observe.otlp import attributes
from ztnet.observe.records import EventType, Verdict
from ztnet.testing.controller import ControllerProcess, ControllerState
from ztnet.testing.flows import report
from ztnet.testing.nodes import enroll
from ztnet.testing.otlp import OtlpReceiver
from ztnet.testing.ports import free_port


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def test_stored_records_are_exported_once_with_their_attributes(
        state: ControllerState, receiver: OtlpReceiver) -> None:
    with ControllerProcess(state, extra_args=["--otlp-endpoint", receiver.endpoint]) as ctl:
        identity = enroll(ctl, "otlp-a")
        start = time.time_ns() // 1000 * 1000
        first = [make_record("otlp-a", time_ns=start - i * NS, port=2000 + i) for i in range(300)]
        second = [make_record("otlp-a", time_ns=start - (300 + i) * NS, verdict=Verdict.DENIED,
                              event_type=EventType.CONNECT) for i in range(5)]
        result = report(ctl, identity, [(1, first), (2, second), (2, second)])  # 2 resent
        assert result.error is None and result.acks == [1, 2, 2]
        assert receiver.wait_count(len(first) + len(second), 30)
        records = first + second
        assert sorted(uuids(query(ctl, host="otlp-a", limit=1000))) == \
            sorted(r.uuid for r in records)
    assert ctl.stop() == 0, ctl.log()
    got = {log.attributes["log.record.uid"]: log for log in receiver.logs}
    assert len(receiver.logs) == len(records) == len(got)  # the resend was not exported
    for record in records:
        assert got[record.uuid].attributes == attributes(record)
        assert got[record.uuid].time_ns == record.time_ns
    resource = receiver.logs[0].resource
    assert resource["service.name"] == "ztnet-controller"
    assert resource["host.name"] == socket.gethostname()


def test_receiver_down_ingest_goes_on_and_the_losses_are_counted(
        state: ControllerState, tmp_path: Path) -> None:
    dead = socket.socket()  # a port nobody listens on, held for the test
    dead.bind(("127.0.0.1", 0))
    metrics = free_port()
    try:
        with ControllerProcess(state, extra_args=[
                "--otlp-endpoint", f"127.0.0.1:{dead.getsockname()[1]}",
                "--metrics", f"127.0.0.1:{metrics}"]) as ctl:
            identity = enroll(ctl, "otlp-down")
            start = time.time_ns() // 1000 * 1000
            batches = [(seq, [make_record("otlp-down", time_ns=start - (seq * 500 + i) * 1000)
                              for i in range(500)]) for seq in range(1, 11)]
            result = report(ctl, identity, batches)
            assert result.error is None and result.acks == list(range(1, 11))
            stored = query(ctl, host="otlp-down", limit=10_000)
            assert len(stored.records) == 5000  # the flow store did not wait on the collector
            text = scrape(metrics)
            assert sample(text, "ztnet_otlp_records_exported_total") == 0
            # nothing reached the collector: queued, being retried or counted as dropped
            dropped = sum(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith("ztnet_otlp_records_dropped_total{"))
            assert dropped + sample(text, "ztnet_otlp_records_queued") == 5000
        assert ctl.stop() == 0, ctl.log()
    finally:
        dead.close()


def test_a_bad_endpoint_stops_the_controller_before_it_serves(state: ControllerState) -> None:
    ctl = ControllerProcess(state, extra_args=["--otlp-endpoint", "collector"])
    with pytest.raises(Exception, match="expected HOST:PORT"):
        ctl.start()
    assert "otlp: endpoint 'collector'" in ctl.log()
