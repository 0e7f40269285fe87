"""Cut the established flows of agents that no grant covers any more.

The egress program already drops their packets; destroying the sockets
(inet_diag SOCK_DESTROY, via `ss -K`) makes the application see an error at
once instead of retransmitting into the void. Sockets are found through each
agent process's own /proc/<pid>/net tables, so agents in other network
namespaces are covered, and `ss` runs inside that namespace.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ztnet.grants.evaluate import allowed_by, audit_protected
from ztnet.grants.model import Grant, IPAddress
from ztnet.identity import cgroups
from ztnet.instance import Instance

_TCP_ESTABLISHED, _TCP_SYN_SENT = 0x01, 0x02
_FLOWING = frozenset({_TCP_ESTABLISHED, _TCP_SYN_SENT})
# A cut flow may be half-closed by now (its holder's data waits in the send buffer):
# FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
_OPEN = _FLOWING | {0x04, 0x05, 0x08, 0x09, 0x0B}
_TABLES = (("tcp", 6), ("tcp6", 6), ("udp", 17), ("udp6", 17))


@dataclass(frozen=True, slots=True)
class FlowSocket:
    agent: str
    pid: int
    netns: str
    proto: int
    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]


def _parse_address(text: str) -> tuple[IPAddress, int]:
    address_hex, port_hex = text.split(":")
    raw = bytes.fromhex(address_hex)
    # /proc prints each 32-bit word in host (little-endian) order
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(packed)
    return address, int(port_hex, 16)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def agent_flows(instance: Instance, states: frozenset[int] = _FLOWING) -> list[FlowSocket]:
    """Connected TCP and UDP sockets owned by agent processes (TCP: in ``states``)."""
    flows: dict[tuple[str, str], FlowSocket] = {}
    for agent, path in cgroups.agent_cgroups(instance).items():
        for pid in cgroups.pids(path):
            inodes = _socket_inodes(pid)
            try:
                netns = os.readlink(f"/proc/{pid}/ns/net")
            except OSError:
                continue
            for table, proto in _TABLES:
                try:
                    lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
                except OSError:
                    continue
                for line in lines:
                    fields = line.split()
                    state, inode = int(fields[3], 16), fields[9]
                    if inode not in inodes or (netns, inode) in flows:
                        continue
                    if state not in states:
                        continue
                    flows[(netns, inode)] = FlowSocket(
                        agent, pid, netns, proto,
                        _parse_address(fields[1]), _parse_address(fields[2]),
                    )
    return list(flows.values())


def _ss_filter(flow: FlowSocket) -> list[str]:
    def addr(a: IPAddress) -> str:
        return f"[{a}]" if a.version == 6 else str(a)

    return [
        "src", addr(flow.local[0]), "sport", "=", f":{flow.local[1]}",
        "dst", addr(flow.remote[0]), "dport", "=", f":{flow.remote[1]}",
    ]


def destroy(flow: FlowSocket) -> bool:
    kind = "-t" if flow.proto == 6 else "-u"
    argv = ["nsenter", f"--net=/proc/{flow.pid}/ns/net", "ss", "-K", "-n", kind,
            *_ss_filter(flow)]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return result.returncode == 0


def _plain(address: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d (a dual-stack socket's view of IPv4) as a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def destroy_matching(instance: Instance, proto: int, local: tuple[IPAddress, int],
                     remote: tuple[IPAddress, int]) -> list[FlowSocket]:
    """Destroy the agent sockets of (proto, local, remote): what a byte budget cut
    (the kernel already drops their packets). Returns those destroyed."""
    want = ((_plain(local[0]), local[1]), (_plain(remote[0]), remote[1]))
    cut = []
    for flow in agent_flows(instance, _OPEN):
        have = ((_plain(flow.local[0]), flow.local[1]), (_plain(flow.remote[0]), flow.remote[1]))
        if flow.proto == proto and have == want and destroy(flow):
            cut.append(flow)
    return cut


def cut_unauthorized(instance: Instance, grants: Iterable[Grant], now: float, *,
                     audited: frozenset[str] = frozenset(),
                     also_allowed: Callable[[FlowSocket], bool] | None = None,
                     ) -> list[FlowSocket]:
    """Destroy every agent flow that ``grants`` no longer allow at ``now`` (and that
    ``also_allowed``, if given, does not admit either). Agents in audit mode keep their
    flows (the kernel lets them through: nothing to cut)."""
    grants = tuple(grants)
    cut = []
    for flow in agent_flows(instance):
        address, port = flow.remote
        if flow.agent in audited and not audit_protected(address):
            continue
        if allowed_by(grants, flow.agent, flow.proto, address, port, now) is None \
                and not (also_allowed is not None and also_allowed(flow)):
            if destroy(flow):
                cut.append(flow)
    return cut
