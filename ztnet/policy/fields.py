"""Parsers for the values of a policy file: destinations, ports and protocols
(durations are ztnet.durations'). Each raises ValueError with the explanation a
person needs; ztnet.policy.document adds the file, agent, rule and field."""

from __future__ import annotations

import ipaddress
import re

from ztnet.durations import MAX_DURATION
from ztnet.grants.model import IPNetwork, PortRange, Proto, normalize_network
from ztnet.grants.names import HostPattern

MAX_TTL = MAX_DURATION  # a rule's ttl is any duration parse_duration accepts

_PORTS_RE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?\Z")
_PREFIX_RE = re.compile(r"[0-9]{1,3}\Z")
_PROTO_NAMES = ("tcp", "udp", "icmp", "any")


def parse_destination(text: str) -> IPNetwork:
    """An IP address or CIDR, v4 or v6; IPv4-mapped IPv6 becomes IPv4."""
    address, slash, prefix = text.partition("/")
    if "%" in address:
        raise ValueError(f"{text!r}: scoped addresses (with %zone) cannot be granted")
    if slash and not _PREFIX_RE.match(prefix):
        raise ValueError(f"{text!r}: the prefix length after '/' must be a number, like /24")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an IP address or CIDR (like 10.0.2.0/24 or 2001:db8::/32)"
            ) from None
        raise ValueError(f"{text} has host bits set; did you mean {loose}?") from None
    return normalize_network(network)


_ADDRESS_CHARS = frozenset("0123456789.:/%")


def parse_target(text: str) -> IPNetwork | HostPattern:
    """What ``to`` names: an IP address or CIDR (parse_destination), or a host name
    pattern (``api.github.com``, ``*.githubusercontent.com``)."""
    try:
        return parse_destination(text)
    except ValueError:
        if set(text) <= _ADDRESS_CHARS or ":" in text or "/" in text:
            raise  # meant as an address: its own explanation
    return HostPattern(text)


def parse_ports(text: str) -> PortRange | None:
    """``"443"``, ``"8000-8100"`` (inclusive) or ``"any"`` (None)."""
    if text == "any":
        return None
    # Checked here rather than by PortRange.parse, which also takes spaces and
    # non-ASCII digits, so that every accepted spelling is a documented one.
    match = _PORTS_RE.match(text)
    if match is None:
        raise ValueError(f'bad ports {text!r}: expected "443", "8000-8100" or "any"')
    first = int(match[1])
    last = int(match[2]) if match[2] is not None else first
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1-65535")
    if first > last:
        raise ValueError(f'inverted port range {text!r}; did you mean "{last}-{first}"?')
    return PortRange(first, last)


def parse_proto(text: str) -> Proto:
    if text in _PROTO_NAMES:
        return Proto.parse(text)
    if text.lower() in _PROTO_NAMES:
        raise ValueError(f"write protocols in lower case: {text.lower()!r}")
    if text.lower() in ("icmp6", "icmpv6", "ipv6-icmp"):
        raise ValueError(f"unknown protocol {text!r}: use 'icmp', which covers ICMPv6 too")
    raise ValueError(f"unknown protocol {text!r} (tcp, udp, icmp or any)")
