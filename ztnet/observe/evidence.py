"""Recorded flows as evidence: flow records grouped into the distinct attempts an agent
made (who, on which host, which protocol, destination and port), with how often, when,
what the kernel said, and which records say so.

``ztnet policy plan`` (ztnet.observe.replay) replays these groups against a candidate
policy; ``ztnet policy suggest`` (ztnet.observe.suggest) turns what an agent was let do into
rules. A decision (connect, sendmsg) is one attempt; a ``flow_end`` is an attempt only when
no decision of its socket is among the records (a socket the egress backstop alone saw: a
raw socket, an ICMPv6 echo), so that a connection is never counted twice.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ztnet.grants.model import IPAddress
from ztnet.observe.records import EventType, FlowRecord, Verdict

# how many record ids a group keeps as its evidence (the count says how many there were)
SAMPLE_IDS = 3
_PORTED = (6, 17)  # TCP and UDP: the protocols whose records carry a destination port


@dataclass(frozen=True, slots=True, order=True)
class FlowKey:
    """One distinct attempt. ``port`` is None for protocols without ports."""

    agent: str
    host: str
    proto: int  # IP protocol number (58 for ICMPv6)
    destination: str
    port: int | None

    @property
    def address(self) -> IPAddress:
        return ipaddress.ip_address(self.destination)

    def describe(self) -> str:
        name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(self.proto,
                                                                 f"proto {self.proto}")
        where = f"[{self.destination}]" if ":" in self.destination else self.destination
        return f"{name} {where}:{self.port}" if self.port is not None else f"{name} {where}"


@dataclass(slots=True)
class FlowGroup:
    """Every recorded attempt with one key: counts by verdict, first and last time (Unix ns),
    and the ids of the first SAMPLE_IDS records."""

    key: FlowKey
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    record_ids: list[str] = field(default_factory=list)

    def add(self, record: FlowRecord) -> None:
        self.count += 1
        self.first_ns = record.time_ns if not self.first_ns else min(self.first_ns,
                                                                      record.time_ns)
        self.last_ns = max(self.last_ns, record.time_ns)
        self.verdicts[record.verdict.value] += 1
        if len(self.record_ids) < SAMPLE_IDS:
            self.record_ids.append(record.uuid)

    @property
    def went_ahead(self) -> bool:
        """Some attempt was let through (ALLOWED, or AUDIT: audit mode let it through)."""
        return bool(self.verdicts[Verdict.ALLOWED.value] or self.verdicts[Verdict.AUDIT.value])

    def verdict_text(self) -> str:
        return ", ".join(f"{count} {verdict}" for verdict, count in sorted(self.verdicts.items()))


def key_of(record: FlowRecord) -> FlowKey:
    port = record.destination_port if record.proto in _PORTED else None
    return FlowKey(record.agent.name, record.host, record.proto, record.destination, port)


def group_flows(records: Iterable[FlowRecord]) -> dict[FlowKey, FlowGroup]:
    """The attempts among ``records`` (see the module docstring), by key. Records of no
    agent (NOT_AGENT) and records without a destination are left out."""
    decided: set[tuple[str, int]] = set()
    ends: list[FlowRecord] = []
    groups: dict[FlowKey, FlowGroup] = {}

    def add(record: FlowRecord) -> None:
        key = key_of(record)
        group = groups.get(key)
        if group is None:
            group = groups[key] = FlowGroup(key)
        group.add(record)

    for record in records:
        if not record.agent.name or not record.destination \
                or record.event_type is EventType.DNS:  # the resolver, not a destination
            continue
        if record.event_type is EventType.FLOW_END:
            ends.append(record)
            continue
        decided.add((record.host, record.socket_cookie))
        add(record)
    for record in ends:
        if (record.host, record.socket_cookie) not in decided:
            add(record)
    return groups
