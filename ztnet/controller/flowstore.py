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

Order and retention go by the controller's receive time (``received_ns``),
never by the time a host wrote in the record: a host that dates its records
in the future can neither sort them above everyone else's nor make the
others' the oldest. Every host has its own row count (``flow_hosts.rows``):
the per-host quota deletes a host's own oldest rows, and the global row limit
takes from the host holding the most, so one host's flood erases only its
own history.

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

# A record may be dated at most this far after the controller received it
# (clock skew between hosts); ingest refuses later ones. Queries rely on it:
# time_ns >= since implies received_ns >= since - MAX_AHEAD_NS.
MAX_AHEAD_NS = 300 * 1_000_000_000

# Columns are what queries filter on; the record itself is kept as its JSON.
FLOW_SCHEMA = (
    """CREATE TABLE flows (
        id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, host TEXT NOT NULL,
        agent TEXT NOT NULL, verdict TEXT NOT NULL, drop_reason TEXT NOT NULL,
        event_type TEXT NOT NULL, proto INTEGER NOT NULL, destination TEXT NOT NULL,
        destination_port INTEGER NOT NULL, grant_id TEXT NOT NULL, uuid TEXT NOT NULL,
        record TEXT NOT NULL, received_ns INTEGER NOT NULL)""",
    # The uuid is unique. It is derived from the time (among others; checked at
    # ingest), so unique (time_ns, uuid) is exactly as strict, and this index
    # grows at its end as flows arrive in time order, where one on the random
    # uuid alone is written all over: 40,000 against 15,000 inserts a second
    # over a million rows, and a tenth of the worst batch time.
    "CREATE UNIQUE INDEX flows_by_time ON flows (time_ns, uuid)",
    # Order and retention: receive time, then (within one batch) the record's
    # time, which can then reorder only the sender's own batch.
    "CREATE INDEX flows_by_received ON flows (received_ns, time_ns)",
    # Each filter's index continues with the same order, so a filtered query
    # reads its newest rows straight off the index: no sort, and it stops
    # after `limit` rows.
    "CREATE INDEX flows_by_agent ON flows (agent, received_ns, time_ns)",
    "CREATE INDEX flows_by_host ON flows (host, received_ns, time_ns)",
    "CREATE INDEX flows_by_verdict ON flows (verdict, received_ns, time_ns)",
    # rows: that host's rows in `flows`, kept in step by every insert and delete
    """CREATE TABLE flow_hosts (host TEXT PRIMARY KEY, sequence INTEGER NOT NULL,
        rows INTEGER NOT NULL DEFAULT 0)""",
    # rows in `flows`, kept in step by every insert and delete: count(*) over
    # ten million rows would read a whole index on each prune
    "INSERT INTO meta VALUES ('flow_rows', '0')",
)

# Schema 2 (flows ordered by record time, no per-host counts) -> 3. Rows stored
# before have no receive time: the upgrade's time stands in, or the record's
# own if that is earlier (so a far-future record is not kept for years).
FLOW_UPGRADE_3 = (
    "ALTER TABLE flows ADD COLUMN received_ns INTEGER NOT NULL DEFAULT 0",
    "UPDATE flows SET received_ns = "
    "min(time_ns, CAST(strftime('%s', 'now') AS INTEGER) * 1000000000)",
    "DROP INDEX flows_by_agent",
    "DROP INDEX flows_by_host",
    "DROP INDEX flows_by_verdict",
    *FLOW_SCHEMA[2:6],
    "ALTER TABLE flow_hosts ADD COLUMN rows INTEGER NOT NULL DEFAULT 0",
    "INSERT INTO flow_hosts (host, sequence, rows) SELECT host, 0, count(*) FROM flows "
    "WHERE true GROUP BY host ON CONFLICT (host) DO UPDATE SET rows = excluded.rows",
)

# The global row limit deletes from the largest host this many rows at a time
# at least (fewer statements; fair within that many rows).
_FAIR_STEP = 16

_COLUMNS = ("time_ns", "host", "agent", "verdict", "drop_reason", "event_type", "proto",
            "destination", "destination_port", "grant_id", "uuid", "record", "received_ns")
_INSERT = (f"INSERT INTO flows ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           # only a duplicate uuid is skipped; any other constraint still fails
           "ON CONFLICT (time_ns, uuid) DO NOTHING")
# Filters in the order their index is preferred: an agent is usually the
# rarest, a verdict the commonest. Every one of these indexes also serves the
# time bounds and the order, so any of them beats the plain receive-time index.
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
    received_ns: int  # the controller's clock when the batch arrived

    @classmethod
    def of(cls, record: FlowRecord, received_ns: int, line: str | None = None) -> FlowRow:
        """``line``: ``to_json(record)`` if already made (a batch encodes its records at
        once). Stored re-encoded, not as received: readers get exactly schema 1."""
        return cls(record.time_ns, record.host, record.agent.name, record.verdict.value,
                   record.drop_reason, record.event_type.value, record.proto,
                   record.destination, record.destination_port,
                   record.grant.name if record.grant else "", record.uuid,
                   to_json(record) if line is None else line, received_ns)

    def values(self) -> tuple[object, ...]:
        return (self.time_ns, self.host, self.agent, self.verdict, self.drop_reason,
                self.event_type, self.proto, self.destination, self.destination_port,
                self.grant_id, self.uuid, self.record, self.received_ns)


