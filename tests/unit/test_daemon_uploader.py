"""The flow uploader against a scripted controller on loopback (mutual TLS, no root): batches
go in sequence order, are deleted only once acknowledged, are sent again from the oldest
unacknowledged after the stream breaks, never more than the window at a time; a refused batch
is dropped and counted; a renewed certificate is presented at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import tests.fake_controller
from tests.fake_controller import FakeController, FakeNodeService
from tests.unit.test_observe_records import make_record
from ztnet.daemon.credentials import HostCredentials
from ztnet.daemon.enroll import enroll
from ztnet.daemon.spool import Spool
from ztnet.daemon.uploader import FlowUpload, FlowUploader, UploadSettings
from ztnet.lab.netns import poll_until
from ztnet.v1 import node_pb2

HOST = "web-1"
TIMEOUT = 20.0

# what the controller does with a batch: acknowledge it, say nothing, end the stream
# without acknowledging, or refuse it (INVALID_ARGUMENT ends the stream)
Script = Callable[[int, node_pb2.FlowBatch], str]


@dataclass
class FlowStream:
    peer_serial: int
    sequences: list[int] = field(default_factory=list)
    ended: bool = False


class FlowService(FakeNodeService):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.flow_streams: list[FlowStream] = []
        self.script: Script = lambda stream, batch: "ack"

    def ReportFlows(self, request_iterator: Iterator[node_pb2.FlowBatch],  # noqa: N802
                    context: grpc.ServicerContext) -> Iterator[node_pb2.FlowAck]:
        stream = FlowStream(self._peer_cert(context).serial_number)
        with self.cond:
            self.flow_streams.append(stream)
            number = len(self.flow_streams) - 1
            self.cond.notify_all()
        try:
            for batch in request_iterator:
                with self.cond:
                    stream.sequences.append(batch.sequence)
                    action = self.script(number, batch)
                    self.cond.notify_all()
                if action == "refuse":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "records[0]: not JSON")
                if action == "hangup":
                    return
                if action == "ack":
                    yield node_pb2.FlowAck(sequence=batch.sequence)
        finally:
            with self.cond:
                stream.ended = True
                self.cond.notify_all()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeController]:
    monkeypatch.setattr(tests.fake_controller, "FakeNodeService", FlowService)
    with FakeController() as controller:
        yield controller


def service(fake: FakeController) -> FlowService:
    assert isinstance(fake.service, FlowService)
    return fake.service


@pytest.fixture
def credentials(fake: FakeController, tmp_path: Path) -> HostCredentials:
    state = tmp_path / "state"
    enroll(fake.enroll_address, fake.token(HOST), fake.ca.fingerprint, state, host=HOST)
    return HostCredentials(state)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", clock=lambda: 1.0)


@pytest.fixture
def start(fake: FakeController, credentials: HostCredentials,
          spool: Spool) -> Iterator[Callable[..., FlowUploader]]:
    started: list[FlowUploader] = []

    def make(**options: float) -> FlowUploader:
        uploader = FlowUploader(spool, credentials, fake.address, backoff_cap=0.2,
                                **options)  # type: ignore[arg-type]
        started.append(uploader.start())
        return uploader

    yield make
    for uploader in started:
        uploader.stop()


def fill(spool: Spool, batches: int, records: int = 3) -> list[int]:
    return [spool.add([f'{{"n":{i},"r":{r}}}'.encode() for r in range(records)])
            for i in range(batches)]


def drained(spool: Spool) -> None:
    poll_until(lambda: True if not spool.pending() else None, TIMEOUT, "an empty spool")


def test_batches_go_in_order_and_are_deleted_once_acknowledged(
        fake: FakeController, spool: Spool, start: Callable[..., FlowUploader]) -> None:
    backlog = fill(spool, 20)
    uploader = start()
    drained(spool)
    live = fill(spool, 5)  # batches closed while connected go at once
    drained(spool)
    streams = service(fake).flow_streams
    assert len(streams) == 1 and streams[0].sequences == backlog + live
    stats = uploader.stats()
    assert (stats.connected, stats.batches, stats.records) == (True, 25, 75)


def test_after_a_broken_stream_sending_resumes_at_the_oldest_unacknowledged(
        fake: FakeController, spool: Spool, start: Callable[..., FlowUploader]) -> None:
    sequences = fill(spool, 12)

    def script(stream: int, batch: node_pb2.FlowBatch) -> str:
        if stream == 0 and batch.sequence == sequences[3]:
            return "hangup"  # the controller went away before storing the fourth batch
        return "ack"

    service(fake).script = script
    uploader = start()
    drained(spool)
    first, second = service(fake).flow_streams
    assert first.sequences[:4] == sequences[:4]
    assert second.sequences == sequences[3:]  # every batch acknowledged exactly once
    assert uploader.stats().batches == 12


def test_at_most_the_window_is_unacknowledged_and_a_silent_controller_is_left(
        fake: FakeController, spool: Spool, start: Callable[..., FlowUploader]) -> None:
    sequences = fill(spool, 10)
    service(fake).script = lambda stream, batch: "ack" if stream > 0 else "silent"
    start(window=4, ack_timeout=0.5)
    drained(spool)
    first, second = service(fake).flow_streams[:2]
    assert first.sequences == sequences[:4]  # no fifth batch without an acknowledgement
    assert second.sequences == sequences  # the stream was recycled; all sent again


def test_a_refused_batch_is_dropped_and_counted_and_the_rest_still_go(
        fake: FakeController, spool: Spool, start: Callable[..., FlowUploader]) -> None:
    sequences = fill(spool, 6, records=4)
    service(fake).script = lambda stream, batch: \
        "refuse" if batch.sequence == sequences[2] else "ack"
    uploader = start()
    drained(spool)
    stats = uploader.stats()
    assert (stats.batches, stats.records, stats.refused) == (5, 20, 4)
    resent = [s for stream in service(fake).flow_streams[1:] for s in stream.sequences]
    assert sequences[2] not in resent and resent[0] == sequences[3]


def test_a_renewed_certificate_is_presented_at_once(
        fake: FakeController, spool: Spool, credentials: HostCredentials,
        start: Callable[..., FlowUploader]) -> None:
    fill(spool, 1)
    start()
    drained(spool)
    credentials.store_certificate(fake.ca.host_certificate(credentials.key.public_key(), HOST))
    fake.service.wait(lambda: len(service(fake).flow_streams) == 2, TIMEOUT)
    assert service(fake).flow_streams[1].peer_serial == credentials.cert.serial_number
    fill(spool, 1)
    drained(spool)


def test_stop_is_prompt_while_the_controller_is_unreachable(
        spool: Spool, credentials: HostCredentials) -> None:
    fill(spool, 2)
    uploader = FlowUploader(spool, credentials, "127.0.0.1:9", backoff_cap=0.2).start()
    stopped = threading.Thread(target=uploader.stop)
    stopped.start()
    stopped.join(TIMEOUT)
    assert not stopped.is_alive()
    assert len(spool.pending()) == 2


def test_metrics_show_the_spool_and_the_upload(
        fake: FakeController, credentials: HostCredentials, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    upload = FlowUpload(tmp_path / "state2", UploadSettings(fake.address, credentials,
                                                            backoff_cap=0.2), registry)
    try:
        upload.sink.on_flow(make_record())
        poll_until(lambda: upload.uploader.stats().records or None, TIMEOUT, "an upload")
        text = generate_latest(registry).decode()
    finally:
        upload.stop()
        upload.sink.close()
    for line in ("ztnet_flow_upload_records_total 1.0", "ztnet_flow_spool_batches 0.0",
                 "ztnet_flow_spool_bytes 0.0", 'ztnet_flow_upload_dropped_total{reason="'
                 'spool_full"} 0.0', "ztnet_flow_upload_connected 1.0"):
        assert line in text, text
