"""Hostname grants end to end: real agents resolving through the real socket hooks to a real
`ztnet daemon --dns`, which asks a real upstream resolver in another namespace; the kernel
then admits exactly the addresses that resolver handed that agent.

The agents' resolv.conf names the host's name server, which does not exist in their
namespace: every answer they get proves the redirect."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.kernel.conftest import require, require_bpf
from tests.kernel.support import new_instance
from ztnet.datapath.datapath import Datapath, teardown
from ztnet.datapath.learned import LearnedKey, LearnedValue, boot_ns
from ztnet.instance import Instance
from ztnet.lab.sniff import Sniffer
from ztnet.observe.records import FlowRecord
from ztnet.testing.agents import agent_argv
from ztnet.testing.dnslab import (
    API_V4,
    API_V6,
    BRIEF,
    CDN,
    ECHO_PORT,
    EDGE,
    EVIL,
    PUBLIC,
    SHORT,
    ZERO,
    DnsLab,
    dns_lab,
    policy,
)

STUB = "10.255.255.53"  # any address: the hooks redirect port 53 wherever it points


@pytest.fixture(scope="module")
def lab() -> Iterator[DnsLab]:
    require_bpf()
    instance = new_instance()
    try:
        with dns_lab(instance) as world:
            yield world
    finally:
        teardown(instance)


def learned(lab: DnsLab) -> dict[LearnedKey, LearnedValue]:
    with Datapath.inspect(lab.instance) as dp:
        return dp.learned().entries()


def agent_index(lab: DnsLab, agent: str) -> int:
    with Datapath.inspect(lab.instance) as dp:
        return next(i for i, name in dp.agent_names().items() if name == agent)


def entry_for(lab: DnsLab, agent: str, address: str) -> LearnedValue:
    index = agent_index(lab, agent)
    found = [v for k, v in learned(lab).items() if k.agent == index and str(k.address) == address]
    assert found, f"no kernel entry for {agent} -> {address}"
    return found[0]


def wait_boot_past(deadline_ns: int) -> None:
    """The kernel's clock passing a deadline is the event: nothing else to wait on."""
    while boot_ns() <= deadline_ns:
        time.sleep(max(0.01, (deadline_ns - boot_ns()) / 1e9))


def test_glibc_python_and_node_resolve_through_the_redirect(lab: DnsLab) -> None:
    getent = lab.run(["getent", "ahostsv4", "api.lab.test"])
    assert getent.returncode == 0, getent.stderr
    assert {line.split()[0] for line in getent.stdout.splitlines()} == {API_V4}
    assert set(lab.dnsagent("resolve", "api.lab.test")["addresses"]) == {API_V4, API_V6}
    node = shutil.which("node")
    require(node is not None or os.environ.get("ZTNET_REQUIRE_NODE") != "1",
            "needs node on PATH (ZTNET_REQUIRE_NODE=1)")
    if node is not None:
        script = ("require('dns').lookup('api.lab.test', {all: true}, (e, a) => "
                  "console.log(JSON.stringify({error: e && e.code, "
                  "addresses: (a || []).map(x => x.address)})))")
        result = lab.agent([node, "-e", script])
        assert result["error"] is None and API_V4 in result["addresses"], result
    # each attempt went to port 53 of a server that is not there, and was answered
    assert lab.dnsagent("query", "api.lab.test", "A", STUB)["rcode"] == "NOERROR"
    assert lab.dnsagent("query", "api.lab.test", "A", "127.0.0.53", "--tcp")["rcode"] == \
        "NOERROR"


def test_1000_resolve_then_connect_at_once_never_meet_eperm(lab: DnsLab) -> None:
    # cdn.lab.test hands out the next of three addresses at every query, TTL 1
    result = lab.dnsagent("loop", "cdn.lab.test", str(ECHO_PORT), "1000")
    assert result["outcomes"] == {"OK": 1000}
    index = agent_index(lab, "bot")
    assert {str(k.address) for k in learned(lab) if k.agent == index} >= set(CDN)


def test_an_ungranted_name_is_refused_never_asked_upstream_and_its_address_is_eperm(
        lab: DnsLab) -> None:
    answer = lab.dnsagent("query", "evil.lab.test", "A", STUB)
    assert answer["rcode"] == "REFUSED"
    assert lab.dnsagent("resolve", "evil.lab.test").get("gaierror") is not None
    assert not [q for q in lab.upstream_queries() if q["name"] == "evil.lab.test"]
    assert lab.dnsagent("connect", EVIL, str(ECHO_PORT)) == {"result": "EPERM"}
    refused = [e for e in lab.dns_events() if e["qname"] == "evil.lab.test"]
    assert refused and all(e["verdict"] == "refused" for e in refused)
    # positive control: the address itself is reachable from outside any agent
    control = subprocess.run(lab.pair.a.argv([sys.executable, "-m", "ztnet.testing.dnsagent",
                                              "connect", EVIL, str(ECHO_PORT)]),
                             capture_output=True, text=True, check=True)
    assert json.loads(control.stdout) == {"result": "OK"}


