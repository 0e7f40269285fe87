"""Flow records: the one user-facing shape of a kernel verdict or flow end.

``from_event`` enriches a ``KernelEvent`` (names, SPIFFE id, grant metadata,
executable path) into a ``FlowRecord``; ``to_json``/``from_json`` are its one
JSON encoding (schema version 1, documented field by field in docs/flows.md).
The JSON follows Hubble's flow layout where Hubble has a field (``time``,
``uuid``, ``verdict``, ``drop_reason``, ``IP``, ``l4``, ``source``,
``destination``, ``traffic_direction``) and adds ``process``, ``agent``,
``grant``, ``flow`` and ``suppressed``. Every key is always present;
``grant`` and ``flow`` are null on records that have none. A DNS query an agent made
through ztnet's resolver is a record too (``event_type`` ``dns``, its ``dns`` object; null
on every other record).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from ztnet.datapath.abi import ZtEventKind, ZtFamily, ZtReason, ZtVerdict
from ztnet.datapath.events import KernelEvent
from ztnet.grants.model import format_grant_id, parse_grant_id
from ztnet.observe.context import CachedExe, GrantInfo, RecordContext, grant_infos, proc_exe
from ztnet.observe.jsonfields import JsonObject, format_rfc3339, parse_time
from ztnet.pki import spiffe_agent_id

__all__ = [
    "MAX_DNS_NAME", "SCHEMA_VERSION", "AgentRef", "CachedExe", "DnsQuery", "EventType",
    "FlowCounters", "FlowRecord", "GrantInfo", "GrantRef", "Process", "RecordContext",
    "RecordDecoder", "Verdict", "format_rfc3339", "encode_lines", "from_event",
    "from_events", "from_json",
    "grant_infos", "parse_time", "proc_exe", "spiffe_of", "to_dict", "to_json",
]

SCHEMA_VERSION = 1
_NS = 1_000_000_000
# uuid5 namespace of flow record ids: the same kernel event always gets the
# same uuid, so a consumer (the controller) can drop duplicates of a resend.
FLOW_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ztnet:flow-record:v1")
# SHA-1 state after the namespace: each record's uuid5 hashes only its own name on a copy
_NAMESPACE_SHA1 = hashlib.sha1(FLOW_NAMESPACE.bytes, usedforsecurity=False)
REASONS = frozenset(reason.name for reason in ZtReason)
_REASON_NAMES = {reason: reason.name for reason in ZtReason}  # ``.name`` is 4x the lookup
# a uuid's variant nibble (RFC 4122: 10xx) from the hash's hex digit in its place
_UUID_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class Verdict(enum.StrEnum):
    """ztnet's verdict words; Hubble says FORWARDED, DROPPED and AUDIT (HUBBLE_VERDICT).
    AUDIT: no grant allowed it and the agent is in audit mode, so it went ahead."""

    ALLOWED = "ALLOWED"
    DENIED = "DENIED"
    AUDIT = "AUDIT"


HUBBLE_VERDICT = {Verdict.ALLOWED: "FORWARDED", Verdict.DENIED: "DROPPED",
                  Verdict.AUDIT: "AUDIT"}


class EventType(enum.StrEnum):
    CONNECT = "connect"
    SENDMSG = "sendmsg"
    FLOW_END = "flow_end"
    DNS = "dns"  # a query to ztnet's resolver (ztnet.daemon.resolver), not a kernel event


_KINDS = {ZtEventKind.CONNECT: EventType.CONNECT, ZtEventKind.SENDMSG: EventType.SENDMSG,
          ZtEventKind.FLOW_END: EventType.FLOW_END}
_KIND_TEXTS = {kind: str(event_type) for kind, event_type in _KINDS.items()}
_VERDICTS = {ZtVerdict.ALLOWED: Verdict.ALLOWED, ZtVerdict.DENIED: Verdict.DENIED,
             ZtVerdict.AUDIT: Verdict.AUDIT}
# l4 object key -> IP protocol number (from_event files the kernel's ICMP-over-IPv6 as 58)
_L4 = {"TCP": 6, "UDP": 17, "ICMPv4": 1, "ICMPv6": 58}
IPPROTO_ICMPV6 = 58


@dataclass(frozen=True, slots=True)
class Process:
    """The process behind the socket. ``pid`` is the process (kernel tgid),
    ``tid`` the thread that made the call."""

    pid: int
    tid: int
    comm: str
    exe: str
    uid: int


@dataclass(frozen=True, slots=True)
class AgentRef:
    """``index`` is the kernel's agent index (0: not an agent); ``name`` and
    ``spiffe_id`` are empty when the agent is unknown."""

    name: str
    spiffe_id: str
    index: int


@dataclass(frozen=True, slots=True)
class GrantRef:
    """The signed grant that allowed the flow; ``policy_version`` 0 and an
    empty ``key_id`` when the daemon no longer knows the grant."""

    id: int
    policy_version: int
    key_id: str

    @property
    def name(self) -> str:
        return format_grant_id(self.id)


class FlowCounters(NamedTuple):
    """A flow's totals at socket release (flow_end records only)."""

    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int
    first_seen_ns: int
    last_seen_ns: int

    @property
    def duration_ns(self) -> int:
        return max(0, self.last_seen_ns - self.first_seen_ns)


