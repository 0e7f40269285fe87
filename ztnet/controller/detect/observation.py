"""What the detectors see of a flow record: the few fields they use, taken from a
record ingest already checked (``ztnet.controller.flows.decode_batch``).

DNS fields come from the records of DNS queries (event type ``dns``, ``record.dns`` with
the query name and the reply's rcode, made by the daemon's resolver). Other records leave
them empty, and the DNS detectors pass them by.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztnet.observe.records import MAX_DNS_NAME, EventType, FlowRecord, Verdict

_ATTEMPTS = (EventType.CONNECT.value, EventType.SENDMSG.value)


@dataclass(frozen=True, slots=True)
class Observation:
    uuid: str
    time_ns: int
    host: str
    agent: str
    kind: str          # "connect", "sendmsg", "flow_end", or a kind added later
    allowed: bool      # anything else (denied, audit mode's "would deny") is refused
    proto: int
    destination: str
    port: int
    attempts: int = 1  # 1 + the deny events the kernel's rate limit suppressed before it
    bytes_out: int = 0
    bytes_in: int = 0
    dns_name: str = ""  # lower case, without the trailing dot
    dns_rcode: str = ""  # "NOERROR", "NXDOMAIN", "REFUSED", "SERVFAIL" …

    @property
    def is_attempt(self) -> bool:
        return self.kind in _ATTEMPTS


def observe(record: FlowRecord) -> Observation:
    counters = record.flow
    name, rcode = _dns(record)
    return Observation(
        uuid=record.uuid, time_ns=record.time_ns, host=record.host, agent=record.agent.name,
        kind=str(record.event_type), allowed=record.verdict == Verdict.ALLOWED,
        proto=record.proto, destination=record.destination, port=record.destination_port,
        attempts=1 + max(0, record.suppressed),
        bytes_out=counters.bytes_out if counters else 0,
        bytes_in=counters.bytes_in if counters else 0,
        dns_name=name, dns_rcode=rcode)


def _dns(record: FlowRecord) -> tuple[str, str]:
    dns = record.dns
    if dns is None:
        return "", ""
    return dns.name.lower().rstrip(".")[:MAX_DNS_NAME], dns.rcode.upper()[:16]
