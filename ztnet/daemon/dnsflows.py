"""DNS queries as flow records: what ztnet's resolver traced (``QueryRecord``) becomes a
``FlowRecord`` of event type ``dns`` for the flow pipeline (flow log, metrics, audit trail,
upload to the controller, whose DNS detectors read its ``dns`` object).

The record: verdict DENIED (reason NO_GRANT) for a REFUSED query, ALLOWED (GRANTED, the
first matching hostname grant) for every other; destination the resolver's loopback
address and port 53 (what the agent addressed is not known once the hooks redirected it);
no process (the resolver sees a socket, not its owner). Sizes are bounded as the schema
demands (names, at most ``MAX_DNS_ITEMS`` answers and stripped addresses). Each record's
time is unique per daemon (a nanosecond later than the one before if need be), so that its
uuid, derived like a kernel record's, is too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from ztnet.daemon.resolverconf import QueryRecord
from ztnet.observe.context import GrantInfo
from ztnet.observe.records import (
    MAX_DNS_ITEM,
    MAX_DNS_ITEMS,
    MAX_DNS_NAME,
    MAX_DNS_WORD,
    AgentRef,
    DnsQuery,
    EventType,
    FlowRecord,
    GrantRef,
    Process,
    RecordContext,
    Verdict,
    record_uuid,
    spiffe_of,
)

RESOLVER_ADDRESS = "127.0.0.1"
DNS_PORT = 53
_NO_PROCESS = Process(0, 0, "", "", 0)


class DnsRecords:
    """Builds the records; one per daemon (it keeps the times unique)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0
        self._names: Mapping[int, str] = {}
        self._indexes: dict[str, int] = {}

    def _time_ns(self) -> int:
        with self._lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            return self._last_ns

    def _index(self, ctx: RecordContext, agent: str) -> int:
        names = ctx.agent_names
        if names is not self._names:  # a new context: agents changed
            self._names = names
            self._indexes = {name: index for index, name in names.items()}
        return self._indexes.get(agent, 0)

    def record(self, query: QueryRecord, ctx: RecordContext) -> FlowRecord:
        time_ns = self._time_ns()
        refused = query.verdict == "refused"
        grant = None
        if query.grant_ids and not refused:
            info = ctx.grants.get(query.grant_ids[0], GrantInfo(0, ""))
            grant = GrantRef(query.grant_ids[0], info.policy_version, info.key_id)
        dns = DnsQuery(query.name[:MAX_DNS_NAME], query.qtype[:MAX_DNS_WORD],
                       query.rcode[:MAX_DNS_WORD], query.verdict[:MAX_DNS_WORD],
                       tuple(a[:MAX_DNS_ITEM] for a in query.answers[:MAX_DNS_ITEMS]),
                       tuple(s[:MAX_DNS_ITEM] for s in query.stripped[:MAX_DNS_ITEMS]))
        return FlowRecord(
            uuid=record_uuid(ctx.host, 0, EventType.DNS, time_ns, RESOLVER_ADDRESS, DNS_PORT),
            time_ns=time_ns, host=ctx.host, event_type=EventType.DNS,
            verdict=Verdict.DENIED if refused else Verdict.ALLOWED,
            drop_reason="NO_GRANT" if refused else "GRANTED", ip_version=4,
            proto=6 if query.transport == "tcp" else 17, source="", source_port=0,
            destination=RESOLVER_ADDRESS, destination_port=DNS_PORT, socket_cookie=0,
            cgroup_id=0, process=_NO_PROCESS,
            agent=AgentRef(query.agent, spiffe_of(ctx.trust_domain, query.agent),
                           self._index(ctx, query.agent)),
            grant=grant, flow=None, suppressed=0, dns=dns)