# Bounds of a record's ``dns`` object (checked when a record is read, so also at the
# controller's ingest): a DNS name has at most 253 characters, and the resolver answers at
# most its per-name cap of addresses (32 by default).
MAX_DNS_NAME = 253
MAX_DNS_ITEMS = 64
MAX_DNS_ITEM = 160   # an address, or a stripped address with its reason
MAX_DNS_WORD = 16    # type, rcode, verdict


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A DNS query and what ztnet's resolver did with it: ``rcode`` is the reply's
    (NOERROR, REFUSED, SERVFAIL, NXDOMAIN ...), ``verdict`` the resolver's word (answered,
    refused, nodata, servfail, or the upstream's rcode in lower case); ``answers`` the
    addresses handed to the agent, ``stripped`` those withheld, each with its reason."""

    name: str
    type: str
    rcode: str
    verdict: str
    answers: tuple[str, ...] = ()
    stripped: tuple[str, ...] = ()


class FlowRecord(NamedTuple):
    """One verdict (connect, sendmsg) or one flow end. Times are Unix ns;
    ``proto`` is the IP protocol number; an empty address or port 0 means
    the kernel did not know it (the source of a connect event).

    A named tuple, not a frozen dataclass: it is built at the ring buffer's rate, and a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs 1.5 µs of
    the daemon's roughly 12 µs a record, a tuple's 0.25. ``_replace`` makes a changed copy."""

    uuid: str
    time_ns: int
    host: str
    event_type: EventType
    verdict: Verdict
    drop_reason: str
    ip_version: int
    proto: int
    source: str
    source_port: int
    destination: str
    destination_port: int
    socket_cookie: int
    cgroup_id: int
    process: Process
    agent: AgentRef
    grant: GrantRef | None
    flow: FlowCounters | None
    suppressed: int
    # the host names ztnet's resolver handed this agent for ``destination`` (hostname
    # grants), Hubble's ``destination_names``; empty for addresses no name led to
    destination_names: tuple[str, ...] = ()
    dns: DnsQuery | None = None  # event_type dns only

    @property
    def time(self) -> float:
        return self.time_ns / _NS


def record_uuid(host: str, cookie: int, event_type: str, time_ns: int, destination: str,
                destination_port: int) -> str:
    """``str(uuid.uuid5(FLOW_NAMESPACE, name))``, computed without building UUID objects
    (a third of the cost of a record in the daemon): the same SHA-1, version and variant
    bits set as RFC 4122 section 4.3 says, formatted 8-4-4-4-12."""
    name = f"{host}/{cookie}/{event_type}/{time_ns}/{destination}/{destination_port}"
    sha1 = _NAMESPACE_SHA1.copy()
    sha1.update(name.encode())
    return _uuid5_text(sha1.hexdigest())


def _uuid5_text(h: str) -> str:
    """The uuid of a name's SHA-1 (its hex digest ``h``): its first 16 bytes with the
    version (5) and the variant (10xx) set in the text, formatted 8-4-4-4-12."""
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_UUID_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


@functools.lru_cache(maxsize=1024)
def _spiffe(trust_domain: str, name: str) -> str:
    # agents are few and their ids never change: validate and build each once
    return spiffe_agent_id(trust_domain, name) if name and trust_domain else ""


def spiffe_of(trust_domain: str, name: str) -> str:
    """The agent's SPIFFE id, "" for no agent or no trust domain."""
    return _spiffe(trust_domain, name)


