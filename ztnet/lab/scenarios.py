"""The lab's traffic matrix: every attempt each agent host makes in the end-to-end checks
(tests/kernel/test_lab_e2e.py in network namespaces, vagrant/vmcheck.py across VMs), which
agents' policies allow it, and how its witnesses are matched: the wire (a sniffer's
capture) and the controller's flow store.

What each agent's policy allows is written out here, not derived from ztnet/lab/policy.py:
the matrix checks that policy, it must not restate it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ztnet.lab.policy import OPS_BOT as OPS
from ztnet.lab.policy import RESEARCH_BOT as RESEARCH
from ztnet.lab.sniff import CapturedPacket
from ztnet.lab.topology import (
    CONTROL_PORT,
    CONTROLLER_PORT,
    ENROLL_PORT,
    METADATA_IPV4,
    PEER_PORT,
    LabHost,
    Topology,
)
from ztnet.observe.records import EventType, FlowRecord, Verdict

__all__ = [
    "ECHO_REQUESTS", "MATRIX", "OPS", "PAYLOAD", "RAW", "RESEARCH", "SNIFFED", "Attempt",
    "Outcome", "VerdictKey", "agent_packets", "arrived", "control_attempts", "expected_key",
    "sniffed_target", "verdict_key",
]

PAYLOAD = "ztnet-e2e-payload"
ECHO_REQUESTS = (8, 128)  # ICMP and ICMPv6 echo request
SNIFFED = ("api", "exfil")  # the roles whose wire a sniffer watches


@dataclass(frozen=True, slots=True)
class Attempt:
    kind: str  # tcp | udp | icmp | dns | raw
    role: str  # the target host (or "peer": the other agent host, "metadata")
    v6: bool
    port: int
    allowed: frozenset[str]  # the agents whose policy allows it
    # a DNS attempt no address grant covers: with ztnet's resolver on (`ztnet daemon --dns`,
    # as in the lab) the kernel sends it there, which REFUSES the name (no hostname grant)
    redirected: bool = False

    def address(self, topology: Topology, me: LabHost) -> str:
        if self.role == "metadata":
            return METADATA_IPV4
        hosts = topology.agent_hosts_list
        host = next(h for h in hosts if h != me) if self.role == "peer" else \
            topology.host(self.role)
        return host.ipv6 if self.v6 else host.ipv4

    def spec(self, topology: Topology, me: LabHost) -> dict[str, Any]:
        """The attempt as the traffic agent's ``many`` script takes it, from ``me``."""
        spec: dict[str, Any] = {"kind": self.kind, "host": self.address(topology, me),
                                "port": self.port}
        if self.kind == "tcp":
            spec["payload"] = PAYLOAD
        if self.kind == "dns":
            spec["name"] = topology.host("api").fqdn
        return spec

    @property
    def proto(self) -> int:
        return {"tcp": 6, "udp": 17, "dns": 17}.get(self.kind, 58 if self.v6 else 1)


def _a(kind: str, role: str, port: int = 0, *allowed: str, v6: bool = False,
       redirected: bool = False) -> Attempt:
    return Attempt(kind, role, v6, port, frozenset(allowed), redirected)


MATRIX = (
    _a("tcp", "api", 443, RESEARCH), _a("tcp", "api", 8443, OPS),
    _a("tcp", "api", 443, v6=True), _a("tcp", "api", 8443, OPS, v6=True),
    _a("icmp", "api", 0, OPS),
    _a("tcp", "exfil", 4444), _a("tcp", "exfil", 4444, v6=True),
    _a("udp", "exfil", 4444), _a("udp", "exfil", 4444, v6=True),
    _a("tcp", "metadata", 80),
    _a("dns", "dns", 53, RESEARCH, OPS), _a("dns", "dns", 53, v6=True, redirected=True),
    _a("tcp", "ctl", CONTROLLER_PORT), _a("tcp", "ctl", ENROLL_PORT),
    _a("tcp", "peer", PEER_PORT), _a("tcp", "peer", PEER_PORT, v6=True),
)
# as root, through a raw socket: only the egress backstop stands in the way
RAW = (_a("raw", "api", 0, OPS), _a("raw", "exfil", 0))


def control_attempts(topology: Topology) -> list[dict[str, Any]]:
    """The positive controls (unconfined, after the agent traffic): a TCP SYN to the closed
    CONTROL_PORT of each sniffed host, which crosses the wire all the same."""
    return [{"kind": "tcp", "host": topology.host(role).ipv4, "port": CONTROL_PORT}
            for role in SNIFFED]


@dataclass(frozen=True, slots=True)
class Outcome:
    host: LabHost
    attempt: Attempt
    result: dict[str, Any]
    dns_redirect: bool = False  # the host's daemon runs ztnet's resolver (--dns)

    @property
    def agent(self) -> str:
        return self.host.agent

    @property
    def allowed(self) -> bool:
        return self.agent in self.attempt.allowed

    @property
    def redirected(self) -> bool:
        """Sent to ztnet's resolver instead (allowed by the kernel, REFUSED by the resolver,
        nothing on the wire); otherwise denied like any attempt no grant covers."""
        return self.dns_redirect and self.attempt.redirected and not self.allowed


def sniffed_target(outcome: Outcome) -> str | None:
    """The sniffed role whose wire an attempt crosses (the metadata address is routed to the
    exfil host), or None."""
    role = "exfil" if outcome.attempt.role == "metadata" else outcome.attempt.role
    return role if role in SNIFFED else None


def arrived(packets: list[CapturedPacket], topology: Topology,
            outcome: Outcome) -> list[CapturedPacket]:
    """The captured packets of one attempt."""
    attempt, host = outcome.attempt, outcome.host
    source = host.ipv6 if attempt.v6 else host.ipv4
    destination = attempt.address(topology, host)
    return [p for p in packets if p.src == source and p.dst == destination
            and p.proto == attempt.proto
            and (p.dport == attempt.port if attempt.proto in (6, 17)
                 else p.icmp_type in ECHO_REQUESTS)]


def agent_packets(packets: list[CapturedPacket], topology: Topology) -> list[CapturedPacket]:
    """Every captured packet from an agent host but the positive controls (and neighbour
    discovery): each must be explained by an allowed attempt."""
    sources = {a for h in topology.agent_hosts_list for a in (h.ipv4, h.ipv6)}
    return [p for p in packets if p.src in sources and p.dport != CONTROL_PORT
            and (p.proto in (6, 17) or p.icmp_type in ECHO_REQUESTS)]


VerdictKey = tuple[str, str, str, str, str, int]


def verdict_key(r: FlowRecord) -> VerdictKey:
    return (r.host, r.agent.name, r.event_type.value, r.verdict.value, r.destination,
            r.destination_port)


def expected_key(topology: Topology, o: Outcome) -> VerdictKey | None:
    """The verdict record an attempt must leave; None for ping and raw sockets, which pass
    no connect or sendmsg hook (their allowed packets show up as flow ends)."""
    if o.attempt.kind in ("icmp", "raw"):
        return None
    kind = EventType.CONNECT if o.attempt.kind == "tcp" else EventType.SENDMSG
    verdict = Verdict.ALLOWED if o.allowed or o.redirected else Verdict.DENIED
    return (o.host.name, o.agent, kind.value, verdict.value, o.attempt.address(topology, o.host),
            o.attempt.port)
