"""Synthetic flow records for benchmarks/flowstore.py, fast and real.

A fleet of 50 hosts running 4 of 200 agents each, agent activity Zipf-distributed
(a few agents make most flows), 8 % of attempts denied, allowed ones split into
connect / sendmsg / flow_end. Records are schema-1 JSON as daemons send them, with
the real UUIDv5, but made from ``to_json`` templates: building each record as a
dataclass and encoding it costs ~90 µs here, 1.5 minutes a million. ``check_fleet``
proves the shortcut: every made record decodes with ``from_json`` to the same row, and
passes the controller's own batch check.
"""

from __future__ import annotations

import hashlib
import random
import re

from ztnet.controller.flows import decode_batch
from ztnet.controller.flowstore import FlowRow
from ztnet.observe.records import (
    FLOW_NAMESPACE,
    AgentRef,
    EventType,
    FlowCounters,
    FlowRecord,
    GrantRef,
    Process,
    Verdict,
    format_rfc3339,
    from_json,
    to_json,
)

NS = 1_000_000_000
HOSTS, AGENTS, AGENTS_PER_HOST = 50, 200, 4
SPAN_NS = 24 * 3600 * NS
DESTINATIONS = [f"10.{i // 250}.{i % 250}.{(i * 7) % 250 + 1}" for i in range(500)]
PORTS = [443, 443, 443, 80, 53, 5432, 6379, 8080, 22]


def layout(rng: random.Random) -> tuple[list[str], list[list[str]], list[float]]:
    """Hosts, the agents each runs, and each agent's weight (Zipf, s = 1)."""
    agents = [f"agent-{i:03d}" for i in range(AGENTS)]
    order = agents[:]
    rng.shuffle(order)
    weight = {agent: 1.0 / (rank + 1) for rank, agent in enumerate(order)}
    hosts = [f"host-{i:02d}" for i in range(HOSTS)]
    runs = [agents[i * AGENTS_PER_HOST:(i + 1) * AGENTS_PER_HOST] for i in range(HOSTS)]
    return hosts, runs, [weight[a] for a in agents]


class Fleet:
    """One template per (kind, verdict, protocol, variant), made by ``to_json`` from a
    ``FlowRecord`` with placeholders and filled in per record. The uuid is
    ``record_uuid``'s, computed with hashlib directly."""

    T0, DURATIONS = 1_111_111_111_111_111_111, (31_415_926, 2_718_281_828, 57_721_566_490)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.templates: dict[tuple[EventType, Verdict, int], list[str]] = {}
        for kind, verdict in ((EventType.CONNECT, Verdict.ALLOWED),
                              (EventType.CONNECT, Verdict.DENIED),
                              (EventType.SENDMSG, Verdict.ALLOWED),
                              (EventType.FLOW_END, Verdict.ALLOWED)):
            for proto in (6, 17):
                self.templates[kind, verdict, proto] = [
                    self._template(kind, verdict, proto, duration) for duration in self.DURATIONS]

    def _template(self, kind: EventType, verdict: Verdict, proto: int, duration: int) -> str:
        rng, allowed, t0 = self.rng, verdict == Verdict.ALLOWED, self.T0
        flow = (FlowCounters(rng.randrange(1, 90), rng.randrange(100, 90_000),
                             rng.randrange(1, 90), rng.randrange(100, 900_000), t0 - duration,
                             t0) if kind == EventType.FLOW_END else None)
        record = FlowRecord(
            uuid="@uuid", time_ns=t0, host="@host", event_type=kind, verdict=verdict,
            drop_reason="GRANTED" if allowed else "NO_GRANT", ip_version=4, proto=proto,
            source="10.1.0.5" if flow else "", source_port=40123 if flow else 0,
            destination="@dst", destination_port=1, socket_cookie=2, cgroup_id=9001,
            process=Process(3, 3, "python3", "/usr/bin/python3.11", 65534),
            agent=AgentRef("@agent", "spiffe://bench.example/agent/@agent", 1),
            grant=GrantRef(0xFF, 42, "3f5a9c1e" * 8) if allowed else None, flow=flow,
            suppressed=0)
        def mark(name: str) -> str:  # a placeholder no JSON text contains
            return f"\x00{name}\x00"

        text = to_json(record)
        for old, new in (("@uuid", mark("uuid")), ("@host", mark("host")),
                         ("@dst", mark("dst")), ("@agent", mark("agent")),
                         ('"destination_port":1}', f'"destination_port":{mark("port")}}}'),
                         ('"socket_cookie":2,', f'"socket_cookie":{mark("cookie")},'),
                         ('"pid":3,"tid":3,', f'"pid":{mark("pid")},"tid":{mark("pid")},'),
                         ("g-00000000000000ff", mark("grant")), (format_rfc3339(t0), mark("time")),
                         (format_rfc3339(t0 - duration), mark("first"))):
            text = text.replace(old, new)
        text = text.replace("{", "{{").replace("}", "}}")
        return re.sub("\x00(\\w+)\x00", r"{\1}", text)

    def row(self, host: str, agent: str, time_ns: int, cookie: int) -> FlowRow:
        rng = self.rng
        denied = rng.random() < 0.08
        roll = rng.random()
        kind = (EventType.CONNECT if denied or roll < 0.6 else
                EventType.SENDMSG if roll < 0.7 else EventType.FLOW_END)
        verdict = Verdict.DENIED if denied else Verdict.ALLOWED
        port = rng.choice(PORTS)
        proto = 17 if port == 53 or kind == EventType.SENDMSG else 6
        destination = rng.choice(DESTINATIONS)
        index = rng.randrange(len(self.DURATIONS))
        uuid = fast_uuid5(f"{host}/{cookie}/{kind}/{time_ns}/{destination}/{port}")
        grant = "" if denied else f"g-{rng.getrandbits(64):016x}"
        text = self.templates[kind, verdict, proto][index].format(
            uuid=uuid, host=host, dst=destination, agent=agent, port=port, cookie=cookie,
            pid=1000 + cookie % 5000, grant=grant, time=format_rfc3339(time_ns),
            first=format_rfc3339(time_ns - self.DURATIONS[index]))
        return FlowRow(time_ns, host, agent, verdict.value, "NO_GRANT" if denied else "GRANTED",
                       kind.value, proto, destination, port, grant, uuid, text, time_ns)


_NAMESPACE = FLOW_NAMESPACE.bytes


def fast_uuid5(name: str) -> str:
    """``uuid.uuid5(FLOW_NAMESPACE, name)`` as a string, without the UUID object."""
    digest = bytearray(hashlib.sha1(_NAMESPACE + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def check_fleet(fleet: Fleet) -> None:
    """The fast records are real records: they decode, and the controller accepts them."""
    for cookie in range(200):
        row = fleet.row("host-00", "agent-000", 1_800_000_000_123_456_000 + cookie, cookie)
        record = from_json(row.record)
        assert FlowRow.of(record, row.received_ns) == row, row
        assert decode_batch("host-00", [row.record.encode()], row.received_ns) == [row]
