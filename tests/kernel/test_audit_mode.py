"""Audit mode in the kernel: what the grants refuse goes ahead (the receiver sees it) and is
recorded with verdict AUDIT, on connect, sendmsg and the egress backstop; loopback and the
metadata service stay refused unless granted; quarantine overrides audit; back in enforce
mode the same attempts fail with EPERM. A differential run checks the kernel against the
reference evaluator's ``decide`` with audited agents."""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernel.pair_fixtures import AGENT, ALLOWED, DENIED
from tests.kernel.support import grant
from ztnet.datapath import abi
from ztnet.datapath.abi import ZtEventKind, ZtReason, ZtVerdict
from ztnet.datapath.datapath import Datapath
from ztnet.datapath.events import EventReader, KernelEvent
from ztnet.grants.evaluate import Decision, decide
from ztnet.grants.model import AgentMode, Grant, IPAddress, PortRange, Proto
from ztnet.instance import Instance
from ztnet.lab.netns import BlackholeNetns, NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import (
    LineProcess,
    agent_argv,
    allow_ping_sockets,
    run_traffic,
    traffic_argv,
)


class Events:
    def __init__(self, datapath: Datapath) -> None:
        self.seen: list[KernelEvent] = []
        self.reader: EventReader = datapath.event_reader(self.seen.append)

    def wait_for(self, predicate: Callable[[KernelEvent], bool], what: str,
                 timeout: float = 10.0) -> KernelEvent:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen:
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} among {len(self.seen)} events: {self.seen}")
            self.reader.poll(100)


def _audit_drops(datapath: Datapath, agent: str) -> int:
    drops = datapath.maps["zt_agent_drops_v1"]
    index = {name: i for i, name in datapath.agent_names().items()}[agent]
    return sum(v.value for v in drops.percpu_values(index * abi.DROP_SLOTS
                                                    + abi.DROP_SLOT_AUDIT, ctypes.c_uint64))


def _traffic(datapath: Datapath, pair: NetnsPair, *args: str) -> str:
    return str(run_traffic(datapath.instance, AGENT, list(args), netns=pair.a.netns,
                           user="nobody")["result"])


@pytest.fixture
def audited(datapath: Datapath, pair: NetnsPair) -> list[Grant]:
    grants = [grant(0xA1, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))]
    datapath.install_unverified(grants, audit={AGENT})
    assert datapath.audited() == {AGENT}
    return grants


def test_audit_mode_lets_refused_traffic_through_and_records_audit(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        audited: list[Grant]) -> None:
    events = Events(datapath)
    # TCP to a port no grant covers: the server sees the connection and the bytes
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED), "--payload", "audited") \
        == "OK"
    server.wait_event(lambda e: e.kind == "data" and e.local[1] == DENIED
                      and e.data == b"audited")
    connect = events.wait_for(lambda e: e.kind == ZtEventKind.CONNECT
                              and e.destination_port == DENIED, "audited connect")
    assert (connect.verdict, connect.reason, connect.grant_id) == \
        (ZtVerdict.AUDIT, ZtReason.NO_GRANT, 0)
    end = events.wait_for(lambda e: e.kind == ZtEventKind.FLOW_END
                          and e.cookie == connect.cookie, "audited flow end")
    assert (end.verdict, end.reason) == (ZtVerdict.AUDIT, ZtReason.NO_GRANT)
    assert end.bytes_out > 0 and end.bytes_in > 0
    # the granted port is still ALLOWED, with its grant
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(ALLOWED)) == "OK"
    allowed = events.wait_for(lambda e: e.kind == ZtEventKind.CONNECT
                              and e.destination_port == ALLOWED, "allowed connect")
    assert (allowed.verdict, allowed.grant_id) == (ZtVerdict.ALLOWED, 0xA1)
    # UDP sendmsg, over IPv6
    assert _traffic(datapath, pair, "udp", pair.b.ipv6, str(DENIED)) == "OK"
    server.wait_event(lambda e: e.kind == "udp" and e.local[1] == DENIED)
    sendmsg = events.wait_for(lambda e: e.kind == ZtEventKind.SENDMSG
                              and e.destination == pair.b.ipv6, "audited sendmsg")
    assert sendmsg.verdict == ZtVerdict.AUDIT


def test_audit_mode_egress_backstop_passes_and_counts(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        audited: list[Grant]) -> None:
    """ICMPv6 echo on a ping socket passes no socket hook: the egress backstop is what
    judges it, and in audit mode it passes it and counts it in the audit slot."""
    before = _audit_drops(datapath, AGENT)
    dropped_before = datapath.agent_stats()[AGENT].egress_dropped
    assert _traffic(datapath, pair, "icmp", pair.b.ipv6) == "OK"
    assert _audit_drops(datapath, AGENT) > before
    assert datapath.agent_stats()[AGENT].egress_dropped == dropped_before
    # enforce mode: the same packet is dropped, and the audit slot stays
    datapath.install_unverified(audited)
    assert datapath.audited() == frozenset()
    audit_count = _audit_drops(datapath, AGENT)
    assert _traffic(datapath, pair, "icmp", pair.b.ipv6) == "OK"  # sendto cannot tell
    assert datapath.agent_stats()[AGENT].egress_dropped > dropped_before
    assert _audit_drops(datapath, AGENT) == audit_count


