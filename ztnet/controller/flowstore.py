"""Flow records in the controller's database: what ReportFlows stores and
QueryFlows reads (docs/controller.md, "Flow records").

``FlowStore`` is the storage interface (part of ``ztnet.controller.store.Store``);
``SqliteFlowStore`` is its SQLite implementation, mixed into ``SqliteStore``.

Delivery from the daemons is at-least-once, so a record may arrive twice. Two
guards, both inside the transaction that stores a batch: the host's highest
stored batch sequence (a batch at or below it is a resend: nothing is stored)
and a unique uuid (a record re-sent in a new batch, after the daemon re-batched
its spool, is ignored). Uuids cannot be squatted across hosts: the node service
only accepts a record whose uuid is the UUIDv5 of its own host and event.

Queries read through a second, read-only connection, so the admin service can
run them in a worker thread: with WAL, a reader never blocks the writer (the
event loop's connection) and sees the last committed batch.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ztnet.observe.records import FlowRecord, to_json

# Columns are what queries filter on; the record itself is kept as its JSON.
FLOW_SCHEMA = (
    """CREATE TABLE flows (
        id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, host TEXT NOT NULL,
        agent TEXT NOT NULL, verdict TEXT NOT NULL, drop_reason TEXT NOT NULL,
        event_type TEXT NOT NULL, proto INTEGER NOT NULL, destination TEXT NOT NULL,
        destination_port INTEGER NOT NULL, grant_id TEXT NOT NULL, uuid TEXT NOT NULL,
        record TEXT NOT NULL)""",
    # The uuid is unique. It is derived from the time (among others; checked at
    # ingest), so unique (time_ns, uuid) is exactly as strict, and this index
    # grows at its end as flows arrive in time order, where one on the random
    # uuid alone is written all over: 40,000 against 15,000 inserts a second
    # over a million rows, and a tenth of the worst batch time. It is the time
    # index as well.
    "CREATE UNIQUE INDEX flows_by_time ON flows (time_ns, uuid)",
    # Each filter's index continues with time_ns, so a filtered query reads its
    # newest rows straight off the index in order: no sort, and it stops after
    # `limit` rows.
    "CREATE INDEX flows_by_agent ON flows (agent, time_ns)",
    "CREATE INDEX flows_by_host ON flows (host, time_ns)",
    "CREATE INDEX flows_by_verdict ON flows (verdict, time_ns)",
    "CREATE TABLE flow_hosts (host TEXT PRIMARY KEY, sequence INTEGER NOT NULL)",
    # rows in `flows`, kept in step by every insert and delete: count(*) over
    # ten million rows would read a whole index on each prune
    "INSERT INTO meta VALUES ('flow_rows', '0')",
)

_COLUMNS = ("time_ns", "host", "agent", "verdict", "drop_reason", "event_type", "proto",
            "destination", "destination_port", "grant_id", "uuid", "record")
_INSERT = (f"INSERT INTO flows ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           # only a duplicate uuid is skipped; any other constraint still fails
           "ON CONFLICT (time_ns, uuid) DO NOTHING")
# Filters in the order their index is preferred: an agent is usually the
# rarest, a verdict the commonest. Every one of these indexes also serves the
# time bounds and the order, so any of them beats the plain time index.
_INDEXED = (("agent", "flows_by_agent"), ("host", "flows_by_host"),
            ("verdict", "flows_by_verdict"))


@dataclass(frozen=True, slots=True)
class FlowRow:
    """One record as stored: the query columns and the JSON."""

    time_ns: int
    host: str
    agent: str
    verdict: str
    drop_reason: str
    event_type: str
    proto: int
    destination: str
    destination_port: int
    grant_id: str  # "" when no grant allowed it
    uuid: str
    record: str

    @classmethod
    def of(cls, record: FlowRecord) -> FlowRow:
        # stored re-encoded, not as received: readers get exactly schema 1
        return cls(record.time_ns, record.host, record.agent.name, record.verdict.value,
                   record.drop_reason, record.event_type.value, record.proto,
                   record.destination, record.destination_port,
                   record.grant.name if record.grant else "", record.uuid, to_json(record))

    def values(self) -> tuple[object, ...]:
        return (self.time_ns, self.host, self.agent, self.verdict, self.drop_reason,
                self.event_type, self.proto, self.destination, self.destination_port,
                self.grant_id, self.uuid, self.record)


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """Empty strings and 0 match everything; ``[since_ns, until_ns)``."""

    host: str = ""
    agent: str = ""
    verdict: str = ""
    event_type: str = ""
    since_ns: int = 0
    until_ns: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """``duplicate``: the batch was at or below the host's highest sequence,
    nothing was looked at. ``ignored``: records whose uuid was already stored."""

    duplicate: bool
    stored: int = 0
    ignored: int = 0


@dataclass(frozen=True, slots=True)
class FlowPage:
    """Matching records (JSON), newest first; ``more``: others matched too."""

    records: list[str]
    more: bool


class FlowStore(Protocol):
    def store_flows(self, host: str, sequence: int, rows: Sequence[FlowRow]) -> StoredBatch:
        """In one transaction: unless ``sequence`` is at or below the host's
        highest, insert ``rows`` (skipping uuids already stored) and make
        ``sequence`` the host's highest."""
        ...

    def flow_sequence(self, host: str) -> int:
        """The highest batch sequence stored for ``host`` (0: none)."""
        ...

    def query_flows(self, query: FlowQuery) -> FlowPage:
        """Up to ``query.limit`` matching records, newest first. Safe to call
        from another thread while the owner writes."""
        ...

    def prune_flows(self, *, before_ns: int, max_rows: int, chunk: int) -> int:
        """Delete up to ``chunk`` of the oldest records among those older than
        ``before_ns`` (0: no age limit) and those beyond the newest
        ``max_rows`` (0: no count limit); returns how many were deleted."""
        ...

    def flow_count(self) -> int: ...


