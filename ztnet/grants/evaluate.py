"""Reference evaluator: what a set of grants means, in plain Python.

The kernel must agree with this function on every input; the differential
test in tests/kernel/test_differential.py checks that it does.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable

from ztnet.grants.model import AgentMode, Grant, IPAddress, Proto, normalize_address


def allowed_by(
    grants: Iterable[Grant],
    agent: str,
    proto: int,
    address: IPAddress,
    port: int | None,
    when: float,
) -> Grant | None:
    """The first grant that allows ``agent`` to send ``proto`` (an IP protocol
    number) to ``address``:``port`` at ``when``, or None. ``port`` is None for
    protocols without ports."""
    address = normalize_address(address)
    proto_class = Proto.ICMP if proto in (1, 58) else proto
    for grant in grants:
        if grant.agent != agent or not grant.live_at(when):
            continue
        if grant.proto is not Proto.ANY and grant.proto != proto_class:
            continue
        if address.version != grant.network.version or address not in grant.network:
            continue
        if grant.ports is not None and (port is None or port not in grant.ports):
            continue
        return grant
    return None


# What audit mode never opens (bpf/verdict.h, zt_audit_protected): the local host (loopback,
# and 0.0.0.0/8 and :: which reach it) and link-local, where the metadata services live.
AUDIT_PROTECTED: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(text) for text in (
        "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16",
        "::/127", "fe80::/10", "fd00:ec2::254/128"))


def audit_protected(address: IPAddress) -> bool:
    """True for a destination audit mode refuses like enforce mode does (only a grant opens it)."""
    address = normalize_address(address)
    return any(address.version == net.version and address in net for net in AUDIT_PROTECTED)


class Decision(enum.StrEnum):
    """What the kernel does with an attempt; the words are the flow records' verdicts."""

    ALLOWED = "ALLOWED"
    AUDIT = "AUDIT"  # no grant, let through: audit mode
    DENIED = "DENIED"


def decide(
    grants: Iterable[Grant],
    agent: str,
    mode: AgentMode,
    proto: int,
    address: IPAddress,
    port: int | None,
    when: float,
    *,
    quarantined: bool = False,
) -> tuple[Decision, Grant | None]:
    """The kernel's decision for one attempt (connect, sendmsg, or an egress packet):
    a quarantined agent is refused everything; a grant allows; otherwise audit mode lets it
    through unless the destination is ``audit_protected``."""
    if quarantined:
        return Decision.DENIED, None
    grant = allowed_by(grants, agent, proto, address, port, when)
    if grant is not None:
        return Decision.ALLOWED, grant
    if mode is AgentMode.AUDIT and not audit_protected(address):
        return Decision.AUDIT, None
    return Decision.DENIED, None