@pytest.mark.parametrize("destination", ["127.0.0.1", "::1", "169.254.169.254", "0.0.0.0"])
def test_loopback_and_metadata_stay_denied_in_audit_mode(
        datapath: Datapath, pair: NetnsPair, audited: list[Grant], destination: str) -> None:
    events = Events(datapath)
    assert _traffic(datapath, pair, "tcp", destination, "80") == "EPERM"
    denied = events.wait_for(lambda e: e.kind == ZtEventKind.CONNECT
                             and e.destination == destination, "denied connect")
    assert (denied.verdict, denied.reason) == (ZtVerdict.DENIED, ZtReason.NO_GRANT)


def test_a_grant_opens_loopback_in_audit_mode(datapath: Datapath, pair: NetnsPair) -> None:
    datapath.install_unverified([grant(0xB1, AGENT, Proto.TCP, "127.0.0.1/32", "1")],
                                audit={AGENT})
    # nothing listens on port 1 in the agent's namespace: refused by the peer, not by ztnet
    assert _traffic(datapath, pair, "tcp", "127.0.0.1", "1") == "ECONNREFUSED"
    assert _traffic(datapath, pair, "tcp", "127.0.0.1", "2") == "EPERM"


def test_quarantine_overrides_audit(datapath: Datapath, pair: NetnsPair,
                                    server: ServerProcess, audited: list[Grant]) -> None:
    datapath.set_quarantined(AGENT, True)
    try:
        assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "EPERM"
        assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(ALLOWED)) == "EPERM"
        # a re-install keeps the quarantine flag, and audit mode stays set under it
        datapath.install_unverified(audited, audit={AGENT})
        assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "EPERM"
    finally:
        datapath.set_quarantined(AGENT, False)
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "OK"


def test_back_to_enforce_refuses_again(datapath: Datapath, pair: NetnsPair,
                                       server: ServerProcess, audited: list[Grant]) -> None:
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "OK"
    datapath.install_unverified(audited)
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "EPERM"
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(ALLOWED)) == "OK"


# --- differential: kernel against ztnet.grants.evaluate.decide ------------------------------

AGENTS = ("alpha", "beta")
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}
# No 0.0.0.0: the kernel routes a packet to it to loopback (127.0.0.1), so the egress
# backstop judges an ICMP echo to 0.0.0.0 as one to 127.0.0.1 (the connect test above covers
# 0.0.0.0 at the socket hooks, which see it as written).
V4_HOSTS = ["10.20.1.7", "10.21.3.4", "127.0.0.1", "127.9.9.9", "169.254.169.254",
            "169.254.170.2"]
V6_HOSTS = ["fd00:20:1::7", "::1", "fd00:ec2::254", "fd00:ec2::253"]
NETS = ["10.20.0.0/16", "127.0.0.1/32", "169.254.169.254/32", "::1/128", "fd00:20::/32",
        "0.0.0.0/0", "::/0"]
PORTS = [53, 80, 443]
EXAMPLES = 40
ATTEMPTS = 12
tally = {decision: 0 for decision in Decision}


@st.composite
def grant_sets(draw: st.DrawFn) -> list[Grant]:
    now = time.time()
    grants = []
    for number in range(draw(st.integers(1, 5))):
        proto = draw(st.sampled_from(list(Proto)))
        ports = None
        if proto is not Proto.ICMP and draw(st.booleans()):
            first = draw(st.sampled_from(PORTS))
            ports = PortRange(first, first)
        grants.append(Grant(number + 1, draw(st.sampled_from(AGENTS)), proto,
                            ipaddress.ip_network(draw(st.sampled_from(NETS))), ports,
                            now - 3600, now + 3600))
    return grants


@st.composite
def attempts(draw: st.DrawFn) -> tuple[str, str, str, int]:
    return (draw(st.sampled_from(AGENTS)), draw(st.sampled_from(list(PROTO_NUMBERS))),
            draw(st.sampled_from(V4_HOSTS + V6_HOSTS)), draw(st.sampled_from(PORTS)))


@pytest.fixture
def blackhole_agents(instance: Instance, datapath: Datapath) -> Iterator[dict[str, LineProcess]]:
    with BlackholeNetns() as netns:
        allow_ping_sockets(netns.netns)
        datapath.ensure_agents(AGENTS)
        procs = {name: LineProcess.start(agent_argv(instance, name, traffic_argv("batch"),
                                                    netns=netns.netns))
                 for name in AGENTS}
        try:
            yield procs
        finally:
            for proc in procs.values():
                proc.kill()


