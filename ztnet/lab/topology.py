"""The lab's topology: names, addresses, roles, and the namespaces and links that realise it.

One network namespace per host, each with one veth (``eth0``) into a Linux bridge that lives in
a namespace of its own (``<lab>-sw``), so building or removing the lab never changes the host's
own network::

    <lab>-sw   br0 ─┬─ ctl    ── eth0 10.77.0.10  fd00:77::10   controller
                    ├─ host-a ── eth0 10.77.0.21  fd00:77::21   agent host (research-bot)
                    ├─ host-b ── eth0 10.77.0.22  fd00:77::22   agent host (ops-bot)
                    ├─ api    ── eth0 10.77.0.30  fd00:77::30   internal API
                    ├─ exfil  ── eth0 10.77.0.40  fd00:77::40   exfiltration sink, and
                    │                  169.254.169.254/32       the cloud-metadata stand-in
                    ├─ dns    ── eth0 10.77.0.53  fd00:77::53   DNS resolver (lab.internal)
                    └─ inet   ── eth0 10.77.0.60  fd00:77::60   "the internet": upstream resolver,
                                       198.51.100.1-3/32, .66/32   CDN edges, an ungranted server

docs/lab.md is the same table for people (and for the Vagrant topology, which mirrors it).
Everything is on one link; agent hosts also route 169.254.169.254 onto it, as a cloud VM
would reach its metadata service, and 198.51.100.0/24 (documentation addresses standing in
for public ones: ztnet's resolver strips private answers) towards the inet host. Labs with
different names are disjoint (own namespaces, own bridge, own daemon instances), so they may
reuse the same addresses.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztnet.lab.netns import (
    _add_address,
    _ifindex,
    _ipr,
    _loopback_up,
    _wait_addresses_usable,
    _wait_link_running,
    create_netns,
    list_netns,
    netns_path,
    remove_netns,
)
from ztnet.text import format_table

DEFAULT_NAME = "ztlab"
RUN_ROOT = Path("/run/ztnet-lab")
IPV4_NET = ipaddress.IPv4Network("10.77.0.0/24")
IPV6_NET = ipaddress.IPv6Network("fd00:77::/64")
METADATA_IPV4 = "169.254.169.254"
# "the internet" (inet host): the upstream of the daemons' resolvers (`ztnet daemon --dns`),
# a CDN-like name answering one of its edges per query with a short TTL, and a name no
# policy grants (demo_names.py)
INTERNET_NET = "198.51.100.0/24"
CDN_NAME, CDN_TTL = "cdn.example.com", 2
CDN_ADDRESSES = ("198.51.100.1", "198.51.100.2", "198.51.100.3")
UNGRANTED_NAME, UNGRANTED_ADDRESS = "files.example.com", "198.51.100.66"
ZONE = "lab.internal"
TRUST_DOMAIN = "lab.ztnet.internal"
BRIDGE = "br0"
HOST_IFACE = "eth0"
MAX_AGENT_HOSTS = 8

# ports of the services the hosts run
CONTROLLER_PORT, ENROLL_PORT = 7443, 7444
API_PORT, API_ALT_PORT = 443, 8443
# where research-bot may upload reports, at most a byte budget per connection (demo_budget.py)
UPLOAD_PORT = 9443
EXFIL_PORT = 4444
METADATA_PORT = 80
DNS_PORT = 53
PEER_PORT = 8080  # every agent host runs an echo service here: a lateral-movement target
# Nothing listens here; unconfined "positive control" connections go to it so a sniffer can
# prove it sees the path (sniff.py) without the control being mistaken for agent traffic.
CONTROL_PORT = 9

# Lab names become namespace and instance-name prefixes: lower-case, no '-' (so "<lab>-" never
# prefixes another lab's names), short enough for "<lab>-host-a" instance names.
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class Role(enum.StrEnum):
    CONTROLLER = "controller"
    AGENT_HOST = "agent-host"
    API = "api"
    EXFIL = "exfil"
    DNS = "dns"
    INTERNET = "internet"


@dataclass(frozen=True, slots=True)
class LabHost:
    """One host: a namespace named ``<lab>-<name>`` with ``eth0`` on the lab link."""

    name: str
    role: Role
    octet: int  # last byte of the IPv4 address; the IPv6 address ends in the same digits
    services: tuple[str, ...]
    agent: str = ""  # agent hosts: the agent the demo and the tests run there
    extra_ipv4: tuple[str, ...] = ()

    @property
    def ipv4(self) -> str:
        return str(IPV4_NET[self.octet])

    @property
    def ipv6(self) -> str:
        return str(ipaddress.IPv6Address(f"{IPV6_NET.network_address}{self.octet}"))

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{ZONE}"


def agent_for(index: int) -> str:
    """host-a runs research-bot, host-b ops-bot, and so on alternately: two policies."""
    return ("research-bot", "ops-bot")[index % 2]


@dataclass(frozen=True, slots=True)
class Topology:
    name: str = DEFAULT_NAME
    agent_hosts: int = 2

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"lab: bad lab name {self.name!r} (lower-case letters and digits, "
                             "starting with a letter, at most 10)")
        if not 1 <= self.agent_hosts <= MAX_AGENT_HOSTS:
            raise ValueError(f"lab: --hosts must be 1..{MAX_AGENT_HOSTS}, not {self.agent_hosts}")

    @property
    def hosts(self) -> tuple[LabHost, ...]:
        ctl = LabHost("ctl", Role.CONTROLLER, 10,
                      (f"tcp/{CONTROLLER_PORT} controller (mutual TLS)",
                       f"tcp/{ENROLL_PORT} enrollment (TLS)"))
        agents = tuple(
            LabHost(f"host-{string.ascii_lowercase[i]}", Role.AGENT_HOST, 21 + i,
                    (f"ztnet daemon (instance {self.instance_name_for(i)})",
                     f"tcp/{PEER_PORT} echo"), agent=agent_for(i))
            for i in range(self.agent_hosts))
        api = LabHost("api", Role.API, 30, (f"tcp/{API_PORT} echo", f"tcp/{API_ALT_PORT} echo",
                                              f"tcp/{UPLOAD_PORT} echo"))
        exfil = LabHost("exfil", Role.EXFIL, 40,
                        (f"tcp/{EXFIL_PORT} + udp/{EXFIL_PORT} sink",
                         f"tcp/{METADATA_PORT} on {METADATA_IPV4} (metadata stand-in)"),
                        extra_ipv4=(METADATA_IPV4,))
        dns = LabHost("dns", Role.DNS, 53, (f"udp/{DNS_PORT} DNS for {ZONE}",))
        inet = LabHost("inet", Role.INTERNET, 60,
                       (f"udp+tcp/{DNS_PORT} upstream resolver ({CDN_NAME}, {UNGRANTED_NAME})",
                        f"tcp/{API_PORT} echo on {INTERNET_NET.rsplit('.', 1)[0]}.*"),
                       extra_ipv4=(*CDN_ADDRESSES, UNGRANTED_ADDRESS))
        return (ctl, *agents, api, exfil, dns, inet)

    def host(self, name: str) -> LabHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"lab: no host {name!r} in lab {self.name}")

    def by_role(self, role: Role) -> tuple[LabHost, ...]:
        return tuple(h for h in self.hosts if h.role == role)

    @property
    def controller(self) -> LabHost:
        return self.by_role(Role.CONTROLLER)[0]

    @property
    def agent_hosts_list(self) -> tuple[LabHost, ...]:
        return self.by_role(Role.AGENT_HOST)

    def netns(self, host: LabHost | str) -> str:
        return f"{self.name}-{host if isinstance(host, str) else host.name}"

    @property
    def switch_netns(self) -> str:
        return f"{self.name}-sw"

    def instance_name_for(self, index: int) -> str:
        return self.instance_name(f"host-{string.ascii_lowercase[index]}")

    def instance_name(self, host: LabHost | str) -> str:
        """The default lab's daemons are instances ``host-a``, ``host-b`` …; other labs prefix
        their name, so a test lab never touches the instances of a lab someone is using."""
        name = host if isinstance(host, str) else host.name
        return name if self.name == DEFAULT_NAME else f"{self.name}-{name}"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def controller_address(self) -> str:
        return f"{self.controller.ipv4}:{CONTROLLER_PORT}"

    @property
    def enroll_address(self) -> str:
        return f"{self.controller.ipv4}:{ENROLL_PORT}"

    def zone(self) -> dict[str, list[str]]:
        """What the lab's DNS answers: ``<host>.lab.internal`` → its addresses, plus the
        usual cloud name of the metadata service."""
        records = {h.fqdn: [h.ipv4, h.ipv6] for h in self.hosts}
        records["metadata.google.internal"] = [METADATA_IPV4]
        return records

    def internet_zone(self) -> dict[str, dict[str, Any]]:
        """What the inet host's upstream resolver answers (ztnet.lab.upstream's zone)."""
        return {CDN_NAME: {"A": list(CDN_ADDRESSES), "ttl": CDN_TTL, "rotate": 1},
                UNGRANTED_NAME: {"A": [UNGRANTED_ADDRESS], "ttl": 60}}

    def namespaces(self) -> list[str]:
        return [self.switch_netns, *(self.netns(h) for h in self.hosts)]

    def table(self) -> str:
        """Every host, its namespace, addresses, role and services (`lab up`, the demo)."""
        rows = []
        for host in self.hosts:
            ipv4 = ",".join((host.ipv4, *host.extra_ipv4))
            role = f"{host.role.value} ({host.agent})" if host.agent else host.role.value
            rows.append((host.name, self.netns(host), ipv4, host.ipv6, role,
                         "; ".join(host.services)))
        return format_table(("HOST", "NAMESPACE", "IPV4", "IPV6", "ROLE", "RUNS"), rows)


# --- building and removing the network ------------------------------------------------------


def build_network(topology: Topology) -> None:
    """Create every namespace, the bridge and the links, and wait until all are usable.

    Raises LabError; the caller removes a half-built network with :func:`remove_network`.
    """
    for name in topology.namespaces():
        create_netns(name)
    with _ipr(topology.switch_netns) as sw:
        # No STP and no forwarding delay: a port forwards as soon as it is up. No multicast
        # snooping: without an MLD querier on the link it could swallow IPv6 neighbour
        # solicitations sent before a host's membership report was seen.
        sw.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0,
                br_mcast_snooping=0)
        bridge = _ifindex(sw, BRIDGE)
        sw.link("set", index=bridge, state="up")
        for host in topology.hosts:
            _attach_host(topology, sw, bridge, host)
        _wait_link_running(sw, BRIDGE)
        for host in topology.hosts:
            _wait_link_running(sw, host.name)
    for host in topology.hosts:
        with _ipr(topology.netns(host)) as ipr:
            _wait_link_running(ipr, HOST_IFACE)
            _wait_addresses_usable(ipr, HOST_IFACE, [host.ipv4, host.ipv6, *host.extra_ipv4])


def _attach_host(topology: Topology, switch: Any, bridge: int, host: LabHost) -> None:
    # The peer is created directly in the host's namespace: it never exists in ours.
    switch.link("add", ifname=host.name, kind="veth",
                peer={"ifname": HOST_IFACE, "net_ns_fd": netns_path(topology.netns(host))})
    switch.link("set", index=_ifindex(switch, host.name), master=bridge, state="up")
    with _ipr(topology.netns(host)) as ipr:
        _loopback_up(ipr)
        _add_address(ipr, HOST_IFACE, ipaddress.ip_interface(f"{host.ipv4}/{IPV4_NET.prefixlen}"))
        _add_address(ipr, HOST_IFACE, ipaddress.ip_interface(f"{host.ipv6}/{IPV6_NET.prefixlen}"))
        for extra in host.extra_ipv4:
            _add_address(ipr, HOST_IFACE, ipaddress.ip_interface(f"{extra}/32"))
        index = _ifindex(ipr, HOST_IFACE)
        ipr.link("set", index=index, state="up")
        if host.role == Role.AGENT_HOST:
            # as on a cloud VM: the metadata service is one hop away, on the host's own link
            ipr.route("add", dst=f"{METADATA_IPV4}/32", oif=index, scope=253)  # 253: link
            ipr.route("add", dst=INTERNET_NET, oif=index, scope=253)


def lab_namespaces(name: str) -> list[str]:
    """Every namespace of lab ``name`` that exists, whatever topology created it."""
    return list_netns(f"{name}-")


def remove_network(name: str) -> list[str]:
    """Remove every namespace of lab ``name`` (killing what runs in them); returns their names.

    The bridge and every veth live only inside these namespaces, so they go with them.
    """
    return [ns for ns in lab_namespaces(name) if remove_netns(ns)]