def unix_ns(seconds: float) -> int:
    """KernelEvent's float seconds -> ns. A double near 2^31 s resolves ~240 ns,
    so the value is rounded to whole microseconds (stable, and no false digits)."""
    return round(seconds * 1_000_000) * 1000


def from_event(event: KernelEvent, ctx: RecordContext) -> FlowRecord:
    event_type = _KINDS[event.kind]
    time_ns = unix_ns(event.time)
    not_agent = event.reason == ZtReason.NOT_AGENT or event.agent_index == 0
    name = "" if not_agent else ctx.agent_names.get(event.agent_index, "")
    spiffe = _spiffe(ctx.trust_domain, name)
    proto = event.proto
    if proto == 1 and event.family == ZtFamily.V6:  # the kernel files ICMPv6 under ICMP
        proto = IPPROTO_ICMPV6
    grant = None
    if event.grant_id:
        info = ctx.grants.get(event.grant_id, GrantInfo(0, ""))
        grant = GrantRef(event.grant_id, info.policy_version, info.key_id)
    flow = None
    if event_type == EventType.FLOW_END:
        flow = FlowCounters(event.packets_out, event.bytes_out, event.packets_in,
                            event.bytes_in, unix_ns(event.first_seen),
                            unix_ns(event.last_seen))
    return FlowRecord(
        uuid=record_uuid(ctx.host, event.cookie, event_type, time_ns, event.destination,
                         event.destination_port),
        time_ns=time_ns, host=ctx.host, event_type=event_type,
        verdict=_VERDICTS[event.verdict], drop_reason=event.reason.name,
        ip_version=int(event.family), proto=proto,
        source=event.source, source_port=event.source_port,
        destination=event.destination, destination_port=event.destination_port,
        socket_cookie=event.cookie, cgroup_id=event.cgroup_id,
        process=Process(event.tgid, event.pid, event.comm, ctx.exe(event.tgid), event.uid),
        agent=AgentRef(name, spiffe, event.agent_index),
        grant=grant, flow=flow, suppressed=event.suppressed,
    )


