"""Real processes in real agent cgroups against the real BPF programs, with
a sniffer on the far side of a veth saying what reached the wire."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kernel.pair_fixtures import AGENT, ALLOWED, CONTROL, DENIED
from tests.kernel.support import grant
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Proto
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.lab.sniff import Sniffer
from ztnet.testing.agents import run_traffic


def control(pair: NetnsPair, proto: str = "tcp") -> None:
    """Positive control: the same path from a process outside any agent."""
    args = ["tcp", pair.b.ipv4, str(CONTROL)] if proto == "tcp" else \
        ["udp", pair.b.ipv4, str(CONTROL)]
    out = subprocess.run(pair.a.argv([sys.executable, "-m", "ztnet.lab.traffic", *args]),
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["result"] == "OK"


def to_port(port: int) -> object:
    return lambda p: p.dport == port


@pytest.mark.escape
def test_tcp_allowed_reaches_peer_denied_is_eperm_and_never_on_the_wire(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess) -> None:
    datapath.install_unverified([grant(1, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "tcp") as sniffer:
        allowed = run_traffic(datapath.instance, AGENT, ["tcp", pair.b.ipv4, str(ALLOWED),
                              "--payload", "hello"], netns=pair.a.netns, user="nobody")
        denied = run_traffic(datapath.instance, AGENT, ["tcp", pair.b.ipv4, str(DENIED)],
                             netns=pair.a.netns, user="nobody")
        control(pair)
        sniffer.wait_for(lambda p: p.dport == CONTROL and p.is_syn)
    packets = sniffer.stop()
    assert allowed["result"] == "OK"
    assert denied["result"] == "EPERM"
    assert any(p.dport == ALLOWED and p.is_syn for p in packets)
    assert not [p for p in packets if p.dport == DENIED]
    stats = datapath.agent_stats()[AGENT]
    assert stats.allowed >= 1 and stats.denied >= 1 and stats.egress_packets >= 3


@pytest.mark.escape
def test_udp_allowed_and_denied_sendto_and_connected(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess) -> None:
    datapath.install_unverified([grant(2, AGENT, Proto.UDP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "udp") as sniffer:
        results = {
            (port, connect): run_traffic(datapath.instance, AGENT,
                                         ["udp", pair.b.ipv4, str(port), *connect],
                                         netns=pair.a.netns, user="nobody")["result"]
            for port in (ALLOWED, DENIED) for connect in ((), ("--connect",))
        }
        control(pair, "udp")
        sniffer.wait_for(lambda p: p.dport == CONTROL)
    packets = sniffer.stop()
    assert results == {(ALLOWED, ()): "OK", (ALLOWED, ("--connect",)): "OK",
                       (DENIED, ()): "EPERM", (DENIED, ("--connect",)): "EPERM"}
    assert len([p for p in packets if p.dport == ALLOWED]) == 2
    assert not [p for p in packets if p.dport == DENIED]


@pytest.mark.escape
def test_icmp_denied_without_grant_and_allowed_with_one(
        datapath: Datapath, pair: NetnsPair) -> None:
    datapath.install_unverified([grant(3, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "icmp") as sniffer:
        denied = run_traffic(datapath.instance, AGENT, ["icmp", pair.b.ipv4], netns=pair.a.netns)
        datapath.install_unverified(
            [*datapath.grants(), grant(4, AGENT, Proto.ICMP, f"{pair.b.ipv4}/32")])
        allowed = run_traffic(datapath.instance, AGENT, ["icmp", pair.b.ipv4], netns=pair.a.netns)
        sniffer.wait_for(lambda p: p.icmp_type == 8)
    packets = sniffer.stop()
    assert denied["result"] == "EPERM"
    assert allowed["result"] == "OK"
    assert len([p for p in packets if p.icmp_type == 8]) == 1


@pytest.mark.escape
def test_raw_socket_packet_from_agent_never_arrives(
        datapath: Datapath, pair: NetnsPair) -> None:
    # Root agent: it may open raw sockets, which no socket-level hook sees.
    datapath.install_unverified([grant(5, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    with Sniffer(pair.b.netns, pair.b.iface, "icmp or icmp6") as sniffer:
        for host in (pair.b.ipv4, pair.b.ipv6):
            run_traffic(datapath.instance, AGENT, ["raw", host], netns=pair.a.netns)
        # positive control: the same raw packet from outside the agent arrives
        subprocess.run(pair.a.argv([sys.executable, "-m", "ztnet.lab.traffic", "raw",
                                    pair.b.ipv4]), check=True, capture_output=True)
        sniffer.wait_for(lambda p: p.icmp_type == 8)
    packets = sniffer.stop()
    assert len([p for p in packets if p.icmp_type == 8]) == 1  # only the control
    assert not [p for p in packets if p.family == 6 and p.icmp_type == 128]
    assert datapath.counters()["egress_drop"] >= 2
    assert datapath.agent_drops()[AGENT]["NO_GRANT"] >= 2  # per agent and reason


@pytest.mark.escape
def test_ipv6_and_ipv4_mapped_denied_unless_granted(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess) -> None:
    mapped = f"::ffff:{pair.b.ipv4}"
    datapath.install_unverified([grant(6, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])

    def attempt(host: str, port: int) -> object:
        return run_traffic(datapath.instance, AGENT, ["tcp", host, str(port)],
                           netns=pair.a.netns, user="nobody")["result"]

    with Sniffer(pair.b.netns, pair.b.iface, "tcp") as sniffer:
        before = {"v6": attempt(pair.b.ipv6, ALLOWED), "mapped-allowed": attempt(mapped, ALLOWED),
                  "mapped-denied": attempt(mapped, DENIED)}
        datapath.install_unverified(
            [*datapath.grants(), grant(7, AGENT, Proto.TCP, f"{pair.b.ipv6}/128", str(ALLOWED))])
        after = {"v6": attempt(pair.b.ipv6, ALLOWED), "v6-other": attempt(pair.b.ipv6, DENIED)}
        control(pair)
        sniffer.wait_for(lambda p: p.dport == CONTROL)
    packets = sniffer.stop()
    assert before == {"v6": "EPERM", "mapped-allowed": "OK", "mapped-denied": "EPERM"}
    assert after == {"v6": "OK", "v6-other": "EPERM"}
    assert not [p for p in packets if p.dport == DENIED]
    assert len([p for p in packets if p.family == 6 and p.is_syn and p.dport == ALLOWED]) == 1


@pytest.mark.escape
def test_forked_setsid_grandchild_stays_confined(
        datapath: Datapath, pair: NetnsPair, server: ServerProcess) -> None:
    datapath.install_unverified([grant(8, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    for port, expected in ((DENIED, "EPERM"), (ALLOWED, "OK")):
        result = run_traffic(datapath.instance, AGENT, ["daemonize", pair.b.ipv4, str(port)],
                             netns=pair.a.netns, user="nobody")
        assert result["result"] == expected
        assert str(result["cgroup"]).endswith(f"/agents/{AGENT}")


@pytest.mark.escape
def test_loopback_and_metadata_get_no_implicit_allow(datapath: Datapath) -> None:
    datapath.install_unverified([grant(9, AGENT, Proto.TCP, "10.0.0.0/8", "443")])
    for host, port in (("127.0.0.1", 22), ("::1", 22), ("169.254.169.254", 80)):
        assert run_traffic(datapath.instance, AGENT, ["tcp", host, str(port)],
                           user="nobody")["result"] == "EPERM", host


def test_run_refuses_when_nothing_is_attached(instance: Instance) -> None:
    proc = subprocess.run([sys.executable, "-m", "ztnet.cli", "run", "--instance", instance.name,
                           "--agent", AGENT, "--dynamic-user", "--", "true"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "refusing to start agent" in proc.stderr


