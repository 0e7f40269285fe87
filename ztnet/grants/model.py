"""The grant: one allowed network path for one agent, valid for a window.

This is the unit every layer speaks: policy compiles to grants, bundles carry
them signed, the datapath installs them, and the reference evaluator in
``ztnet.grants.evaluate`` defines what they mean.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# \Z, not $: "$" also matches before a trailing newline, and "bot\n" is no agent.
AGENT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
# A lower-case DNS name (one or more AGENT_NAME_RE labels joined by dots): the
# form SPIFFE trust domains take. Lower case only, so that two spellings of a
# trust domain can never name two different sets of agents.
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
MAX_DNS_NAME = 253
MAX_GRANT_ID = 2**64 - 1
_INF, _NEG_INF = math.inf, -math.inf


class Proto(enum.IntEnum):
    """Protocols a grant can name. ICMP covers ICMP and ICMPv6."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17

    @classmethod
    def parse(cls, text: str) -> Proto:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown protocol {text!r} (tcp, udp, icmp or any)") from None

    def __str__(self) -> str:
        return self.name.lower()


class AgentMode(enum.StrEnum):
    """How an agent's grants are applied. ``audit``: what they do not allow is let
    through and recorded with verdict AUDIT, except toward loopback and link-local
    (the metadata service), which only a grant opens (docs/policy.md, "Audit mode")."""

    ENFORCE = "enforce"
    AUDIT = "audit"


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """An inclusive range of destination ports, 1..65535."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= 65535 or not 1 <= self.last <= 65535:
            raise ValueError(f"port out of range 1-65535: {self}")
        if self.first > self.last:
            raise ValueError(f"inverted port range: {self}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, text: str) -> PortRange | None:
        """``"443"``, ``"8000-8100"`` or ``"any"`` (None)."""
        text = text.strip()
        if text == "any":
            return None
        first, sep, last = text.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"bad port {text!r}: expected '443', '8000-8100' or 'any'")
        return cls(int(first), int(last) if sep else int(first))


def is_dns_name(text: str) -> bool:
    """True for a lower-case DNS name such as ``example.org``."""
    return len(text) <= MAX_DNS_NAME and DNS_NAME_RE.match(text) is not None


def normalize_network(network: IPNetwork) -> IPNetwork:
    """IPv4-mapped IPv6 networks are IPv4 on the wire: judge them as IPv4."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def normalize_address(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Byte budgets (bytes; the kernel counts in 64 bits) and their window (seconds).
MAX_BUDGET_BYTES = 2**62
MAX_BUDGET_WINDOW = 365 * 86400


@dataclass(frozen=True, slots=True)
class ByteBudget:
    """How many bytes a grant may carry out on this host (docs/policy.md, "Byte budgets"):
    ``max_bytes_out`` per connection, ``max_bytes_out_window`` over all its connections in
    each ``window`` seconds. 0: no such budget. Counted by the kernel as ``skb->len``
    (headers and retransmissions included), so a budget bounds the payload from above."""

    max_bytes_out: int = 0
    max_bytes_out_window: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        for name in ("max_bytes_out", "max_bytes_out_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= MAX_BUDGET_BYTES:
                raise ValueError(f"{name} must be a number of bytes up to 2**62 (0: none)")
        if not self.max_bytes_out and not self.max_bytes_out_window:
            raise ValueError("a byte budget needs max_bytes_out or max_bytes_out_window")
        if bool(self.max_bytes_out_window) != bool(self.window):
            raise ValueError("max_bytes_out_window and its budget_window go together")
        if not isinstance(self.window, int) or not 0 <= self.window <= MAX_BUDGET_WINDOW:
            raise ValueError(f"budget window must be between 1s and {MAX_BUDGET_WINDOW}s")


@dataclass(frozen=True, slots=True)
class Grant:
    """Agent ``agent`` may reach ``network`` over ``proto`` on ``ports``
    (None: any port) from ``not_before`` until just before ``not_after``
    (Unix seconds). ``grant_id`` is a nonzero 64-bit number; the kernel
    reports it with every decision the grant made."""

    grant_id: int
    agent: str
    proto: Proto
    network: IPNetwork
    ports: PortRange | None
    not_before: float
    not_after: float
    budget: ByteBudget | None = None

    def __post_init__(self) -> None:
        if not 0 < self.grant_id <= MAX_GRANT_ID:
            raise ValueError(f"grant id must be a nonzero 64-bit number, got {self.grant_id}")
        if not AGENT_NAME_RE.match(self.agent):
            raise ValueError(f"agent name {self.agent!r} is not a DNS label")
        if self.proto is Proto.ICMP and self.ports is not None:
            raise ValueError("an icmp grant cannot name ports")
        if normalize_network(self.network) is not self.network:  # a new object: it was mapped
            raise ValueError(f"{self.network} is IPv4-mapped: write it as IPv4")
        if not _NEG_INF < self.not_before < self.not_after < _INF:  # false for a NaN too
            if not self.not_before < self.not_after:
                raise ValueError("not_after must be later than not_before")
            raise ValueError("not_before and not_after must be finite")

    def live_at(self, when: float) -> bool:
        return self.not_before <= when < self.not_after

    @property
    def label(self) -> str:
        return format_grant_id(self.grant_id)


def format_grant_id(grant_id: int) -> str:
    return f"g-{grant_id:016x}"


_GRANT_ID_RE = re.compile(r"g-[0-9a-f]{16}")


def parse_grant_id(text: str) -> int:
    if not _GRANT_ID_RE.fullmatch(text):
        raise ValueError(f"bad grant id {text!r}: expected g- and 16 hex digits")
    return int(text[2:], 16)