def test_dns_over_tls_is_denied_and_direct_queries_never_leave(lab: DnsLab) -> None:
    mark = len(lab.upstream_queries())
    with Sniffer(lab.pair.b.netns, lab.pair.b.iface, "tcp or udp") as sniffer:
        dot = lab.dnsagent("connect", lab.pair.b.ipv4, "853")
        # straight at the upstream's address: answered, but by ztnet's resolver
        direct = lab.dnsagent("query", "api.lab.test", "A", lab.pair.b.ipv4)
        control = subprocess.run(lab.pair.a.argv([sys.executable, "-m",
                                                  "ztnet.testing.dnsagent", "connect",
                                                  lab.pair.b.ipv4, "853"]),
                                 capture_output=True, text=True, check=True)
        sniffer.wait_for(lambda p: p.dport == 853 and p.is_syn)
    packets = sniffer.stop()
    assert dot == {"result": "EPERM"}
    assert json.loads(control.stdout) == {"result": "ECONNREFUSED"}
    assert len([p for p in packets if p.dport == 853 and p.is_syn]) == 1  # the control's
    assert direct["rcode"] == "NOERROR"
    # what reached the upstream came from the daemon, from a random port, never from 53
    asked = lab.upstream_queries()[mark:]
    assert [q["name"] for q in asked] == ["api.lab.test"], json.dumps(asked)


def test_agent_b_cannot_use_the_addresses_agent_a_resolved(lab: DnsLab) -> None:
    lab.dnsagent("resolve", "api.lab.test")  # bot learns API_V4
    assert lab.dnsagent("connect", API_V4, str(ECHO_PORT)) == {"result": "OK"}
    # other holds the very same grant, but resolved nothing yet
    assert lab.dnsagent("connect", API_V4, str(ECHO_PORT), agent="other") == {"result": "EPERM"}
    # and a name only bot may resolve gets other a REFUSED, not bot's addresses
    assert lab.dnsagent("query", "edge.lab.test", "A", STUB, agent="other")["rcode"] == "REFUSED"
    assert lab.dnsagent("resolve", "api.lab.test", agent="other")["addresses"]
    assert lab.dnsagent("connect", API_V4, str(ECHO_PORT), agent="other") == {"result": "OK"}


def test_a_forged_reply_the_agent_sends_itself_grants_nothing(lab: DnsLab) -> None:
    result = lab.dnsagent("forge", "api.lab.test", EVIL, str(ECHO_PORT))
    assert result == {"forged_reply_received": True, "connect": "EPERM"}
    index = agent_index(lab, "bot")
    assert not [k for k in learned(lab) if k.agent == index and str(k.address) == EVIL]