def from_events(events: Iterable[KernelEvent], ctx: RecordContext) -> list[FlowRecord]:
    """``[from_event(e, ctx) for e in events]``, the same records, at the ring buffer's
    rate: lookups hoisted out of the loop, the exe path cached per process for a second
    (``CachedExe.cached``), the uuid's SHA-1 started from the namespace's state."""
    host, names, grants = ctx.host, ctx.agent_names, ctx.grants
    exe_of = ctx.exe.cached if isinstance(ctx.exe, CachedExe) else None
    now = time.monotonic()
    kinds, verdicts, reason_names, kind_texts = _KINDS, _VERDICTS, _REASON_NAMES, _KIND_TEXTS
    uuid5_text = _uuid5_text
    # tuple.__new__, not FlowRecord(...): a named tuple's __new__ is Python code; every
    # field is given (test_event_batches checks these records equal from_event's)
    new, record, counters = tuple.__new__, FlowRecord, FlowCounters
    flow_end, not_agent_reason, v6 = ZtEventKind.FLOW_END, ZtReason.NOT_AGENT, ZtFamily.V6
    unknown = GrantInfo(0, "")
    sha1_copy = _NAMESPACE_SHA1.copy
    out: list[FlowRecord] = []
    append = out.append
    # the parts a batch's records share (they are frozen) are built once per batch
    agents: dict[tuple[str, int], AgentRef] = {}
    grant_refs: dict[int, GrantRef] = {}
    processes: dict[tuple[int, int, str, int], Process] = {}
    for (kind, verdict, reason, seconds, cookie, cgroup_id, grant_id, agent_index, pid, tgid,
         uid, comm, proto, family, source, source_port, destination, port, suppressed,
         packets_out, bytes_out, packets_in, bytes_in, first_seen, last_seen, _) in events:
        # one unpacking of the event's tuple, not an attribute lookup per field
        time_ns = round(seconds * 1_000_000) * 1000
        name = "" if reason == not_agent_reason or agent_index == 0 else \
            names.get(agent_index, "")
        if proto == 1 and family == v6:
            proto = IPPROTO_ICMPV6
        grant = None
        if grant_id:
            grant = grant_refs.get(grant_id)
            if grant is None:
                info = grants.get(grant_id, unknown)
                grant = grant_refs[grant_id] = GrantRef(grant_id, info.policy_version,
                                                        info.key_id)
        flow = None
        if kind == flow_end:
            flow = new(counters, (packets_out, bytes_out, packets_in, bytes_in,
                                  round(first_seen * 1_000_000) * 1000,
                                  round(last_seen * 1_000_000) * 1000))
        sha1 = sha1_copy()
        sha1.update(
            f"{host}/{cookie}/{kind_texts[kind]}/{time_ns}/{destination}/{port}".encode())
        process_key = (tgid, pid, comm, uid)
        process = processes.get(process_key)
        if process is None:
            process = processes[process_key] = Process(
                tgid, pid, comm, exe_of(tgid, comm, now) if exe_of else ctx.exe(tgid), uid)
        agent = agents.get((name, agent_index))
        if agent is None:
            agent = agents[(name, agent_index)] = AgentRef(
                name, _spiffe(ctx.trust_domain, name), agent_index)
        append(new(record, (
            uuid5_text(sha1.hexdigest()), time_ns, host, kinds[kind], verdicts[verdict],
            reason_names[reason], int(family), proto, source, source_port, destination, port,
            cookie, cgroup_id, process, agent, grant, flow, suppressed, (), None)))
    return out


# --- JSON -------------------------------------------------------------------------------


_L4_KEYS = {number: key for key, number in _L4.items()}


def _l4_key(proto: int) -> str:
    return _L4_KEYS.get(proto, "OTHER")


def to_dict(record: FlowRecord) -> dict[str, Any]:
    labels = ([f"ztnet:agent={record.agent.name}", f"ztnet:host={record.host}"]
              if record.agent.name else ["reserved:unmanaged"])
    l4: dict[str, Any] = {"source_port": record.source_port,
                          "destination_port": record.destination_port}
    key = _l4_key(record.proto)
    if key == "OTHER":
        l4["protocol"] = record.proto
    flow = record.flow
    return {
        "schema_version": SCHEMA_VERSION,
        "uuid": record.uuid,
        "time": format_rfc3339(record.time_ns),
        "host": record.host,
        "event_type": str(record.event_type),
        "verdict": str(record.verdict),
        "drop_reason": record.drop_reason,
        "traffic_direction": "EGRESS",
        "IP": {"source": record.source, "destination": record.destination,
               "ipVersion": f"IPv{record.ip_version}"},
        "l4": {key: l4},
        "source": {"identity": record.agent.spiffe_id, "labels": labels},
        "destination": {"identity": "", "labels": ["reserved:world"]},
        "socket_cookie": record.socket_cookie,
        "cgroup_id": record.cgroup_id,
        "process": {"pid": record.process.pid, "tid": record.process.tid,
                    "comm": record.process.comm, "exe": record.process.exe,
                    "uid": record.process.uid},
        "agent": {"name": record.agent.name, "spiffe_id": record.agent.spiffe_id,
                  "index": record.agent.index},
        "grant": None if record.grant is None else {
            "id": record.grant.name, "policy_version": record.grant.policy_version,
            "key_id": record.grant.key_id},
        "flow": None if flow is None else {
            "packets_out": flow.packets_out, "bytes_out": flow.bytes_out,
            "packets_in": flow.packets_in, "bytes_in": flow.bytes_in,
            "first_seen": format_rfc3339(flow.first_seen_ns),
            "last_seen": format_rfc3339(flow.last_seen_ns), "duration_ns": flow.duration_ns},
        "suppressed": record.suppressed,
        "destination_names": list(record.destination_names),
        "dns": None if record.dns is None else {
            "name": record.dns.name, "type": record.dns.type, "rcode": record.dns.rcode,
            "verdict": record.dns.verdict, "answers": list(record.dns.answers),
            "stripped": list(record.dns.stripped)},
    }


