"""Parsers for the values of a policy file: durations, destinations, ports
and protocols. Each raises ValueError with the explanation a person needs;
ztnet.policy.document adds the file, agent, rule and field."""

from __future__ import annotations

import ipaddress
import re

from ztnet.grants.model import IPNetwork, PortRange, Proto, normalize_network

# Grants end up as nanosecond deadlines in the kernel; a year is far beyond any
# sane grant and keeps every deadline comfortably inside 64 bits.
MAX_TTL = 365 * 86400

_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PORTS_RE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?\Z")
_PREFIX_RE = re.compile(r"[0-9]{1,3}\Z")
_PROTO_NAMES = ("tcp", "udp", "icmp", "any")


def parse_duration(text: str) -> int:
    """``"30s"``, ``"5m"``, ``"2h"`` or ``"1d"`` → seconds (1s .. 365d)."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(
            f"bad duration {text!r}: expected a whole number and a unit, "
            'like "30s", "5m", "2h" or "1d"'
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds == 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    if seconds > MAX_TTL:
        raise ValueError(f"duration {text!r} is longer than the maximum of 365d")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact ``parse_duration`` spelling, else plain seconds."""
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"


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
