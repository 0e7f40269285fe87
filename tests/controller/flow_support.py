"""Flow records for the controller tests, and queries of the flow store. The raw
ReportFlows client (report, Reported) is in ztnet.testing.flows."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

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
from ztnet.pki import spiffe_agent_id
from ztnet.testing.controller import ControllerProcess
from ztnet.v1 import admin_pb2

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
        drop_reason="GRANTED" if allowed else "NO_GRANT",
        ip_version=6 if ":" in destination else 4, proto=6, source="",
        source_port=0, destination=destination, destination_port=port, socket_cookie=cookie,
        cgroup_id=77, process=Process(4242, 4242, "curl", "/usr/bin/curl", 1000),
        agent=AgentRef(agent, spiffe_agent_id("test.example", agent), 1),
        grant=GrantRef(0xABC, 3, "ab" * 32) if allowed else None, flow=flow, suppressed=0)


def encode(records: Sequence[FlowRecord]) -> list[bytes]:
    return [to_json(record).encode() for record in records]


def query(controller: ControllerProcess, **filters: Any) -> admin_pb2.QueryFlowsResponse:
    with controller.admin() as admin:
        return admin.query_flows(**filters)


def uuids(response: admin_pb2.QueryFlowsResponse) -> list[str]:
    return [from_json(data).uuid for data in response.records]
