"""Detection and response against a real controller process: operator quarantine and
release (pushed in the signed bundle, kept across a restart), alerts from reported flows
(stored, listed, followed, audited), automatic quarantine of the reporting host only,
within the cool-down and the rate limit; bad input refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.flow_support import make_record
from ztnet.controller.admin_client import AdminClient
from ztnet.errors import ControllerError
from ztnet.observe.audit import verify
from ztnet.observe.records import Verdict, to_json
from ztnet.testing.controller import ControllerProcess, init_controller
from ztnet.testing.flows import report
from ztnet.testing.nodes import FakeNode, enroll
from ztnet.v1 import admin_pb2

POLICY = """trust_domain = "test.example"
[[agents.bot.allow]]
to = "10.0.0.1/32"
ports = "443"
proto = "tcp"
[[agents.other.allow]]
to = "10.9.0.0/16"
ports = "22"
proto = "tcp"
"""
AUTO = POLICY + """
[detection]
cooldown = "1h"
max_auto_quarantines = 2
[detection.actions]
fan-out = "quarantine"
"""


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    state = init_controller(tmp_path / "state")
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    with ControllerProcess(state, policy=policy) as process:
        yield process


def bot_grants(node: FakeNode) -> tuple[set[str], tuple[str, ...]]:
    bundle = node.verify(push := node.next_push())
    node.ack(push)
    return ({g.agent for g in bundle.grants},
            tuple(q.agent for q in bundle.bundle.quarantine))


def scan(host: str, agent: str = "bot", ports: range = range(1, 26)) -> list:  # type: ignore[type-arg]
    return [make_record(host, agent=agent, verdict=Verdict.DENIED, destination="10.0.0.66",
                        port=port) for port in ports]


def alerts(admin: AdminClient, **filters: object) -> list[admin_pb2.Alert]:
    return list(admin.list_alerts(**filters).alerts)  # type: ignore[arg-type]


def test_quarantine_and_release_are_pushed_signed_and_survive_a_restart(
        controller: ControllerProcess, tmp_path: Path) -> None:
    one, two = enroll(controller, "web-1"), enroll(controller, "web-2")
    with FakeNode(controller, one) as n1, FakeNode(controller, two) as n2, \
            controller.admin() as admin:
        assert bot_grants(n1) == ({"bot", "other"}, ())
        assert bot_grants(n2) == ({"bot", "other"}, ())
        response = admin.quarantine("bot", reason="TICKET-7: scanning", freeze=True)
        assert bot_grants(n1) == ({"other"}, ("bot",))
        assert bot_grants(n2) == ({"other"}, ("bot",))
        listed = admin.list_quarantines().quarantines
        assert [(q.agent, q.host, q.actor, q.freeze) for q in listed] == [
            ("bot", "", "ops", True)]
        assert response.version > 0
    controller.stop()
    controller.start()
    with FakeNode(controller, one) as n1, controller.admin() as admin:
        grants, quarantined = bot_grants(n1)
        assert quarantined == ("bot",) and grants == {"other"}
        released = admin.release("bot", "TICKET-7 closed")
        assert [q.reason for q in released.released] == ["TICKET-7: scanning"]
        bundle = n1.verify(push := n1.next_push())
        n1.ack(push)
        bot = [g for g in bundle.grants if g.agent == "bot"]
        assert bot and bundle.bundle.quarantine == ()
        assert bot[0].not_before >= released.released[0].since  # fresh windows
        with pytest.raises(ControllerError, match="NOT_FOUND.*not quarantined"):
            admin.release("bot")
    kinds = [json.loads(line)["kind"] for line in
             (controller.state.root / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["quarantine", "release"]
    assert verify(controller.state.root / "audit.jsonl").problem is None


def test_bad_quarantine_requests_are_refused_and_change_nothing(
        controller: ControllerProcess) -> None:
    with controller.admin() as admin:
        for kwargs, needle in (({"reason": ""}, "reason"),
                               ({"reason": "x", "host": "nowhere"}, "not an enrolled host"),
                               ({"reason": "x" * 600}, "longer than"),
                               ({"reason": "x", "host": "BAD HOST!"}, "host")):
            with pytest.raises(ControllerError, match=needle):
                admin.quarantine("bot", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ControllerError, match="agent"):
            admin.quarantine("Not An Agent", reason="x")
        assert admin.list_quarantines().quarantines == []


def test_a_reported_scan_raises_an_alert_and_quarantines_on_that_host_only(
        controller: ControllerProcess) -> None:
    one, two = enroll(controller, "web-1"), enroll(controller, "web-2")
    with controller.admin() as admin:
        admin.apply_policy(AUTO)
    followed: list[admin_pb2.Alert] = []
    with FakeNode(controller, one) as n1, FakeNode(controller, two) as n2, \
            controller.admin() as admin:
        bot_grants(n1), bot_grants(n2)

        def follow() -> None:
            with controller.admin() as watcher:
                for alert in watcher.follow_alerts(agent="bot"):
                    followed.append(alert)
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(0.3)  # the follower subscribes; a stored alert would be sent to it too
        records = scan("web-1")
        assert report(controller, one, [(1, records)]).error is None
        (alert,) = [a for a in alerts(admin) if a.detector == "fan-out"]
        assert (alert.agent, alert.host, alert.action) == ("bot", "web-1", "quarantine")
        assert set(alert.evidence) <= {r.uuid for r in records} and len(alert.evidence) == 20
        assert alert.first_evidence_ns == records[0].time_ns
        assert {a.detector for a in alerts(admin)} >= {"fan-out", "denied-burst"}
        assert bot_grants(n1) == ({"other"}, ("bot",))  # quarantined on web-1 ...
        assert bot_grants(n2) == ({"bot", "other"}, ())  # ... and not on web-2
        (q,) = admin.list_quarantines().quarantines
        assert (q.agent, q.host, q.actor, q.alert_id) == ("bot", "web-1", "auto", alert.id)
        follower.join(10)
        assert followed and followed[0].agent == "bot"

        admin.release("bot", "false alarm")
        bot_grants(n1)
        # within the cool-down: the same scan alerts, but quarantines nothing
        assert report(controller, one, [(2, scan("web-1", ports=range(100, 125)))]).error is None
        latest = [a for a in alerts(admin) if a.detector == "fan-out"][-1]
        assert "cool-down" in latest.action and latest.id > alert.id
        assert admin.list_quarantines().quarantines == []
        # another agent on another host: the hourly rate limit (2) still allows one more
        assert report(controller, two, [(1, scan("web-2", "other"))]).error is None
        assert [(q.agent, q.host) for q in admin.list_quarantines().quarantines] == [
            ("other", "web-2")]
        assert report(controller, one, [(3, scan("web-1", "third"))]).error is None
        limited = [a for a in alerts(admin, agent="third") if a.detector == "fan-out"][-1]
        assert "rate limit" in limited.action and limited.host == "web-1"
    kinds = [json.loads(line)["kind"] for line in
             (controller.state.root / "audit.jsonl").read_text().splitlines()]
    assert kinds.count("quarantine") == 2 and "release" in kinds and "alert" in kinds
    controller.stop()
    controller.start()  # the brakes are recalled from the stored alerts
    assert report(controller, two, [(2, scan("web-2", "fourth"))]).error is None
    with controller.admin() as admin:
        recalled = [a for a in alerts(admin, agent="fourth") if a.detector == "fan-out"][-1]
        assert "rate limit" in recalled.action, recalled.action


def test_reported_dns_query_records_reach_the_dns_detectors(
        controller: ControllerProcess) -> None:
    from ztnet.daemon.dnsflows import DnsRecords
    from ztnet.daemon.resolverconf import QueryRecord
    from ztnet.observe.records import RecordContext

    one = enroll(controller, "web-1")
    ctx = RecordContext(host="web-1", trust_domain="test.example", agent_names={1: "bot"})
    made = DnsRecords()
    tunnel = [made.record(QueryRecord("bot", f"c{i:03d}.exfil.example", "TXT", "refused",
                                      rcode="REFUSED"), ctx) for i in range(60)]
    with controller.admin() as admin:
        assert not [a for a in alerts(admin) if a.detector.startswith("dns-")]
        assert report(controller, one, [(1, tunnel)]).error is None
        found = {a.detector: a for a in alerts(admin, agent="bot")}
        assert {"dns-subdomains", "dns-failures"} <= found.keys()
        subdomains = found["dns-subdomains"]
        assert subdomains.host == "web-1" and "exfil.example" in subdomains.summary
        assert set(subdomains.evidence) <= {r.uuid for r in tunnel}
        stored = admin.query_flows(event_type="dns", agent="bot", limit=100)
        assert len(stored.records) == 60
        assert all(json.loads(r)["dns"]["rcode"] == "REFUSED" for r in stored.records)
    # a record whose dns object breaks the bounds refuses the whole batch
    bad = json.loads(to_json(made.record(QueryRecord("bot", "x.example", "A", "refused",
                                                     rcode="REFUSED"), ctx)))
    bad["dns"]["name"] = "a" * 300
    refused = report(controller, one, [(2, [json.dumps(bad).encode()])])
    assert refused.error is not None and "dns.name" in str(refused.error.details())


def test_baselines_are_learnt_shown_and_seeded_from_the_policy(
        controller: ControllerProcess) -> None:
    import io

    from ztnet.cli.response import baseline_reset, baseline_show

    one = enroll(controller, "web-1")
    allowed = [make_record("web-1", destination="10.0.0.1", port=443)]
    assert report(controller, one, [(1, allowed)]).error is None
    with controller.admin() as admin:
        out = io.StringIO()
        baseline_show(admin, "bot", out=out)
        text = out.getvalue()
        assert "learned baseline, learning until" in text and "proto 6 10.0.0.1 port 443" in text
        assert baseline_reset(admin, "bot", from_policy=True, out=io.StringIO()) == 0
        seeded = json.loads(admin.get_baseline("bot").baseline_json)
        assert seeded["source"] == "policy" and seeded["ranges"] == [[6, "10.0.0.1/32", 443, 443]]
        # complete at once: an attempt outside the rules is news
        assert report(controller, one, [(2, [make_record(
            "web-1", destination="10.0.0.9", port=22)])]).error is None
        assert [a.detector for a in alerts(admin, agent="bot")] == ["new-destination"]
        baseline_reset(admin, "bot", out=io.StringIO())
        assert admin.get_baseline("bot").baseline_json == ""
        with pytest.raises(ControllerError, match="NOT_FOUND"):
            admin.reset_baseline("nobody-here", from_policy=True)
    kinds = [json.loads(line)["kind"] for line in
             (controller.state.root / "audit.jsonl").read_text().splitlines()]
    assert kinds.count("baseline.reset") == 2