# The last record encoded and its line: the daemon's sinks (flow log, then the controller's
# spool) encode each record one after the other, and the second gets the first's line.
_last_encoded: tuple[FlowRecord | None, str] = (None, "")


def to_json(record: FlowRecord) -> str:
    """One line of JSON (no newline), keys in schema order. orjson writes the same text as
    ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)`` in a tenth of the time; a
    string it refuses (a lone surrogate, from a non-UTF-8 executable path) goes the slow way."""
    global _last_encoded
    last = _last_encoded
    if last[0] is record:  # records are immutable; the same object makes the same line
        return last[1]
    line = _encode(record).decode()
    _last_encoded = (record, line)
    return line


def _encode(record: FlowRecord) -> bytes:
    data = to_dict(record)
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # a lone surrogate (a non-UTF-8 path): JSON escapes it
        return json.dumps(data, separators=(",", ":")).encode()


# The last batch encoded and its lines: every sink of a dispatcher batch (flow log, spool)
# gets the same list and asks for its lines; the record is encoded once for all of them.
_last_lines: tuple[list[FlowRecord] | None, list[bytes]] = (None, [])


def encode_lines(records: list[FlowRecord]) -> list[bytes]:
    """``[to_json(r).encode() for r in records]``, computed once per list object."""
    global _last_lines
    last = _last_lines
    if last[0] is records:
        return last[1]
    lines = _LineWriter().lines(records)
    _last_lines = (records, lines)
    return lines


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


