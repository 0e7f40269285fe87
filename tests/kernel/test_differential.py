"""Randomized differential test: the kernel's verdicts against the reference
evaluator (ztnet.grants.evaluate), on random grant sets and random attempts.

Attempts are non-blocking connect()/sendto() calls made by real agent
processes in a namespace whose routes lead into a discarding interface. The
kernel's verdict is EPERM from a socket hook, or a drop by the egress
backstop, which the agent's drop counter shows: ICMPv6 echo requests sent on
ping sockets pass no socket-level hook (the kernel has none for them), so the
backstop is what stops them, and sendto() still reports success."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztnet.datapath.datapath import Datapath
from ztnet.grants.evaluate import allowed_by
from ztnet.grants.model import Grant, IPAddress, PortRange, Proto
from ztnet.instance import Instance
from ztnet.lab.netns import BlackholeNetns
from ztnet.testing.agents import LineProcess, agent_argv, allow_ping_sockets, traffic_argv

AGENTS = ("alpha", "beta")
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}
EXAMPLES = 120
ATTEMPTS_PER_EXAMPLE = 20  # 2,400 checked attempts in all

V4_NETS = ["10.20.0.0/16", "10.20.1.0/24", "10.20.1.7/32", "10.21.0.0/16", "127.0.0.0/8",
           "127.0.0.1/32", "169.254.169.254/32", "0.0.0.0/0", "10.0.0.0/8"]
V6_NETS = ["fd00:20::/32", "fd00:20:1::/48", "fd00:20:1::7/128", "::1/128", "::/0",
           "fd00:21::/32"]
V4_HOSTS = ["10.20.1.7", "10.20.1.8", "10.20.2.1", "10.21.3.4", "10.99.0.1", "127.0.0.1",
            "169.254.169.254"]
V6_HOSTS = ["fd00:20:1::7", "fd00:20:1::8", "fd00:20:2::1", "fd00:21::4", "fd00:99::1", "::1"]
PORTS = [22, 53, 80, 443, 8000, 8080, 8100, 8101, 65535]
WINDOWS = [(-3600.0, 3600.0), (-3600.0, -1800.0), (1800.0, 3600.0)]  # live, expired, future


@st.composite
def grant_sets(draw: st.DrawFn) -> list[Grant]:
    now = time.time()
    grants = []
    for number in range(draw(st.integers(0, 10))):
        proto = draw(st.sampled_from(list(Proto)))
        network = ipaddress.ip_network(draw(st.sampled_from(V4_NETS + V6_NETS)))
        ports = None
        if proto is not Proto.ICMP and draw(st.booleans()):
            first = draw(st.sampled_from(PORTS))
            ports = PortRange(first, min(65535, first + draw(st.sampled_from([0, 0, 1, 100]))))
        start, end = draw(st.sampled_from(WINDOWS))
        grants.append(Grant(number + 1, draw(st.sampled_from(AGENTS)), proto, network, ports,
                            now + start, now + end))
    return grants


@st.composite
def attempts(draw: st.DrawFn) -> tuple[str, str, str, int]:
    proto = draw(st.sampled_from(list(PROTO_NUMBERS)))
    host = draw(st.sampled_from(V4_HOSTS + V6_HOSTS))
    if proto != "icmp" and ":" not in host and draw(st.integers(0, 4)) == 0:
        host = f"::ffff:{host}"  # IPv4-mapped: must be judged by the IPv4 grants
    return draw(st.sampled_from(AGENTS)), proto, host, draw(st.sampled_from(PORTS))


@pytest.fixture
def blackhole() -> Iterator[BlackholeNetns]:
    with BlackholeNetns() as netns:
        allow_ping_sockets(netns.netns)
        yield netns


@pytest.fixture
def agents(instance: Instance, blackhole: BlackholeNetns,
           datapath: Datapath) -> Iterator[dict[str, LineProcess]]:
    datapath.ensure_agents(AGENTS)
    procs = {name: LineProcess.start(agent_argv(instance, name, traffic_argv("batch"),
                                                netns=blackhole.netns))
             for name in AGENTS}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()


@pytest.fixture
def datapath(instance: Instance) -> Iterator[Datapath]:
    with Datapath.open(instance) as dp:
        yield dp


checked = {"attempts": 0, "allowed": 0}


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(grants=grant_sets(), tries=st.lists(attempts(), min_size=ATTEMPTS_PER_EXAMPLE,
                                          max_size=ATTEMPTS_PER_EXAMPLE))
def test_kernel_verdicts_match_the_reference_evaluator(
        datapath: Datapath, agents: dict[str, LineProcess], grants: list[Grant],
        tries: list[tuple[str, str, str, int]]) -> None:
    datapath.install_unverified(grants)
    now = time.time()
    for agent, proto, host, port in tries:
        dropped_before = datapath.agent_stats()[agent].egress_dropped
        result = str(agents[agent].request([proto, host, port])["result"])
        dropped = datapath.agent_stats()[agent].egress_dropped - dropped_before
        kernel_allows = result != "EPERM" and dropped == 0
        address: IPAddress = ipaddress.ip_address(host)
        expected = allowed_by(grants, agent, PROTO_NUMBERS[proto], address,
                              None if proto == "icmp" else port, now)
        assert kernel_allows == (expected is not None), (
            f"{agent} {proto} {host}:{port} -> kernel {result} (+{dropped} drops), reference "
            f"{'allows via ' + expected.label if expected else 'denies'}; grants={grants}")
        checked["attempts"] += 1
        checked["allowed"] += kernel_allows


def test_differential_run_was_meaningful() -> None:
    """Runs after the property test (file order): it must have exercised
    enough attempts, with both verdicts well represented."""
    if checked["attempts"] == 0:
        pytest.skip("the differential test did not run in this session")
    assert checked["attempts"] >= EXAMPLES * ATTEMPTS_PER_EXAMPLE
    assert 0.05 < checked["allowed"] / checked["attempts"] < 0.95, checked