# derandomized: the same examples every run, so the meaningfulness check below is stable
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(grants=grant_sets(), audit=st.sampled_from([frozenset(), frozenset({"alpha"}),
                                                   frozenset({"beta"}), frozenset(AGENTS)]),
       tries=st.lists(attempts(), min_size=ATTEMPTS, max_size=ATTEMPTS))
def test_kernel_decisions_in_audit_mode_match_the_reference(
        datapath: Datapath, blackhole_agents: dict[str, LineProcess], grants: list[Grant],
        audit: frozenset[str], tries: list[tuple[str, str, str, int]]) -> None:
    datapath.install_unverified(grants, audit=audit)
    now = time.time()
    for agent, proto, host, port in tries:
        dropped_before = datapath.agent_stats()[agent].egress_dropped
        result = str(blackhole_agents[agent].request([proto, host, port])["result"])
        dropped = datapath.agent_stats()[agent].egress_dropped - dropped_before
        kernel_allows = result != "EPERM" and dropped == 0
        address: IPAddress = ipaddress.ip_address(host)
        mode = AgentMode.AUDIT if agent in audit else AgentMode.ENFORCE
        expected, _ = decide(grants, agent, mode, PROTO_NUMBERS[proto], address,
                             None if proto == "icmp" else port, now)
        assert kernel_allows == (expected is not Decision.DENIED), (
            f"{agent} ({mode}) {proto} {host}:{port} -> kernel {result} (+{dropped} drops), "
            f"reference {expected}; grants={grants}")
        tally[expected] += 1


def test_differential_run_saw_every_decision() -> None:
    """Runs after the property test (file order): all three outcomes were exercised."""
    if not any(tally.values()):
        pytest.skip("the audit differential test did not run in this session")
    assert sum(tally.values()) >= EXAMPLES * ATTEMPTS
    assert all(count >= 0.05 * sum(tally.values()) for count in tally.values()), tally


def test_ztnet_agents_shows_the_mode(datapath: Datapath, audited: list[Grant]) -> None:
    import io

    from ztnet.cli.run import agents

    out = io.StringIO()
    assert agents(datapath.instance, out=out) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith(AGENT + " "))
    assert row.split()[-1] == "audit"
    datapath.install_unverified(audited)
    out = io.StringIO()
    agents(datapath.instance, out=out)
    assert out.getvalue().splitlines()[-1].split()[-1] == "enforce"


def test_an_audited_flow_is_kept_across_installs_and_cut_by_quarantine(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess,
        audited: list[Grant]) -> None:
    holder = LineProcess.start(agent_argv(datapath.instance, AGENT, traffic_argv(
        "hold", pair.b.ipv4, str(DENIED), "--limit", "30"), netns=pair.a.netns, user="nobody"))
    try:
        assert holder.read()["event"] == "connected"
        datapath.install_unverified(audited, audit={AGENT})
        assert datapath.cut_unauthorized() == []  # audit mode: nothing to cut
        datapath.set_quarantined(AGENT, True)
        try:
            cut = datapath.cut_unauthorized()
            assert [flow.remote[1] for flow in cut] == [DENIED]
            broken = holder.read()
        finally:
            datapath.set_quarantined(AGENT, False)
    finally:
        holder.kill()
    assert (broken["event"], broken["result"]) == ("broken", "ECONNABORTED"), broken


def test_a_resync_puts_a_cleared_audit_flag_back(datapath: Datapath, pair: NetnsPair,
                                                 server: ServerProcess) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ztnet.grants.bundle import sign_bundle, verify_bundle
    from ztnet.identity import cgroups
    from ztnet.policy.document import parse_policy
    from ztnet.policy.issue import issue_bundle

    key = Ed25519PrivateKey.generate()
    policy = parse_policy(f'trust_domain = "test.example"\n[agents.{AGENT}]\nmode = "audit"\n'
                          f'[[agents.{AGENT}.allow]]\nto = "{pair.b.ipv4}"\nports = "{ALLOWED}"\n',
                          "p.toml")
    bundle = issue_bundle(policy, host="h", version=1, now=time.time(), issuer="t",
                          default_ttl=600)
    verified = verify_bundle(sign_bundle(bundle, key), trusted=[key.public_key()], host="h",
                             min_version=0, now=time.time())
    datapath.install(verified)
    assert datapath.audited() == {AGENT}
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "OK"
    # someone with CAP_BPF clears the flag behind the daemon's back
    key_id = ctypes.c_uint64(cgroups.cgroup_id(datapath.instance.agent_cgroup(AGENT)))
    value = abi.ZtAgent()
    datapath.maps["zt_agents_v1"].lookup(key_id, value)
    value.flags &= ~abi.AGENT_AUDIT
    datapath.maps["zt_agents_v1"].update(key_id, value)
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "EPERM"
    datapath.resync(verified)
    assert datapath.audited() == {AGENT}
    assert _traffic(datapath, pair, "tcp", pair.b.ipv4, str(DENIED)) == "OK"