@dataclass(frozen=True, slots=True)
class FlowQuery:
    """Empty strings and 0 match everything; record times in ``[since_ns, until_ns)``."""

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
        """Up to ``query.limit`` matching records, the last received first. Safe
        to call from another thread while the owner writes."""
        ...

    def prune_flows(self, *, before_ns: int, max_rows: int, chunk: int,
                    max_rows_per_host: int = 0) -> int:
        """Delete up to ``chunk`` records, oldest received first: those received
        before ``before_ns`` (0: no age limit), then each host's beyond its
        newest ``max_rows_per_host``, then, beyond ``max_rows`` in all, those of
        the host holding the most (0: no limit); returns how many were deleted."""
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
            db.execute("INSERT INTO flow_hosts VALUES (?, ?, ?) ON CONFLICT (host) DO UPDATE "
                       "SET sequence = excluded.sequence, rows = rows + excluded.rows",
                       (host, sequence, stored))
            _add_rows(db, stored)
        return StoredBatch(duplicate=False, stored=stored, ignored=len(rows) - stored)

    def flow_sequence(self, host: str) -> int:
        return _sequence(self._db, host)

    def reset_flow_sequence(self, db: sqlite3.Connection, host: str) -> None:
        """A re-enrolled host may come back with a fresh spool counting from 1
        again; its uuids still guard against duplicates."""
        db.execute("UPDATE flow_hosts SET sequence = 0 WHERE host = ?", (host,))

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

    def prune_flows(self, *, before_ns: int, max_rows: int, chunk: int,
                    max_rows_per_host: int = 0) -> int:
        with self._tx() as db:
            deleted = 0
            if before_ns > 0:
                deleted += _delete(db, "received_ns < ?", (before_ns,), chunk)
            if max_rows_per_host > 0:
                over = db.execute("SELECT host, rows FROM flow_hosts WHERE rows > ? "
                                  "ORDER BY rows DESC", (max_rows_per_host,)).fetchall()
                for host, count in over:
                    if deleted >= chunk:
                        break
                    deleted += _delete(db, "host = ?", (host,),
                                       min(int(count) - max_rows_per_host, chunk - deleted))
            while max_rows > 0 and deleted < chunk and (excess := _rows(db) - max_rows) > 0:
                top = db.execute("SELECT host, rows FROM flow_hosts ORDER BY rows DESC "
                                 "LIMIT 2").fetchall()
                if not top:
                    break
                # down to the next largest host (in steps of at least _FAIR_STEP
                # rows), so the largest never drops far below the others
                gap = int(top[0][1]) - (int(top[1][1]) if len(top) > 1 else 0)
                gone = _delete(db, "host = ?", (top[0][0],),
                               min(excess, chunk - deleted, max(gap + 1, _FAIR_STEP)))
                if gone == 0:  # counts out of step with the rows: never loop on them
                    break
                deleted += gone
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
    where, params = flow_filters(query)
    index = next((name for column, name in _INDEXED if getattr(query, column)),
                 "flows_by_received")
    sql = (f"SELECT record FROM flows INDEXED BY {index}"
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + " ORDER BY received_ns DESC, time_ns DESC LIMIT ?")
    params.append(query.limit + 1)
    return sql, params


def flow_filters(query: FlowQuery) -> tuple[list[str], list[object]]:
    """The WHERE terms (``?`` placeholders) and their parameters of ``query`` (both
    backends)."""
    where: list[str] = []
    params: list[object] = []
    for column in ("host", "agent", "verdict", "event_type"):
        value = getattr(query, column)
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if query.since_ns:
        # the index bound (records are dated at most MAX_AHEAD_NS after receipt),
        # then the exact one
        where += ["received_ns >= ?", "time_ns >= ?"]
        params += [query.since_ns - MAX_AHEAD_NS, query.since_ns]
    if query.until_ns:
        where.append("time_ns < ?")
        params.append(query.until_ns)
    return where, params


def _delete(db: sqlite3.Connection, where: str, params: tuple[object, ...], count: int) -> int:
    """Delete the ``count`` oldest-received rows matching ``where``, keeping the
    total and per-host row counts in step; how many went."""
    if count <= 0:
        return 0
    hosts = db.execute(
        f"DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE {where} "
        "ORDER BY received_ns, time_ns LIMIT ?) RETURNING host", (*params, count)).fetchall()
    per_host: dict[str, int] = {}
    for (host,) in hosts:
        per_host[host] = per_host.get(host, 0) + 1
    db.executemany("UPDATE flow_hosts SET rows = max(0, rows - ?) WHERE host = ?",
                   [(n, host) for host, n in per_host.items()])
    _add_rows(db, -len(hosts))
    return len(hosts)


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