class SqliteFlowStore:
    """``FlowStore`` for ``SqliteStore`` (which provides the connection and
    transactions)."""

    _db: sqlite3.Connection
    _path: Path
    _reader: sqlite3.Connection | None
    _reader_lock: threading.Lock

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def store_flows(self, host: str, sequence: int, rows: Sequence[FlowRow]) -> StoredBatch:
        with self._tx() as db:
            if sequence <= _sequence(db, host):
                return StoredBatch(duplicate=True)
            stored = db.executemany(_INSERT, (row.values() for row in rows)).rowcount
            stored = max(stored, 0)
            db.execute("INSERT INTO flow_hosts VALUES (?, ?) ON CONFLICT (host) "
                       "DO UPDATE SET sequence = excluded.sequence", (host, sequence))
            _add_rows(db, stored)
        return StoredBatch(duplicate=False, stored=stored, ignored=len(rows) - stored)

    def flow_sequence(self, host: str) -> int:
        return _sequence(self._db, host)

    def reset_flow_sequence(self, db: sqlite3.Connection, host: str) -> None:
        """A re-enrolled host may come back with a fresh spool counting from 1
        again; its uuids still guard against duplicates."""
        db.execute("DELETE FROM flow_hosts WHERE host = ?", (host,))

    def query_flows(self, query: FlowQuery) -> FlowPage:
        sql, params = flow_sql(query)
        with self._reader_lock:
            reader = self._reading()
            rows = reader.execute(sql, params).fetchall()
        more = len(rows) > query.limit
        return FlowPage([str(row[0]) for row in rows[:query.limit]], more)

    def _reading(self) -> sqlite3.Connection:
        if self._reader is None:
            uri = f"{self._path.resolve().as_uri()}?mode=ro"
            # any thread may query, one at a time (the lock above)
            self._reader = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0,
                                           check_same_thread=False)
        return self._reader

    def prune_flows(self, *, before_ns: int, max_rows: int, chunk: int) -> int:
        with self._tx() as db:
            deleted = 0
            if before_ns > 0:
                deleted += db.execute(
                    "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE time_ns < ? "
                    "ORDER BY time_ns LIMIT ?)", (before_ns, chunk)).rowcount
            excess = _rows(db) - deleted - max_rows
            if max_rows > 0 and excess > 0 and deleted < chunk:
                deleted += db.execute(
                    "DELETE FROM flows WHERE id IN (SELECT id FROM flows ORDER BY time_ns "
                    "LIMIT ?)", (min(excess, chunk - deleted),)).rowcount
            _add_rows(db, -deleted)
        return deleted

    def flow_count(self) -> int:
        return _rows(self._db)

    def close_reader(self) -> None:
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def flow_sql(query: FlowQuery) -> tuple[str, list[object]]:
    """The SELECT for ``query`` (one more row than the limit, to know if more
    matched). Public for the EXPLAIN QUERY PLAN test."""
    where, params = [], []
    for column in ("host", "agent", "verdict", "event_type"):
        value = getattr(query, column)
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if query.since_ns:
        where.append("time_ns >= ?")
        params.append(query.since_ns)
    if query.until_ns:
        where.append("time_ns < ?")
        params.append(query.until_ns)
    index = next((name for column, name in _INDEXED if getattr(query, column)), "flows_by_time")
    sql = (f"SELECT record FROM flows INDEXED BY {index}"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           # no tie-break on equal times: one would cost a sort on every index
           + " ORDER BY time_ns DESC LIMIT ?")
    params.append(query.limit + 1)
    return sql, params


def _sequence(db: sqlite3.Connection, host: str) -> int:
    row = db.execute("SELECT sequence FROM flow_hosts WHERE host = ?", (host,)).fetchone()
    return int(row[0]) if row else 0


def _rows(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key = 'flow_rows'").fetchone()[0])


def _add_rows(db: sqlite3.Connection, delta: int) -> None:
    if delta:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'flow_rows'",
                   (delta,))


def iter_explain(db: sqlite3.Connection, query: FlowQuery) -> Iterator[str]:
    """The EXPLAIN QUERY PLAN lines of ``query`` (tests, benchmarks)."""
    sql, params = flow_sql(query)
    for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params):
        yield str(row[3])