class _LineWriter:
    """``_encode`` for a batch, the same bytes in less time: a record's line is written from
    a template in which what a batch's records share is encoded once, by orjson (so every
    escape is orjson's): the fields from ``host`` to ``drop_reason``, and ``source`` to
    ``grant`` (``from_events`` builds each process, agent and grant once per batch; a part
    is keyed by their ``id()``, and each is alive meanwhile, in a record). A record that
    orjson refuses anywhere (a lone surrogate: ``_encode`` then escapes the whole line) or
    that carries a ``dns`` object is encoded whole by ``_encode``."""

    def __init__(self) -> None:
        # each part's JSON by its key; the methods below make one the first time
        self._verdicts: dict[tuple[str, str, str, str], str] = {}
        self._parties: dict[tuple[int, int, int, str], tuple[str, str]] = {}
        self._addresses: dict[str, str] = {}

    def lines(self, records: list[FlowRecord]) -> list[bytes]:
        out = []
        line = self._line
        for record in records:
            try:
                out.append(line(record) if record.dns is None else _encode(record))
            except orjson.JSONEncodeError:
                out.append(_encode(record))
        return out

    def _verdict(self, key: tuple[str, str, str, str]) -> str:
        """The fields from ``host`` to ``drop_reason``."""
        host, event_type, verdict, drop_reason = key
        part = self._verdicts[key] = (
            f'"host":{_json_text(host)},"event_type":{_json_text(event_type)},'
            f'"verdict":{_json_text(verdict)},"drop_reason":{_json_text(drop_reason)},')
        return part

    def _parties_of(self, key: tuple[int, int, int, str], r: FlowRecord) -> tuple[str, str]:
        """The JSON of ``source`` and ``destination``, and of ``process`` to ``grant``."""
        agent, process, grant = r.agent, r.process, r.grant
        labels = ([f"ztnet:agent={agent.name}", f"ztnet:host={r.host}"]
                  if agent.name else ["reserved:unmanaged"])
        source = _json_text({"identity": agent.spiffe_id, "labels": labels})
        process_json = _json_text({"pid": process.pid, "tid": process.tid,
                                   "comm": process.comm, "exe": process.exe,
                                   "uid": process.uid})
        agent_json = _json_text({"name": agent.name, "spiffe_id": agent.spiffe_id,
                                 "index": agent.index})
        grant_json = "null" if grant is None else _json_text({
            "id": grant.name, "policy_version": grant.policy_version, "key_id": grant.key_id})
        parts = self._parties[key] = (
            f'"source":{source},"destination":{{"identity":"","labels":["reserved:world"]}},',
            f'"process":{process_json},"agent":{agent_json},"grant":{grant_json},')
        return parts

    def _address(self, address: str) -> str:
        text = self._addresses[address] = _json_text(address)
        return text

    def _line(self, r: FlowRecord) -> bytes:
        (uuid, time_ns, host, event_type, verdict, drop_reason, ip_version, proto, source,
         source_port, destination, destination_port, cookie, cgroup_id, process, agent, grant,
         flow, suppressed, names, _) = r
        key = _l4_key(proto)
        protocol = f',"protocol":{proto}' if key == "OTHER" else ""
        addresses = self._addresses
        flow_json = "null" if flow is None else (
            f'{{"packets_out":{flow.packets_out},"bytes_out":{flow.bytes_out},'
            f'"packets_in":{flow.packets_in},"bytes_in":{flow.bytes_in},'
            f'"first_seen":"{format_rfc3339(flow.first_seen_ns)}",'
            f'"last_seen":"{format_rfc3339(flow.last_seen_ns)}",'
            f'"duration_ns":{flow.duration_ns}}}')
        names_json = _json_text(list(names)) if names else "[]"
        parties_key = (id(agent), id(process), id(grant), host)
        parties, owners = self._parties.get(parties_key) or self._parties_of(parties_key, r)
        verdict_key = (host, event_type, verdict, drop_reason)
        verdict_json = self._verdicts.get(verdict_key) or self._verdict(verdict_key)
        return (
            f'{{"schema_version":{SCHEMA_VERSION},"uuid":{_json_text(uuid)},'
            f'"time":"{format_rfc3339(time_ns)}",{verdict_json}'
            f'"traffic_direction":"EGRESS",'
            f'"IP":{{"source":{addresses.get(source) or self._address(source)},'
            f'"destination":{addresses.get(destination) or self._address(destination)},'
            f'"ipVersion":"IPv{ip_version}"}},'
            f'"l4":{{"{key}":{{"source_port":{source_port},'
            f'"destination_port":{destination_port}{protocol}}}}},{parties}'
            f'"socket_cookie":{cookie},"cgroup_id":{cgroup_id},{owners}'
            f'"flow":{flow_json},"suppressed":{suppressed},'
            f'"destination_names":{names_json},"dns":null}}').encode()


def from_json(line: str | bytes) -> FlowRecord:
    """Decode one record; ValueError says what is wrong. (Many lines: ``RecordDecoder``.)"""
    return RecordDecoder().decode(line)


def _decoded(data: object) -> FlowRecord:
    """A decoded JSON value as a record, every field checked by its typed accessor, which
    names the first one that is wrong (ValueError)."""
    try:
        return _from_dict(JsonObject(data, "record"))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bad flow record: {exc}") from None


_EVENT_TYPES = {event_type.value: event_type for event_type in EventType}
_VERDICT_WORDS = {verdict.value: verdict for verdict in Verdict}
_IP_VERSIONS = {"IPv4": 4, "IPv6": 6}


