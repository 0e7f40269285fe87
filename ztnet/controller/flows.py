"""The controller's flow logic between the wire and the FlowStore: checking a
reported batch, reading a query, and retention (the periodic prune).

A batch is all or nothing: the first bad record (its index named) refuses the
whole batch, so a daemon never has half a batch stored under a sequence it
will not send again.

Ingest checks what the schema leaves open, because records end up in the
operator's terminal (`ztnet flows`) and decide what retention deletes: the
destination (and a source, if given) must be an IP address of the record's
family, an agent name must be an agent name, free text (comm, exe, key id,
SPIFFE id) is bounded, and no record may be dated more than MAX_AHEAD_NS
after the controller received it. Text is stored as the host sent it and
escaped where it is printed (``ztnet.text.escape``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztnet import logs
from ztnet.controller import status
from ztnet.controller.flowstore import MAX_AHEAD_NS, FlowQuery, FlowRow, FlowStore
from ztnet.controller.metrics import ControllerMetrics
from ztnet.grants.model import AGENT_NAME_RE
from ztnet.observe.query import parse_kind, parse_verdict
from ztnet.observe.records import FlowRecord, RecordDecoder, encode_lines, record_uuid
from ztnet.v1 import admin_pb2

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
# Above this many bytes of records a QueryFlows answer is cut (``truncated``):
# AdminClient accepts 32 MiB; gRPC's usual client default is 4 MiB.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_INT64 = 2**63  # SQLite integers are signed 64-bit
_NS = 1_000_000_000
# Free-text fields of a record: comm is 15 bytes in the kernel (each may decode
# to U+FFFD), exe a path (PATH_MAX), key ids and SPIFFE ids short.
_MAX_TEXT = {"process.comm": 64, "process.exe": 4096, "agent.spiffe_id": 2048,
             "grant.key_id": 128}


def check_sequence(sequence: int) -> None:
    if not 0 < sequence < _INT64:
        raise status.invalid("sequence", f"{sequence} is not a batch sequence (1 .. 2^63-1; "
                             "the first batch of a host is 1)")


def decode_batch(host: str, records: Sequence[bytes], received_ns: int,
                 into: list[FlowRecord] | None = None) -> list[FlowRow]:
    """The rows of a batch from ``host``, received at ``received_ns``: every
    record must be a valid schema-1 record of that host (else INVALID_ARGUMENT
    or PERMISSION_DENIED naming ``records[i]``). The decoded records are also
    appended to ``into`` when given (the OTLP export, the detectors). Pure: may run in a worker
    thread."""
    decoded = []
    decoder = RecordDecoder()  # the batch's records share their process, agent and grant
    # what a batch's records repeat (their addresses, agent names) is checked once per batch
    checked: set[tuple[str, ...] | tuple[str, int]] = set()
    for index, raw in enumerate(records):
        field = f"records[{index}]"
        try:
            record = decoder.decode(raw)
            _check(record)
        except (ValueError, RecursionError) as exc:
            raise status.invalid(field, str(exc)) from None
        _check_fields(record, field, received_ns, checked)
        if record.host != host:
            raise status.denied(f"{field}.host: host {host} may report only its own flows, "
                                f"not {record.host!r}'s")
        # The uuid must be the one the daemon derives from the event (host
        # included): a host can then not pre-empt another host's records by
        # storing their predictable uuids first.
        expected = record_uuid(record.host, record.socket_cookie, record.event_type,
                               record.time_ns, record.destination, record.destination_port)
        if record.uuid != expected:
            raise status.invalid(f"{field}.uuid", f"{record.uuid!r} is not the record's uuid "
                                 "(UUIDv5 of host, socket cookie, event type, time, "
                                 "destination and port)")
        decoded.append(record)
    # stored re-encoded, the batch at once (its shared parts encoded once): readers get
    # exactly schema 1, whatever form the host sent
    rows = [FlowRow.of(record, received_ns, line.decode())
            for record, line in zip(decoded, encode_lines(decoded), strict=True)]
    if into is not None:  # all or nothing, like the batch
        into.extend(decoded)
    return rows


def _check(record: FlowRecord) -> None:
    """Bounds the schema leaves open, for the columns stored as integers."""
    if record.time_ns >= _INT64:
        raise ValueError("time is after 2262")
    if record.proto > 255 or record.destination_port > 65535:
        raise ValueError("protocol or destination port out of range")


def _check_fields(record: FlowRecord, field: str, received_ns: int,
                  checked: set[tuple[str, ...] | tuple[str, int]]) -> None:
    """What a host could use against the operator or the other hosts. ``checked``: the
    (address, IP version) pairs, agent names (version 0) and free texts (comm, exe,
    SPIFFE id, key id: the order of _MAX_TEXT) found good so far."""
    ahead = record.time_ns - received_ns
    if ahead > MAX_AHEAD_NS:
        raise status.invalid(f"{field}.time", f"{ahead / _NS:.0f}s ahead of the controller's "
                             f"clock (at most {MAX_AHEAD_NS // _NS}s accepted; check the host's "
                             "clock)")
    for name, address, required in (("destination", record.destination, True),
                                    ("source", record.source, False)):
        if (address or required) and (address, record.ip_version) not in checked:
            _check_address(f"{field}.IP.{name}" if name == "source" else f"{field}.{name}",
                           address, record.ip_version)
            checked.add((address, record.ip_version))
    agent = record.agent.name
    if agent and (agent, 0) not in checked:
        if not AGENT_NAME_RE.match(agent):
            raise status.invalid(f"{field}.agent.name", "not an agent name (lower-case "
                                 "letters, digits and '-', at most 63)")
        checked.add((agent, 0))
    texts = (record.process.comm, record.process.exe, record.agent.spiffe_id,
             record.grant.key_id if record.grant else "")
    if texts in checked:
        return
    for (name, limit), text in zip(_MAX_TEXT.items(), texts, strict=True):
        if len(text) > limit:
            raise status.invalid(f"{field}.{name}", f"longer than {limit} characters")
    checked.add(texts)


def _check_address(field: str, address: str, ip_version: int) -> None:
    try:
        if "%" in address:  # a scope id is free text, and kernel events have none
            raise ValueError(address)
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise status.invalid(field, "not an IP address") from None
    if parsed.version != ip_version or str(parsed) != address:
        raise status.invalid(field, f"not an IPv{ip_version} address in canonical form")


def parse_query(request: admin_pb2.QueryFlowsRequest) -> FlowQuery:
    verdict = event_type = ""
    try:
        if request.verdict:
            verdict = parse_verdict(request.verdict).value
    except ValueError as exc:
        raise status.invalid("verdict", str(exc)) from None
    try:
        if request.event_type:
            event_type = parse_kind(request.event_type).value
    except ValueError as exc:
        raise status.invalid("event_type", str(exc)) from None
    for name in ("since_ns", "until_ns"):
        if getattr(request, name) >= _INT64:
            raise status.invalid(name, "after 2262 (Unix nanoseconds, 0: unbounded)")
    if request.limit > MAX_LIMIT:
        raise status.invalid("limit", f"{request.limit} is above the maximum of {MAX_LIMIT}")
    return FlowQuery(host=request.host, agent=request.agent, verdict=verdict,
                     event_type=event_type, since_ns=request.since_ns,
                     until_ns=request.until_ns, limit=request.limit or DEFAULT_LIMIT)


def response(records: Sequence[str], more: bool) -> admin_pb2.QueryFlowsResponse:
    encoded, size = [], 0
    for record in records:
        data = record.encode()
        size += len(data)
        if size > MAX_RESPONSE_BYTES:
            more = True
            break
        encoded.append(data)
    return admin_pb2.QueryFlowsResponse(records=encoded, truncated=more)


# --- retention -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retention:
    """``max_age`` seconds (by receive time), ``max_rows`` in all and
    ``max_rows_per_host`` for each host: 0 is no limit. Pruning deletes
    ``chunk`` rows per transaction and lets the event loop run in between,
    so RPCs wait at most one chunk."""

    max_age: float = 7 * 86400.0
    max_rows: int = 10_000_000
    max_rows_per_host: int = 1_000_000
    interval: float = 60.0
    chunk: int = 500


class Pruner:
    def __init__(self, store: FlowStore, retention: Retention, clock: Callable[[], float],
                 metrics: ControllerMetrics) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self.metrics = metrics

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a full disk, a locked database: try again later
                logs.event("flow prune failed", logging.ERROR, error=repr(exc))
            await asyncio.sleep(self.retention.interval)

    async def prune(self) -> int:
        """Delete everything beyond the limits, one chunk at a time."""
        retention, total = self.retention, 0
        before_ns = int((self.clock() - retention.max_age) * _NS) if retention.max_age else 0
        while True:
            deleted = self.store.prune_flows(before_ns=before_ns, max_rows=retention.max_rows,
                                             max_rows_per_host=retention.max_rows_per_host,
                                             chunk=retention.chunk)
            total += deleted
            self.metrics.flows_pruned.inc(deleted)
            if deleted < retention.chunk:
                break
            await asyncio.sleep(0)  # let waiting RPCs in between chunks
        self.metrics.flow_rows.set(self.store.flow_count())
        if total:
            logs.event("flows pruned", records=total, remaining=self.store.flow_count())
        return total