def test_short_ttl_new_connects_lapse_established_stream_survives(lab: DnsLab) -> None:
    holder = lab.hold("short.lab.test")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert json.loads(holder.stdout.readline()) == {"connected": SHORT}
        entry = entry_for(lab, "bot", SHORT)
        assert entry.not_after_ns < entry.grant_not_after_ns
        # TTL 1 with the daemon's floor of 2 s: the entry lives about 2 s, then lapses
        assert 1.0e9 <= entry.not_after_ns - boot_ns() <= 2.5e9
        wait_boot_past(entry.not_after_ns)
        assert lab.dnsagent("connect", SHORT, str(ECHO_PORT)) == {"result": "EPERM"}
        # the lapsed answer stays in the kernel because this socket needs it: the sweep
        # spares exactly the addresses an agent's socket is connected to
        with Datapath.inspect(lab.instance) as dp:
            in_use = dp.learned_in_use()
        index = agent_index(lab, "bot")
        assert in_use(LearnedKey(index, 6, ipaddress.ip_address(SHORT), ECHO_PORT))
        assert not in_use(LearnedKey(index, 6, ipaddress.ip_address(ZERO), ECHO_PORT))
        holder.stdin.write("still here\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline()) == {"echo": "still here\n"}
    finally:
        holder.kill()
        holder.wait()


def test_ttl_zero_answers_are_not_cached_but_usable_for_the_floor(lab: DnsLab) -> None:
    answer = lab.dnsagent("query", "zero.lab.test", "A", STUB)
    assert answer["answers"] == [["zero.lab.test", "A", 0, [ZERO]]]
    entry = entry_for(lab, "bot", ZERO)
    assert entry.not_after_ns - boot_ns() > 1.0e9
    assert lab.dnsagent("connect", ZERO, str(ECHO_PORT)) == {"result": "OK"}


def test_grant_expiry_caps_entries_and_established_streams(lab: DnsLab) -> None:
    # brief.lab.test: DNS TTL 300 s, but its grant (ttl = "6s") ends first
    lab.publish(policy())  # issued now: brief's grant has its 6 s ahead
    answer = lab.dnsagent("query", "brief.lab.test", "A", STUB)
    ttl = answer["answers"][0][2]
    assert 0 <= ttl <= 6
    entry = entry_for(lab, "bot", BRIEF)
    assert entry.not_after_ns == entry.grant_not_after_ns  # the grant is the cap
    holder = lab.hold("brief.lab.test")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert json.loads(holder.stdout.readline()) == {"connected": BRIEF}
        wait_boot_past(entry.grant_not_after_ns)
        assert lab.dnsagent("connect", BRIEF, str(ECHO_PORT)) == {"result": "EPERM"}
        holder.stdin.write("after the grant\n")
        holder.stdin.flush()
        reply = json.loads(holder.stdout.readline())
        assert "echo" not in reply, reply  # its packets are dropped at egress
    finally:
        holder.kill()
        holder.wait()


def test_cname_chain_in_order_off_chain_records_ignored_loops_bounded(lab: DnsLab) -> None:
    answer = lab.dnsagent("query", "www.lab.test", "A", STUB)
    assert [(name, kind) for name, kind, _, _ in answer["answers"]] == [
        ("www.lab.test", "CNAME"), ("alias.lab.test", "CNAME"), ("edge.lab.test", "A")]
    assert answer["answers"][-1][3] == [EDGE]
    # the upstream added evil.lab.test A EVIL beside the chain: never learned
    index = agent_index(lab, "bot")
    assert not [k for k in learned(lab) if k.agent == index and str(k.address) == EVIL]
    assert lab.dnsagent("connect", EDGE, str(ECHO_PORT)) == {"result": "OK"}
    loop = lab.dnsagent("query", "loop.lab.test", "A", STUB)
    assert loop["rcode"] == "SERVFAIL"


def test_loopback_metadata_and_private_answers_are_stripped_unless_opted_in(
        lab: DnsLab) -> None:
    mixed = lab.dnsagent("query", "mixed.lab.test", "A", STUB)
    assert mixed["answers"] == [["mixed.lab.test", "A", 60, [PUBLIC]]]
    event = [e for e in lab.dns_events() if e["qname"] == "mixed.lab.test"][-1]
    assert sorted(event["stripped"]) == sorted([f"{lab.pair.b.ipv4} (private)",
                                                "169.254.169.254 (metadata)",
                                                "127.0.0.1 (loopback)"])
    assert lab.dnsagent("connect", lab.pair.b.ipv4, str(ECHO_PORT)) == {"result": "EPERM"}
    inside = lab.dnsagent("query", "inside.lab.test", "A", STUB)  # allow_private = true
    assert inside["answers"][0][3] == [lab.pair.b.ipv4]
    assert lab.dnsagent("connect", lab.pair.b.ipv4, str(ECHO_PORT)) == {"result": "OK"}


def test_a_truncated_upstream_answer_is_fetched_over_tcp(lab: DnsLab) -> None:
    answer = lab.dnsagent("query", "big.lab.test", "A", STUB, "--tcp")
    assert answer["rcode"] == "NOERROR" and len(answer["answers"][0][3]) == 32  # the cap
    transports = [q["transport"] for q in lab.upstream_queries() if q["name"] == "big.lab.test"]
    assert transports[:2] == ["udp", "tcp"]
    # over UDP the agent is told to retry over TCP, as glibc then does
    assert lab.dnsagent("query", "big.lab.test", "A", STUB)["tc"] is True


def test_aaaa_answers_admit_ipv6_connects(lab: DnsLab) -> None:
    assert lab.dnsagent("resolve", "api.lab.test", "--family", "6")["addresses"] == [API_V6]
    assert lab.dnsagent("connect", API_V6, str(ECHO_PORT)) == {"result": "OK"}


def test_daemon_restart_under_query_load_answers_nothing_wrong_and_leaks_no_entries(
        instance: Instance) -> None:
    with dns_lab(instance) as lab:
        lab.dnsagent("resolve", "short.lab.test")
        short_id = entry_for(lab, "bot", SHORT).grant_id
        port_before = lab.daemon.wait_event(
            lambda e: e.get("event") == "dns resolver listening" and e.get("agent") == "bot")
        load = subprocess.Popen(
            agent_argv(lab.instance, "bot", [sys.executable, "-m", "ztnet.testing.dnsagent",
                                             "loop", "api.lab.test", str(ECHO_PORT), "0",
                                             "--seconds", "12"],
                       netns=lab.pair.a.netns, user="nobody"),
            stdout=subprocess.PIPE, text=True)
        try:
            lab.daemon.wait_event(lambda e: e.get("event") == "dns query" and
                                  e.get("qname") == "api.lab.test", start=lab.daemon.mark())
            # the new policy drops short.lab.test; the daemon is killed, not told
            lab.publish_file(policy().replace('to = "short.lab.test"', 'to = "gone.lab.test"'))
            lab.restart_daemon()
            out, _ = load.communicate(timeout=300)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        outcomes = json.loads(out.splitlines()[-1])["outcomes"]
        print(f"\nresolve-then-connect across a daemon SIGKILL + restart: {outcomes}")
        # a query may go unanswered while no daemon runs; an answer is never unusable
        assert "EPERM" not in outcomes, outcomes
        assert outcomes.get("OK", 0) > 0, outcomes
        port_after = lab.daemon.wait_event(
            lambda e: e.get("event") == "dns resolver listening" and e.get("agent") == "bot")
        assert port_after["port"] == port_before["port"]  # the kernel's redirect stayed right
        index = agent_index(lab, "bot")
        leaked = [k for k, v in learned(lab).items() if v.grant_id == short_id]
        assert not leaked, leaked
        assert lab.dnsagent("connect", SHORT, str(ECHO_PORT)) == {"result": "EPERM"}
        assert [k for k in learned(lab) if k.agent == index and str(k.address) == API_V4]
        assert lab.dnsagent("loop", "api.lab.test", str(ECHO_PORT), "20")["outcomes"] == \
            {"OK": 20}


def test_flow_records_and_observe_name_the_host_with_the_address(lab: DnsLab) -> None:
    from ztnet.instance import FLOWS_FILE
    from ztnet.observe.records import from_json
    from ztnet.observe.render import cells

    assert lab.dnsagent("resolve", "api.lab.test")["addresses"]
    assert lab.dnsagent("connect", API_V4, str(ECHO_PORT)) == {"result": "OK"}
    path = lab.workdir / "state" / FLOWS_FILE
    deadline = time.monotonic() + 30
    named = []
    while not named:  # the flow log is written by the daemon's pipeline thread
        assert time.monotonic() < deadline, "no named flow record for api.lab.test"
        lines = path.read_text().splitlines() if path.exists() else []
        named = [r for r in map(from_json, lines)
                 if r.destination == API_V4 and r.destination_port == ECHO_PORT
                 and r.destination_names == ("api.lab.test",)]
        time.sleep(0.2)
    shown = [" ".join(cells(r)) for r in named]
    assert any(f"api.lab.test ({API_V4}):{ECHO_PORT}" in line for line in shown), shown


def wait_records(lab: DnsLab, what: str, match: Callable[[FlowRecord], bool]) -> list[FlowRecord]:
    """The flow log's records ``match`` accepts, once there are any (the daemon's pipeline
    thread writes the log)."""
    from ztnet.instance import FLOWS_FILE
    from ztnet.observe.records import from_json

    path = lab.workdir / "state" / FLOWS_FILE
    deadline = time.monotonic() + 30
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [r for r in map(from_json, lines) if match(r)]
        if found:
            return found
        assert time.monotonic() < deadline, f"no flow record of {what} in {path}"
        time.sleep(0.2)


def test_queries_through_the_redirect_are_dns_flow_records_answered_and_refused(
        lab: DnsLab) -> None:
    from ztnet.observe.records import EventType, Verdict
    from ztnet.observe.render import cells

    since = time.time_ns()  # the records of earlier tests' queries are in the log too
    assert lab.dnsagent("query", "api.lab.test", "A", STUB)["rcode"] == "NOERROR"
    assert lab.dnsagent("query", "evil.lab.test", "A", STUB)["rcode"] == "REFUSED"

    def of(name: str) -> Callable[[FlowRecord], bool]:
        return lambda r: r.event_type is EventType.DNS and r.dns is not None \
            and r.dns.name == name and r.agent.name == "bot" and r.time_ns >= since

    (answered, *_) = wait_records(lab, "the api.lab.test query", of("api.lab.test"))
    assert answered.dns is not None
    assert (answered.dns.type, answered.dns.rcode, answered.dns.verdict) == \
        ("A", "NOERROR", "answered")
    assert API_V4 in answered.dns.answers
    assert answered.verdict is Verdict.ALLOWED and answered.grant is not None
    assert (answered.destination, answered.destination_port, answered.proto) == \
        ("127.0.0.1", 53, 17)
    assert answered.agent.index == agent_index(lab, "bot")
    (refused, *_) = wait_records(lab, "the evil.lab.test query", of("evil.lab.test"))
    assert refused.dns is not None
    assert (refused.dns.rcode, refused.dns.verdict, refused.dns.answers) == \
        ("REFUSED", "refused", ())
    assert (refused.verdict, refused.drop_reason, refused.grant) == \
        (Verdict.DENIED, "NO_GRANT", None)
    assert "REFUSED" in " ".join(cells(refused))
