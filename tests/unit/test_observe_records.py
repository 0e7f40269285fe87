"""Flow records from kernel events, and their one JSON schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ztnet.datapath.abi import ZtEventKind, ZtFamily, ZtReason, ZtVerdict
from ztnet.datapath.events import KernelEvent
from ztnet.observe.records import (
    CachedExe,
    EventType,
    FlowRecord,
    GrantInfo,
    RecordContext,
    Verdict,
    format_rfc3339,
    from_event,
    from_json,
    grant_infos,
    parse_time,
    to_dict,
    to_json,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.25  # 2027-01-15, exactly representable
KEY_ID = "ab" * 32


def make_event(**overrides: Any) -> KernelEvent:
    fields: dict[str, Any] = dict(
        kind=ZtEventKind.CONNECT, verdict=ZtVerdict.ALLOWED, reason=ZtReason.GRANTED,
        time=NOW, cookie=4711, cgroup_id=9001, grant_id=0xABC, agent_index=1, pid=1235,
        tgid=1234, uid=65534, comm="curl", proto=6, family=ZtFamily.V4, source="",
        source_port=0, destination="10.0.2.7", destination_port=443, suppressed=0,
        packets_out=0, bytes_out=0, packets_in=0, bytes_in=0, first_seen=0.0, last_seen=0.0)
    fields.update(overrides)
    return KernelEvent(**fields)


def make_ctx(**overrides: Any) -> RecordContext:
    fields: dict[str, Any] = dict(
        host="web-1", trust_domain="example.org", agent_names={1: "bot", 2: "other"},
        grants=grant_infos([0xABC], 7, KEY_ID), exe=lambda tgid: f"/usr/bin/exe-{tgid}")
    fields.update(overrides)
    return RecordContext(**fields)


def denied_event(**overrides: Any) -> KernelEvent:
    return make_event(**{"verdict": ZtVerdict.DENIED, "reason": ZtReason.NO_GRANT,
                         "grant_id": 0, "destination_port": 9090, **overrides})


def flow_end_event(**overrides: Any) -> KernelEvent:
    return make_event(**{"kind": ZtEventKind.FLOW_END, "time": NOW + 2, "source": "10.0.1.5",
                         "source_port": 40000, "packets_out": 5, "bytes_out": 1300,
                         "packets_in": 4, "bytes_in": 2600, "first_seen": NOW,
                         "last_seen": NOW + 1.5, **overrides})


def make_record(**overrides: Any) -> FlowRecord:
    """A record from make_event(**overrides) in make_ctx()."""
    return from_event(make_event(**overrides), make_ctx())


def test_an_allowed_connect_carries_process_agent_and_grant() -> None:
    record = from_event(make_event(), make_ctx())
    assert record.event_type == EventType.CONNECT and record.verdict == Verdict.ALLOWED
    assert record.drop_reason == "GRANTED" and record.host == "web-1"
    assert record.time_ns == 1_800_000_000_250_000_000
    assert (record.process.pid, record.process.tid) == (1234, 1235)  # pid is the tgid
    assert record.process.exe == "/usr/bin/exe-1234" and record.process.uid == 65534
    assert record.agent.name == "bot" and record.agent.spiffe_id == \
        "spiffe://example.org/agent/bot"
    assert record.grant is not None and record.grant.name == "g-0000000000000abc"
    assert (record.grant.policy_version, record.grant.key_id) == (7, KEY_ID)
    assert record.flow is None and record.suppressed == 0
    data = to_dict(record)
    assert data["l4"] == {"TCP": {"source_port": 0, "destination_port": 443}}
    assert data["IP"] == {"source": "", "destination": "10.0.2.7", "ipVersion": "IPv4"}
    assert data["source"]["identity"] == "spiffe://example.org/agent/bot"
    assert data["traffic_direction"] == "EGRESS" and data["flow"] is None


def test_a_denied_attempt_carries_its_reason_and_suppressed_count() -> None:
    record = from_event(denied_event(suppressed=41), make_ctx())
    assert record.verdict == Verdict.DENIED and record.drop_reason == "NO_GRANT"
    assert record.grant is None and record.suppressed == 41
    assert to_dict(record)["grant"] is None


def test_an_unknown_grant_keeps_its_id_without_metadata() -> None:
    record = from_event(make_event(grant_id=0x99), make_ctx())
    assert record.grant is not None and record.grant.name == "g-0000000000000099"
    assert (record.grant.policy_version, record.grant.key_id) == (0, "")


def test_sendmsg_over_ipv6_udp() -> None:
    record = from_event(make_event(kind=ZtEventKind.SENDMSG, proto=17, family=ZtFamily.V6,
                                   destination="fd00::7", destination_port=53), make_ctx())
    data = to_dict(record)
    assert data["event_type"] == "sendmsg" and data["IP"]["ipVersion"] == "IPv6"
    assert data["l4"] == {"UDP": {"source_port": 0, "destination_port": 53}}


def test_icmpv6_is_reported_as_its_own_protocol() -> None:
    record = from_event(make_event(kind=ZtEventKind.SENDMSG, proto=1, family=ZtFamily.V6,
                                   destination="fd00::7", destination_port=0), make_ctx())
    assert record.proto == 58 and "ICMPv6" in to_dict(record)["l4"]
    assert "ICMPv4" in to_dict(from_event(make_event(proto=1), make_ctx()))["l4"]


def test_a_flow_end_carries_the_counters() -> None:
    record = from_event(flow_end_event(), make_ctx())
    assert record.event_type == EventType.FLOW_END and record.flow is not None
    assert (record.flow.packets_out, record.flow.bytes_out) == (5, 1300)
    assert (record.flow.packets_in, record.flow.bytes_in) == (4, 2600)
    assert record.flow.duration_ns == 1_500_000_000
    flow = to_dict(record)["flow"]
    assert flow["first_seen"] == "2027-01-15T08:00:00.250000000Z"
    assert flow["last_seen"] == "2027-01-15T08:00:01.750000000Z"
    assert flow["duration_ns"] == 1_500_000_000
    assert to_dict(record)["IP"]["source"] == "10.0.1.5"


def test_a_process_outside_any_agent_has_no_agent_identity() -> None:
    record = from_event(denied_event(reason=ZtReason.NOT_AGENT, agent_index=0), make_ctx())
    assert record.agent.name == "" and record.agent.spiffe_id == ""
    assert to_dict(record)["source"] == {"identity": "", "labels": ["reserved:unmanaged"]}
    # the kernel reports index 0 for a non-agent; even if 0 were mapped, no name is invented
    ctx = make_ctx(agent_names={0: "ghost"})
    assert from_event(denied_event(reason=ZtReason.NOT_AGENT, agent_index=0), ctx).agent.name \
        == ""


def test_an_agent_whose_name_is_gone_keeps_its_index() -> None:
    record = from_event(flow_end_event(agent_index=5), make_ctx())
    assert (record.agent.name, record.agent.index) == ("", 5)


@pytest.mark.parametrize("event", [make_event(), denied_event(suppressed=3), flow_end_event(),
                                   make_event(kind=ZtEventKind.SENDMSG, proto=17),
                                   make_event(proto=1, family=ZtFamily.V6,
                                              destination="fd00::1", destination_port=0),
                                   make_event(proto=132)],
                         ids=["connect", "denied", "flow_end", "sendmsg", "icmpv6", "sctp"])
def test_every_kind_round_trips_through_json(event: KernelEvent) -> None:
    record = from_event(event, make_ctx())
    line = to_json(record)
    assert "\n" not in line
    assert from_json(line) == record
    assert from_json(line.encode()) == record


def test_the_uuid_is_a_deterministic_uuid5() -> None:
    a, b = from_event(make_event(), make_ctx()), from_event(make_event(), make_ctx())
    assert a.uuid == b.uuid and re.fullmatch(r"[0-9a-f-]{36}", a.uuid) and a.uuid[14] == "5"
    assert from_event(make_event(time=NOW + 1), make_ctx()).uuid != a.uuid
    assert from_event(make_event(cookie=1), make_ctx()).uuid != a.uuid
    assert from_event(make_event(), make_ctx(host="web-2")).uuid != a.uuid
    assert from_event(flow_end_event(time=NOW), make_ctx()).uuid != a.uuid


def test_times_are_rfc3339_with_nanoseconds() -> None:
    assert format_rfc3339(1_800_000_000_123_456_789) == "2027-01-15T08:00:00.123456789Z"
    assert parse_time("2027-01-15T08:00:00.123456789Z") == 1_800_000_000_123_456_789
    assert parse_time("2027-01-15T09:30:00.5+01:30") == 1_800_000_000_500_000_000
    assert parse_time("2027-01-15T08:00:00Z") == 1_800_000_000 * 10**9
    for bad in ("2027-01-15 08:00:00Z", "2027-13-01T00:00:00Z", "yesterday",
                # the daemon's own form (parsed by a shorter path) is checked as strictly
                "2027-13-01T00:00:00.123456789Z", "2027-01-15 08:00:00.123456789Z",
                "2027-01-15T08:00:00.1234-6789Z"):
        with pytest.raises(ValueError, match=f"bad time '{bad}'"):
            parse_time(bad)
    for ns in (0, 1, 1_800_000_000_123_456_789, 1_800_000_000_999_999_999):
        assert parse_time(format_rfc3339(ns)) == ns


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(schema_version=2),
    lambda d: d.update(drop_reason="BECAUSE"),
    lambda d: d.update(verdict="MAYBE"),
    lambda d: d["process"].update(pid=-1),
    lambda d: d["process"].update(pid="1"),
    lambda d: d.update(l4={}),
    lambda d: d.update(time="soon"),
    lambda d: d.pop("uuid"),
    lambda d: d.update(grant={"id": "g-xyz", "policy_version": 1, "key_id": ""}),
])
def test_from_json_rejects_what_the_schema_does_not_allow(mutate: Any) -> None:
    data = to_dict(make_record())
    mutate(data)
    with pytest.raises(ValueError):
        from_json(json.dumps(data))


def test_from_json_rejects_non_json() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        from_json("{")
    with pytest.raises(ValueError):
        from_json("[]")


def test_cached_exe_remembers_processes_that_exited() -> None:
    alive = {10: "/usr/bin/curl"}
    exe = CachedExe(lambda tgid: alive.get(tgid, ""), size=2)
    assert exe(10) == "/usr/bin/curl"
    del alive[10]
    assert exe(10) == "/usr/bin/curl" and exe(11) == ""
    alive.update({12: "/a", 13: "/b"})
    exe(12), exe(13)
    assert exe(10) == ""  # evicted: the cache is bounded


def test_grant_infos_maps_every_grant_of_a_bundle() -> None:
    assert grant_infos([1, 2], 9, "k") == {1: GrantInfo(9, "k"), 2: GrantInfo(9, "k")}


def _keys(value: Any, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            keys.add(f"{prefix}{key}")
            keys |= _keys(inner, f"{prefix}{key}.")
    return keys


def test_docs_describe_every_field_and_reason() -> None:
    text = (ROOT / "docs" / "flows.md").read_text()
    records = [from_event(e, make_ctx()) for e in (make_event(), flow_end_event())]
    fields = set().union(*(_keys(to_dict(r)) for r in records))
    fields |= {"l4.UDP", "l4.ICMPv4", "l4.ICMPv6", "l4.OTHER", "l4.OTHER.protocol"}
    fields -= {"l4.TCP.source_port", "l4.TCP.destination_port"}
    missing = {f for f in fields if f"`{f}`" not in text}
    assert not missing, f"docs/flows.md does not describe {sorted(missing)}"
    assert all(f"`{reason.name}`" in text for reason in ZtReason)


def test_replace_keeps_records_comparable() -> None:
    record = make_record()
    assert record._replace(suppressed=1) != record


def test_observe_never_imports_bcc() -> None:
    code = ("import sys, ztnet.observe.records, ztnet.observe.sinks, ztnet.observe.audit, "
            "ztnet.observe.metrics, ztnet.observe.query, ztnet.observe.render, ztnet.cli; "
            "sys.exit('bcc' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