class RecordDecoder:
    """``from_json`` for many lines (a controller's batch, a flow log read back): the same
    records, or the same errors, in less time. A record of the form the daemons write
    (any protocol, no ``dns``) is checked by exact types in a few loops instead of a
    typed accessor per field, and shares its process, agent and grant with an equal one
    decoded before it (they are frozen), so that ``encode_lines`` encodes each of those
    once; anything that check does not pass, good or bad, goes through ``_decoded``, whose
    accessors name what is wrong. The check therefore only ever accepts what ``_decoded``
    accepts, as the same record (test_records.py compares the two on mutated records)."""

    _MAX_SHARED = 4096  # distinct processes, agents or grants kept for sharing

    def __init__(self) -> None:
        self._processes: dict[tuple[int, int, str, str, int], Process] = {}
        self._agents: dict[tuple[str, str, int], AgentRef] = {}
        self._grants: dict[tuple[str, int, str], GrantRef] = {}

    def decode(self, line: str | bytes) -> FlowRecord:
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        try:
            record = self._checked(data) if type(data) is dict else None
        except (KeyError, TypeError, ValueError, AttributeError):
            record = None  # a missing key, a wrong type, a bad time or grant id: said below
        return _decoded(data) if record is None else record

    def _checked(self, d: dict[str, Any]) -> FlowRecord | None:
        ip, l4_all, process, agent = d["IP"], d["l4"], d["process"], d["agent"]
        grant, flow, names = d["grant"], d["flow"], d.get("destination_names", [])
        if (type(ip) is not dict or type(l4_all) is not dict or type(process) is not dict
                or type(agent) is not dict or type(names) is not list
                or d.get("dns") is not None):
            return None
        ((l4_key, l4),) = l4_all.items()
        if type(l4) is not dict:
            return None
        proto = l4["protocol"] if l4_key == "OTHER" else _L4.get(l4_key)
        if type(proto) is not int or proto < 0:
            return None
        schema, uuid_text, time_text, host = d["schema_version"], d["uuid"], d["time"], d["host"]
        reason, source, destination = d["drop_reason"], ip["source"], ip["destination"]
        pid, tid, comm, exe, uid = (process["pid"], process["tid"], process["comm"],
                                    process["exe"], process["uid"])
        name, spiffe_id, index = agent["name"], agent["spiffe_id"], agent["index"]
        ints = (l4["source_port"], l4["destination_port"], d["socket_cookie"], d["cgroup_id"],
                pid, tid, uid, index, d["suppressed"])
        for value in ints:
            if type(value) is not int or value < 0:
                return None
        for text in (uuid_text, time_text, host, reason, source, destination, comm, exe, name,
                     spiffe_id, *names):
            if type(text) is not str:
                return None
        event_type = _EVENT_TYPES.get(d["event_type"])
        verdict = _VERDICT_WORDS.get(d["verdict"])
        ip_version = _IP_VERSIONS.get(ip["ipVersion"])
        if (type(schema) is not int or schema != SCHEMA_VERSION or reason not in REASONS
                or event_type is None or event_type is EventType.DNS or verdict is None
                or ip_version is None):
            return None
        grant_ref = None if grant is None else self._grant(grant)
        counters = None if flow is None else _counters(flow)
        if (grant is not None and grant_ref is None) or (flow is not None and counters is None):
            return None
        process_key = (pid, tid, comm, exe, uid)
        process_ref = self._processes.get(process_key)
        if process_ref is None:
            process_ref = self._processes[process_key] = Process(*process_key)
        agent_key = (name, spiffe_id, index)
        agent_ref = self._agents.get(agent_key)
        if agent_ref is None:
            agent_ref = self._agents[agent_key] = AgentRef(*agent_key)
        if len(self._processes) > self._MAX_SHARED or len(self._agents) > self._MAX_SHARED:
            self._processes.clear()
            self._agents.clear()
        source_port, destination_port, cookie, cgroup_id = ints[:4]
        return tuple.__new__(FlowRecord, (
            uuid_text, parse_time(time_text), host, event_type, verdict, reason, ip_version,
            proto, source, source_port, destination, destination_port, cookie, cgroup_id,
            process_ref, agent_ref, grant_ref, counters, ints[8], tuple(names), None))

    def _grant(self, grant: object) -> GrantRef | None:
        if type(grant) is not dict:
            return None
        key = text, version, key_id = grant["id"], grant["policy_version"], grant["key_id"]
        # types first: a key of `true` would find the grant of 1 (they hash and compare equal)
        if (type(text) is not str or type(version) is not int or version < 0
                or type(key_id) is not str):
            return None
        shared = self._grants.get(key)
        if shared is not None:
            return shared
        if len(self._grants) > self._MAX_SHARED:
            self._grants.clear()
        made = self._grants[key] = GrantRef(parse_grant_id(text), version, key_id)
        return made


