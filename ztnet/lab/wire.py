"""What really crossed the lab's wire: sniffers on the api and exfil hosts, and the kernel's
own drop counter.

A capture that shows nothing proves nothing until it has shown something (sniff.py): every
absence claimed here is claimed only after an unconfined *positive control* — a TCP SYN from
the same agent host to port 9 (CONTROL_PORT, closed: the SYN still crosses the wire) — was
captured after the traffic under test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from ztnet.errors import LabError
from ztnet.lab.cluster import Lab
from ztnet.lab.sniff import CapturedPacket, Sniffer
from ztnet.lab.topology import CONTROL_PORT, HOST_IFACE, LabHost, Role

SNIFFED = (Role.API, Role.EXFIL)
_PROTOS = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMP"}
_ECHO_REQUESTS = (8, 128)  # ICMP and ICMPv6 echo request: neighbour discovery is not traffic


def control_from(host: LabHost) -> Callable[[CapturedPacket], bool]:
    """Matches the positive control :meth:`Wire.control` sends from ``host``."""
    return lambda p: p.src == host.ipv4 and p.dport == CONTROL_PORT


class Wire:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        topo = lab.topology
        self.sniffed = {role: topo.by_role(role)[0] for role in SNIFFED}
        self.sniffers = {role: Sniffer(topo.netns(host), HOST_IFACE)
                         for role, host in self.sniffed.items()}
        self.agent_addresses = {address: host.name for host in topo.agent_hosts_list
                                for address in (host.ipv4, host.ipv6)}
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the captures in the background (scapy takes a second or two to load)."""
        def start(sniffer: Sniffer) -> None:
            try:
                sniffer.start()
            except BaseException as exc:  # reported by ready()
                self._errors.append(exc)

        self._threads = [threading.Thread(target=start, args=(s,), daemon=True)
                         for s in self.sniffers.values()]
        for thread in self._threads:
            thread.start()

    def ready(self) -> None:
        for thread in self._threads:
            thread.join(60)
        if self._errors:
            raise LabError(f"lab: a sniffer did not start: {self._errors[0]}")

    def close(self) -> None:
        for thread in self._threads:
            thread.join(60)
        for sniffer in self.sniffers.values():
            sniffer.stop(check=False)

    def egress_drops(self, host: LabHost) -> int:
        """The host's kernel counter of packets its egress backstop dropped."""
        from ztnet.datapath.datapath import Datapath

        with Datapath.inspect(self.lab.instance(host)) as datapath:
            return datapath.counters()["egress_drop"]

    def control(self, hosts: Iterable[LabHost]) -> None:
        """A positive control from each host to each sniffed host, awaited in the captures."""
        hosts = list(hosts)
        targets = [{"kind": "tcp", "host": h.ipv4, "port": CONTROL_PORT}
                   for h in self.sniffed.values()]
        for host in hosts:
            self.lab.run_attempts(host, None, targets, timeout=1.0)
        for sniffer in self.sniffers.values():
            for host in hosts:
                sniffer.wait_for(control_from(host), 10.0,
                                 f"the positive control from {host.name}")

    def agent_traffic(self, packets: Iterable[CapturedPacket]) -> list[CapturedPacket]:
        """Packets an agent host sent that are not controls (nor ND/MLD chatter)."""
        return [p for p in packets if p.src in self.agent_addresses
                and p.dport != CONTROL_PORT
                and (p.proto in (6, 17) or p.icmp_type in _ECHO_REQUESTS)]

    def raw_arrived(self, host: LabHost, target: LabHost) -> bool:
        """Did an ICMP echo request from ``host`` reach ``target`` (after a control)?"""
        self.control([host])
        role = next(r for r, h in self.sniffed.items() if h == target)
        return any(p.src == host.ipv4 and p.icmp_type in _ECHO_REQUESTS
                   for p in self.sniffers[role].packets())

    @staticmethod
    def flow_key(packet: CapturedPacket, hosts: dict[str, str]) -> tuple[str, str, int]:
        return (hosts[packet.src or ""], _PROTOS.get(packet.proto or 0, str(packet.proto)),
                packet.dport or 0)

    def verdicts(self, *, expected_api: set[tuple[str, str, int]]) -> list[tuple[bool, str]]:
        """Stop the captures after controls from every agent host and judge them: exfil got
        nothing from any agent, api got exactly the ``expected_api`` flows (host, proto,
        port; 0 for ICMP)."""
        self.control(self.lab.topology.agent_hosts_list)
        captured: dict[Role, Any] = {role: s.stop() for role, s in self.sniffers.items()}
        exfil = self.agent_traffic(captured[Role.EXFIL])
        api = {self.flow_key(p, self.agent_addresses)
               for p in self.agent_traffic(captured[Role.API])}
        also = ", ".join(self.sniffed[Role.EXFIL].extra_ipv4)
        return [
            (not exfil, f"the sniffer on exfil (also {also})"
             f" captured {len(captured[Role.EXFIL])} packets, {len(exfil)} of them from an "
             "agent" + ("" if not exfil else f": {[p.summary for p in exfil[:5]]}")),
            (api == expected_api, "the sniffer on api saw exactly the allowed flows: " + ", ".join(
                f"{h} {p}{'/' + str(port) if port else ' echo'}" for h, p, port in sorted(api))
             + ("" if api == expected_api else f" (expected {sorted(expected_api)})")),
        ]
