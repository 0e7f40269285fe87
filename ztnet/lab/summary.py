"""The demo's closing table, computed from flow records alone (nothing the demo remembers).

An *attempt* is a verdict record (``connect`` or ``sendmsg``); *bytes* are the totals of the
``flow_end`` records, both directions; an *alert* is an attempt on a cloud metadata endpoint.
Raw and ICMP (ping) sockets pass no connect or sendmsg hook, so they make no attempt records:
what the egress backstop lets through shows as a flow end, what it drops in the kernel's
``egress_drop`` counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ztnet.lab.trace import is_metadata
from ztnet.observe.records import EventType, FlowRecord, Verdict
from ztnet.observe.render import human_bytes
from ztnet.text import format_table

COLUMNS = ("AGENT", "HOST", "ATTEMPTS", "ALLOWED", "DENIED", "ALERTS", "BYTES OUT", "BYTES IN")


@dataclass(slots=True)
class Tally:
    agent: str
    host: str
    attempts: int = 0
    allowed: int = 0
    denied: int = 0
    alerts: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    grants: set[str] = field(default_factory=set)

    def add(self, record: FlowRecord) -> None:
        if record.event_type == EventType.DNS:
            return  # a query to ztnet's resolver: not an attempt on the network
        if record.event_type == EventType.FLOW_END:
            if record.flow is not None:
                self.bytes_out += record.flow.bytes_out
                self.bytes_in += record.flow.bytes_in
            return
        self.attempts += 1
        if record.verdict == Verdict.ALLOWED:
            self.allowed += 1
            if record.grant is not None:
                self.grants.add(record.grant.name)
        else:
            self.denied += 1
        self.alerts += is_metadata(record)

    def counts(self) -> tuple[int, int, int, int]:
        return self.attempts, self.allowed, self.denied, self.alerts


def summarize(records: Iterable[FlowRecord]) -> list[Tally]:
    """One tally per (agent, host), in order of first appearance."""
    tallies: dict[tuple[str, str], Tally] = {}
    for record in records:
        key = (record.agent.name or "-", record.host)
        tallies.setdefault(key, Tally(*key)).add(record)
    return list(tallies.values())


def total(tallies: Iterable[Tally]) -> Tally:
    result = Tally("total", "")
    for tally in tallies:
        result.attempts += tally.attempts
        result.allowed += tally.allowed
        result.denied += tally.denied
        result.alerts += tally.alerts
        result.bytes_out += tally.bytes_out
        result.bytes_in += tally.bytes_in
    return result


def table(tallies: list[Tally]) -> list[str]:
    """The table's lines; numbers are plain integers so a script can read them back."""
    rows = [(tally.agent, tally.host or "-", str(tally.attempts), str(tally.allowed),
             str(tally.denied), str(tally.alerts), str(tally.bytes_out), str(tally.bytes_in))
            for tally in [*tallies, total(tallies)]]
    lines = format_table(COLUMNS, rows, right=range(2, len(COLUMNS))).splitlines()
    grand = total(tallies)
    lines.append(f"({human_bytes(grand.bytes_out)} out, {human_bytes(grand.bytes_in)} in, "
                 "over the flows the grants allowed)")
    return lines