def _counters(flow: object) -> FlowCounters | None:
    """A record's ``flow`` object, checked by exact types, or None."""
    if type(flow) is not dict:
        return None
    values = (flow["packets_out"], flow["bytes_out"], flow["packets_in"], flow["bytes_in"])
    first_seen, last_seen = flow["first_seen"], flow["last_seen"]
    for value in values:
        if type(value) is not int or value < 0:
            return None
    if type(first_seen) is not str or type(last_seen) is not str:
        return None
    return tuple.__new__(FlowCounters, (*values, parse_time(first_seen), parse_time(last_seen)))


def _from_dict(d: JsonObject) -> FlowRecord:
    if d.integer("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema_version {d.data['schema_version']}")
    if d.string("drop_reason") not in REASONS:
        raise ValueError(f"unknown drop_reason {d.data['drop_reason']!r}")
    ip, l4_all = d.obj("IP"), d.obj("l4")
    ip_version = {"IPv4": 4, "IPv6": 6}[ip.string("ipVersion")]
    if len(l4_all.data) != 1:
        raise TypeError("record.l4 must hold exactly one protocol")
    (key,) = l4_all.data
    l4 = l4_all.obj(key)
    proto = l4.integer("protocol") if key == "OTHER" else _L4[key]
    process, agent = d.obj("process"), d.obj("agent")
    grant, flow = d.optional("grant"), d.optional("flow")
    event_type = EventType(d.string("event_type"))
    dns = _dns(d.data.get("dns"))
    if (dns is None) != (event_type is not EventType.DNS):
        raise ValueError("record.dns: present exactly on records of event_type dns")
    return FlowRecord(
        uuid=d.string("uuid"), time_ns=parse_time(d.string("time")), host=d.string("host"),
        event_type=event_type, verdict=Verdict(d.string("verdict")),
        drop_reason=d.string("drop_reason"), ip_version=ip_version, proto=proto,
        source=ip.string("source"), source_port=l4.integer("source_port"),
        destination=ip.string("destination"), destination_port=l4.integer("destination_port"),
        socket_cookie=d.integer("socket_cookie"), cgroup_id=d.integer("cgroup_id"),
        process=Process(process.integer("pid"), process.integer("tid"), process.string("comm"),
                        process.string("exe"), process.integer("uid")),
        agent=AgentRef(agent.string("name"), agent.string("spiffe_id"), agent.integer("index")),
        grant=None if grant is None else GrantRef(parse_grant_id(grant.string("id")),
                                                  grant.integer("policy_version"),
                                                  grant.string("key_id")),
        flow=None if flow is None else FlowCounters(
            flow.integer("packets_out"), flow.integer("bytes_out"), flow.integer("packets_in"),
            flow.integer("bytes_in"), parse_time(flow.string("first_seen")),
            parse_time(flow.string("last_seen"))),
        suppressed=d.integer("suppressed"),
        destination_names=_names(d.data.get("destination_names", [])),
        dns=dns,
    )


def _names(value: object) -> tuple[str, ...]:
    """``destination_names`` of a record (absent in records written before it existed)."""
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise TypeError("record.destination_names must be a list of strings")
    return tuple(value)


def _dns(value: object) -> DnsQuery | None:
    """``dns`` of a record (absent in records written before it existed), bounded."""
    if value is None:
        return None
    d = JsonObject(value, "record.dns")
    words = {key: d.string(key) for key in ("type", "rcode", "verdict")}
    for key, word in words.items():
        if len(word) > MAX_DNS_WORD:
            raise ValueError(f"record.dns.{key}: longer than {MAX_DNS_WORD} characters")
    name = d.string("name")
    if len(name) > MAX_DNS_NAME:
        raise ValueError(f"record.dns.name: longer than {MAX_DNS_NAME} characters")
    lists = {}
    for key in ("answers", "stripped"):
        items = d.data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise TypeError(f"record.dns.{key} must be a list of strings")
        if len(items) > MAX_DNS_ITEMS or any(len(i) > MAX_DNS_ITEM for i in items):
            raise ValueError(f"record.dns.{key}: more than {MAX_DNS_ITEMS} entries or one "
                             f"longer than {MAX_DNS_ITEM} characters")
        lists[key] = tuple(items)
    return DnsQuery(name, words["type"], words["rcode"], words["verdict"], lists["answers"],
                    lists["stripped"])
