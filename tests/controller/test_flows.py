"""Flow records through a real controller process over mutual TLS: ReportFlows
stores and acknowledges, drops resends, refuses other hosts' and malformed
records; QueryFlows filters and orders, for admins only; `ztnet flows`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.controller.flow_support import NS, encode, make_record, query, uuids
from tests.controller.test_cli import ztnet
from ztnet.errors import ControllerError
from ztnet.observe.records import EventType, Verdict, from_json, to_dict
from ztnet.testing.controller import ControllerProcess
from ztnet.testing.flows import report
from ztnet.testing.nodes import enroll
from ztnet.v1 import admin_pb2, admin_pb2_grpc


def test_batches_are_stored_and_acknowledged(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-a")
    start = time.time_ns() // 1000 * 1000
    first = [make_record("flows-a", time_ns=start + i * NS) for i in range(3)]
    second = [make_record("flows-a", time_ns=start + (3 + i) * NS, verdict=Verdict.DENIED)
              for i in range(2)]
    result = report(controller, identity, [(1, first), (2, second)])
    assert result.error is None and result.acks == [1, 2]
    response = query(controller, host="flows-a")
    assert uuids(response) == [r.uuid for r in reversed(first + second)]  # newest first
    assert not response.truncated
    assert [from_json(data) for data in response.records[:2]] == second[::-1]  # faithfully


def test_a_resent_batch_is_stored_once(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-resend")
    records = [make_record("flows-resend") for _ in range(3)]
    assert report(controller, identity, [(1, records)]).acks == [1]
    # the ack was lost: the daemon sends the batch again (twice, on a new stream)
    again = report(controller, identity, [(1, records), (1, records)])
    assert again.error is None and again.acks == [1, 1]
    # its spool re-batched them: the same records in a new batch, and one more
    extra = make_record("flows-resend")
    assert report(controller, identity, [(2, [*records, extra])]).acks == [2]
    stored = uuids(query(controller, host="flows-resend"))
    assert sorted(stored) == sorted(r.uuid for r in [*records, extra])
    # at or below the highest sequence is a resend, whatever it holds: acked, not stored
    late = make_record("flows-resend")
    assert report(controller, identity, [(1, [late]), (2, [late])]).acks == [1, 2]
    assert late.uuid not in uuids(query(controller, host="flows-resend"))


def test_records_of_another_host_are_refused(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-honest")
    mine, theirs = make_record("flows-honest"), make_record("flows-victim")
    result = report(controller, identity, [(1, [mine, theirs])])
    assert result.code is grpc.StatusCode.PERMISSION_DENIED and result.acks == []
    assert "records[1].host: host flows-honest may report only its own flows" in \
        result.details
    with controller.admin() as admin:
        everything = admin.query_flows(limit=10_000)
    assert not {mine.uuid, theirs.uuid} & set(uuids(everything))  # nothing of the batch
    # the refused batch did not take its sequence: sent again without the stray record
    assert report(controller, identity, [(1, [mine])]).acks == [1]
    assert uuids(query(controller, host="flows-honest")) == [mine.uuid]


def _variant(host: str, **changes: Any) -> bytes:
    data = to_dict(make_record(host))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize("bad, message", [
    (b"not json", "records[1]: not JSON"),
    (b"[1, 2]", "records[1]: bad flow record: record is not an object"),
    (None, "records[1]: unsupported schema_version 2"),
    (b"{}", "records[1]: bad flow record: 'schema_version'"),
    ("uuid", "records[1].uuid: '00000000-0000-0000-0000-000000000000' is not the record's"),
    ("time", "records[1]: time is after 2262"),
], ids=["json", "array", "schema", "empty", "uuid", "time"])
def test_a_malformed_record_refuses_its_batch(controller: ControllerProcess,
                                              bad: bytes | str | None, message: str) -> None:
    host = "flows-malformed"
    identity = enroll(controller, host)
    if bad is None:
        bad = _variant(host, schema_version=2)
    elif bad == "uuid":
        bad = _variant(host, uuid="00000000-0000-0000-0000-000000000000")
    elif bad == "time":
        bad = _variant(host, time="2300-01-01T00:00:00Z")
    assert isinstance(bad, bytes)
    good = make_record(host)
    result = report(controller, identity, [(1, [*encode([good]), bad])])
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT and result.acks == []
    assert result.details.startswith(message), result.details
    assert good.uuid not in uuids(query(controller, host=host))


def test_a_batch_needs_a_sequence(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-sequence")
    result = report(controller, identity, [(0, [make_record("flows-sequence")])])
    assert result.code is grpc.StatusCode.INVALID_ARGUMENT
    assert result.details.startswith("sequence: 0 is not a batch sequence")


def test_a_reenrolled_host_starts_its_sequence_again(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-reborn")
    old = make_record("flows-reborn")
    assert report(controller, identity, [(7, [old])]).acks == [7]
    identity = enroll(controller, "flows-reborn")  # a new host key, a new spool
    new = make_record("flows-reborn")
    assert report(controller, identity, [(1, [new, old])]).acks == [1]
    assert sorted(uuids(query(controller, host="flows-reborn"))) == sorted([old.uuid, new.uuid])


def _query_host(controller: ControllerProcess, records: int) -> tuple[list[Any], int]:
    """Records of host flows-query, newest first as queries answer, and their base time."""
    host = "flows-query"
    identity = enroll(controller, host)
    base = (time.time_ns() - 3600 * NS) // 1000 * 1000  # an hour ago
    kinds = [("bot", Verdict.ALLOWED, EventType.CONNECT), ("bot", Verdict.DENIED,
             EventType.CONNECT), ("other", Verdict.ALLOWED, EventType.SENDMSG),
             ("other", Verdict.DENIED, EventType.CONNECT), ("bot", Verdict.ALLOWED,
             EventType.FLOW_END)]
    made = [make_record(host, agent=agent, verdict=verdict, event_type=kind,
                        time_ns=base + i * NS)
            for i, (agent, verdict, kind) in enumerate(kinds * (records // len(kinds)))]
    # stored in another order than their times: queries order by arrival (the
    # controller's clock: a host cannot date its records above the others'),
    # then by time within one batch
    shuffled = made[1::2] + made[0::2]
    assert report(controller, identity, [(1, shuffled[:5]), (2, shuffled[5:])]).acks == [1, 2]
    batch = {r.uuid: 1 if i < 5 else 2 for i, r in enumerate(shuffled)}
    return sorted(made, key=lambda r: (batch[r.uuid], r.time_ns), reverse=True), base


def test_query_filters_and_newest_first(controller: ControllerProcess) -> None:
    newest, base = _query_host(controller, 10)
    made = newest

    def q(**filters: Any) -> list[str]:
        return uuids(query(controller, host="flows-query", **filters))

    def expect(keep: Any) -> list[str]:
        return [r.uuid for r in newest if keep(r)]

    assert q() == expect(lambda r: True)
    assert q(agent="bot") == expect(lambda r: r.agent.name == "bot")
    assert q(verdict="DENIED") == expect(lambda r: r.verdict == Verdict.DENIED)
    assert q(verdict="dropped") == q(verdict="DENIED")  # Hubble's word
    assert q(agent="other", verdict="ALLOWED") == \
        expect(lambda r: r.agent.name == "other" and r.verdict == Verdict.ALLOWED)
    assert q(event_type="flow_end") == expect(lambda r: r.event_type == EventType.FLOW_END)
    assert q(since_ns=base + 4 * NS) == expect(lambda r: r.time_ns >= base + 4 * NS)
    assert q(since_ns=base + 2 * NS, until_ns=base + 5 * NS) == \
        expect(lambda r: base + 2 * NS <= r.time_ns < base + 5 * NS)
    assert q(agent="nobody") == []
    limited = query(controller, host="flows-query", limit=3)
    assert uuids(limited) == expect(lambda r: True)[:3] and limited.truncated
    exact = query(controller, host="flows-query", limit=len(made))
    assert len(exact.records) == len(made) and not exact.truncated


@pytest.mark.parametrize("request_fields, message", [
    ({"verdict": "maybe"}, "verdict: bad verdict 'maybe'"),
    ({"event_type": "accept"}, "event_type: bad kind 'accept'"),
    ({"limit": 10_001}, "limit: 10001 is above the maximum of 10000"),
    ({"since_ns": 2**63}, "since_ns: after 2262"),
])
def test_bad_queries_are_refused(controller: ControllerProcess, request_fields: dict[str, Any],
                                 message: str) -> None:
    with controller.admin() as admin, pytest.raises(ControllerError) as excinfo:
        admin.query_flows(**request_fields)
    assert f"INVALID_ARGUMENT: {message}" in str(excinfo.value)


def test_only_admins_may_query_flows(controller: ControllerProcess) -> None:
    identity = enroll(controller, "flows-nosy")
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            admin_pb2_grpc.AdminServiceStub(channel).QueryFlows(
                admin_pb2.QueryFlowsRequest(), timeout=10)
    error: Any = excinfo.value
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "is a host certificate; this RPC needs an admin certificate" in error.details()


def test_the_flows_command(controller: ControllerProcess) -> None:
    host = "flows-cli"
    identity = enroll(controller, host)
    now = time.time_ns() // 1000 * 1000
    old = make_record(host, agent="bot", time_ns=now - 3600 * NS)  # an hour ago
    allowed = make_record(host, agent="bot", time_ns=now - 2 * NS, port=443)
    denied = make_record(host, agent="bot", time_ns=now - NS, verdict=Verdict.DENIED,
                         destination="203.0.113.9", port=22)
    assert report(controller, identity, [(1, [denied, old, allowed])]).acks == [1]
    where: list[str | Path] = ["--controller", controller.address, "--credentials",
                               controller.admin_dir, "--host", host]

    table = ztnet("flows", *where, "--since", "10m")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "AGENT", "PROCESS"]  # `ztnet observe`'s table
    assert len(lines) == 3 and "10.0.0.1:443" in lines[1] and "g-0000000000000abc" in lines[1]
    assert "DENIED" in lines[2] and "203.0.113.9:22" in lines[2] and "NO_GRANT" in lines[2]

    as_json = ztnet("flows", *where, "--verdict", "denied", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert [from_json(line) for line in as_json.stdout.splitlines()] == [denied]

    newest = ztnet("flows", *where, "--limit", "2", "--json")
    assert [from_json(line).uuid for line in newest.stdout.splitlines()] == \
        [allowed.uuid, denied.uuid]  # the newest two, shown oldest first
    assert "showing the newest 2; more match" in newest.stderr

    none = ztnet("flows", *where, "--agent", "nobody")
    assert none.returncode == 0 and none.stdout == "" and "no matching flows" in none.stderr
    bad = ztnet("flows", *where, "--verdict", "maybe")
    assert bad.returncode == 2 and "bad verdict 'maybe'" in bad.stderr
