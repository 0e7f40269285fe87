"""The controller's flow logic between the wire and the FlowStore: checking a
reported batch, reading a query, and retention (the periodic prune).

A batch is all or nothing: the first bad record (its index named) refuses the
whole batch, so a daemon never has half a batch stored under a sequence it
will not send again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztnet import logs
from ztnet.controller import status
from ztnet.controller.flowstore import FlowQuery, FlowRow, FlowStore
from ztnet.controller.metrics import ControllerMetrics
from ztnet.observe.query import parse_kind, parse_verdict
from ztnet.observe.records import FlowRecord, from_json, record_uuid
from ztnet.v1 import admin_pb2

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
# Above this many bytes of records a QueryFlows answer is cut (``truncated``):
# AdminClient accepts 32 MiB; gRPC's usual client default is 4 MiB.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_INT64 = 2**63  # SQLite integers are signed 64-bit
_NS = 1_000_000_000


def check_sequence(sequence: int) -> None:
    if not 0 < sequence < _INT64:
        raise status.invalid("sequence", f"{sequence} is not a batch sequence (1 .. 2^63-1; "
                             "the first batch of a host is 1)")


def decode_batch(host: str, records: Sequence[bytes]) -> list[FlowRow]:
    """The rows of a batch from ``host``: every record must be a valid schema-1
    record of that host (else INVALID_ARGUMENT or PERMISSION_DENIED naming
    ``records[i]``). Pure: may run in a worker thread."""
    rows = []
    for index, raw in enumerate(records):
        field = f"records[{index}]"
        try:
            record = from_json(raw)
            _check(record)
        except (ValueError, RecursionError) as exc:
            raise status.invalid(field, str(exc)) from None
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
        rows.append(FlowRow.of(record))
    return rows


def _check(record: FlowRecord) -> None:
    """Bounds the schema leaves open, for the columns stored as integers."""
    if record.time_ns >= _INT64:
        raise ValueError("time is after 2262")
    if record.proto > 255 or record.destination_port > 65535:
        raise ValueError("protocol or destination port out of range")


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
    """``max_age`` seconds and ``max_rows``: 0 is no limit. Pruning deletes
    ``chunk`` rows per transaction and lets the event loop run in between,
    so RPCs wait at most one chunk."""

    max_age: float = 7 * 86400.0
    max_rows: int = 10_000_000
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
