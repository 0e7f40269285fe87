"""Flow records for the controller tests, and a raw ReportFlows client (what
the daemon's uploader does, minus the spool): send batches over a host's
mutual-TLS channel, collect the acks and the status the stream ended with."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tests.controller.support import ControllerProcess, HostIdentity
from ztnet.grants.payload import spiffe_agent_id
from ztnet.observe.records import (
    AgentRef,
    EventType,
    FlowCounters,
    FlowRecord,
    GrantRef,
    Process,
    Verdict,
    from_json,
    record_uuid,
    to_json,
)
from ztnet.v1 import admin_pb2, node_pb2, node_pb2_grpc

NS = 1_000_000_000
_cookies = itertools.count(1000)


def make_record(host: str, *, agent: str = "bot", verdict: Verdict = Verdict.ALLOWED,
                time_ns: int | None = None, event_type: EventType = EventType.CONNECT,
                destination: str = "10.0.0.1", port: int = 443,
                cookie: int | None = None) -> FlowRecord:
    """A record as a daemon on ``host`` would make it (uuid included)."""
    time_ns = time.time_ns() // 1000 * 1000 if time_ns is None else time_ns
    cookie = next(_cookies) if cookie is None else cookie
    allowed = verdict == Verdict.ALLOWED
    flow = (FlowCounters(3, 300, 2, 2000, time_ns - NS, time_ns)
            if event_type == EventType.FLOW_END else None)
    return FlowRecord(
        uuid=record_uuid(host, cookie, event_type, time_ns, destination, port),
        time_ns=time_ns, host=host, event_type=event_type, verdict=verdict,
        drop_reason="GRANTED" if allowed else "NO_GRANT", ip_version=4, proto=6, source="",
        source_port=0, destination=destination, destination_port=port, socket_cookie=cookie,
        cgroup_id=77, process=Process(4242, 4242, "curl", "/usr/bin/curl", 1000),
        agent=AgentRef(agent, spiffe_agent_id("test.example", agent), 1),
        grant=GrantRef(0xABC, 3, "ab" * 32) if allowed else None, flow=flow, suppressed=0)


def encode(records: Sequence[FlowRecord]) -> list[bytes]:
    return [to_json(record).encode() for record in records]


@dataclass
class Reported:
    acks: list[int]
    error: grpc.RpcError | None

    @property
    def code(self) -> grpc.StatusCode | None:
        error: Any = self.error
        return None if error is None else error.code()

    @property
    def details(self) -> str:
        error: Any = self.error
        return "" if error is None else error.details() or ""


def report(controller: ControllerProcess, identity: HostIdentity,
           batches: Sequence[tuple[int, Sequence[FlowRecord] | Sequence[bytes]]],
           timeout: float = 15.0) -> Reported:
    """Send ``(sequence, records)`` batches on one ReportFlows stream."""
    requests = [node_pb2.FlowBatch(sequence=sequence, records=[
        r if isinstance(r, bytes) else to_json(r).encode() for r in records])
        for sequence, records in batches]
    acks: list[int] = []
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        call = node_pb2_grpc.NodeServiceStub(channel).ReportFlows(iter(requests),
                                                                  timeout=timeout)
        try:
            for ack in call:
                acks.append(ack.sequence)
        except grpc.RpcError as exc:
            return Reported(acks, exc)
    return Reported(acks, None)


def query(controller: ControllerProcess, **filters: Any) -> admin_pb2.QueryFlowsResponse:
    with controller.admin() as admin:
        return admin.query_flows(**filters)


def uuids(response: admin_pb2.QueryFlowsResponse) -> list[str]:
    return [from_json(data).uuid for data in response.records]
