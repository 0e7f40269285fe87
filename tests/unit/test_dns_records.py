"""DNS queries as flow records: built from the resolver's trace, bounded, encoded and read
back, shown escaped, read by the DNS detectors, and used by `policy suggest` to name hosts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.unit.test_observe_records import NOW, make_ctx
from tests.unit.test_policy_review import record as flow
from ztnet.controller.detect.engine import Engine
from ztnet.controller.detect.observation import observe
from ztnet.daemon.dnsflows import DnsRecords
from ztnet.daemon.resolverconf import QueryRecord
from ztnet.observe.records import (
    MAX_DNS_ITEMS,
    EventType,
    FlowRecord,
    Verdict,
    from_json,
    to_dict,
    to_json,
)
from ztnet.observe.render import cells
from ztnet.observe.suggest import dns_names, suggest
from ztnet.policy.detection import Detection

ROOT = Path(__file__).resolve().parents[2]
ANSWERED = QueryRecord("bot", "api.lab.test", "A", "answered", answers=("203.0.113.10",),
                       stripped=("10.0.0.5 (private)",), grant_ids=(0xABC,), rcode="NOERROR")
REFUSED = QueryRecord("bot", "evil.lab.test", "A", "refused", rcode="REFUSED")


def test_queries_become_records_with_a_dns_object_and_unique_uuids() -> None:
    builder, ctx = DnsRecords(), make_ctx()
    answered, refused = builder.record(ANSWERED, ctx), builder.record(REFUSED, ctx)
    assert answered.event_type is EventType.DNS and answered.verdict is Verdict.ALLOWED
    assert answered.grant is not None and answered.grant.policy_version == 7
    assert (answered.agent.name, answered.agent.index) == ("bot", 1)
    assert answered.agent.spiffe_id == "spiffe://example.org/agent/bot"
    assert to_dict(answered)["dns"] == {
        "name": "api.lab.test", "type": "A", "rcode": "NOERROR", "verdict": "answered",
        "answers": ["203.0.113.10"], "stripped": ["10.0.0.5 (private)"]}
    assert (refused.verdict, refused.drop_reason, refused.grant) == \
        (Verdict.DENIED, "NO_GRANT", None)
    assert refused.dns is not None and refused.dns.rcode == "REFUSED"
    assert answered.uuid != refused.uuid and answered.time_ns < refused.time_ns
    for record in (answered, refused):
        assert from_json(to_json(record)) == record
    assert to_dict(flow("10.0.2.7"))["dns"] is None


def test_sizes_are_bounded_when_built_and_when_read() -> None:
    huge = dataclasses.replace(ANSWERED, name="a" * 400,
                               answers=tuple(f"203.0.113.{i}" for i in range(200)))
    built = DnsRecords().record(huge, make_ctx())
    assert built.dns is not None
    assert len(built.dns.name) == 253 and len(built.dns.answers) == MAX_DNS_ITEMS
    good = json.loads(to_json(DnsRecords().record(ANSWERED, make_ctx())))
    for path, value, needle in ((("name",), "x" * 254, "name"),
                                (("answers",), ["1.2.3.4"] * 65, "answers"),
                                (("answers",), [7], "answers"),
                                (("rcode",), "R" * 17, "rcode")):
        bad = json.loads(json.dumps(good))
        bad["dns"][path[0]] = value
        with pytest.raises(ValueError, match=needle):
            from_json(json.dumps(bad))
    plain = json.loads(to_json(flow("10.0.2.7")))
    plain["dns"] = good["dns"]
    with pytest.raises(ValueError, match="event_type dns"):
        from_json(json.dumps(plain))
    del good["dns"]
    with pytest.raises(ValueError, match="event_type dns"):
        from_json(json.dumps(good))


def test_observe_shows_the_query_escaped() -> None:
    hostile = dataclasses.replace(REFUSED, name="x\x1b[2Jy.lab.test")
    row = " ".join(cells(DnsRecords().record(hostile, make_ctx())))
    assert "\x1b" not in row and "dns" in row and "REFUSED" in row
    shown = " ".join(cells(DnsRecords().record(ANSWERED, make_ctx())))
    assert "api.lab.test A = 203.0.113.10" in shown


def test_dns_records_reach_the_dns_detectors_and_no_other() -> None:
    builder, ctx = DnsRecords(), make_ctx()
    queries = [builder.record(dataclasses.replace(REFUSED, name=f"q{i:03d}.exfil.example"), ctx)
               for i in range(60)]
    observations = [observe(r) for r in queries]
    assert observations[0].dns_name == "q000.exfil.example"
    assert observations[0].dns_rcode == "REFUSED" and not observations[0].is_attempt
    findings = Engine(lambda agent: None).observe(observations, Detection(), NOW)
    assert {f.detector for f in findings} == {"dns-subdomains", "dns-failures"}


def test_suggest_names_the_host_dns_answered_before_the_attempt() -> None:
    builder, ctx = DnsRecords(), make_ctx()
    at_now = flow("10.0.2.7").time_ns  # the test records' clock
    answer = builder.record(ANSWERED, ctx)._replace(time_ns=at_now)
    reached = flow("203.0.113.10", 443, offset=60)
    assert reached.time_ns > answer.time_ns
    before = flow("203.0.113.10", 443, offset=-60)
    assert dns_names([answer, reached]) == {"203.0.113.10": ("api.lab.test",)}
    assert dns_names([before, answer]) == {}  # reached before any answer named it
    assert dns_names([builder.record(REFUSED, ctx), flow("203.0.113.10")]) == {}
    records: list[FlowRecord] = [answer, reached]
    text = suggest(records, "bot", "example.org", dns=dns_names(records))
    assert 'to = "api.lab.test"' in text and "203.0.113.10/32" not in text.split("\n[")[-1]
    assert "127.0.0.1" not in text  # the query itself is no destination to grant


def test_docs_describe_the_dns_object() -> None:
    text = (ROOT / "docs" / "flows.md").read_text()
    fields = [f"dns.{key}" for key in to_dict(DnsRecords().record(ANSWERED, make_ctx()))["dns"]]
    missing = [f for f in ["dns", *fields] if f"`{f}`" not in text]
    assert not missing, f"docs/flows.md does not describe {missing}"


def test_otlp_attributes_carry_the_query() -> None:
    from ztnet.observe.otlp import attributes

    attrs = attributes(DnsRecords().record(ANSWERED, make_ctx()))
    assert (attrs["ztnet.event_type"], attrs["dns.question.name"], attrs["dns.answers"],
            attrs["ztnet.dns.rcode"]) == ("dns", "api.lab.test", ["203.0.113.10"], "NOERROR")
