"""Flow records in PostgreSQL: ``FlowStore`` for ``PgStore`` (the semantics are
ztnet.controller.flowstore's: receive-time order, per-host sequences and row counts,
uuid dedupe, the per-host quota and the global row limit taken from the largest host).

``flows`` is partitioned by receive day (UTC): partition ``flows_d<N>`` holds the rows
received on day N since the epoch. Partitions are created when a batch first needs
one, in a short transaction of their own (creating one locks the parent table), under
an advisory lock so two replicas never race on the same one. Retention by age drops
every partition whose whole day lies before the cut-off (its rows counted per host
first, so the counts stay in step), then deletes the rest row by row as SQLite does.
Prunes run under ``pg_try_advisory_xact_lock``: with several replicas, one prunes at a
time and the others skip that round.

Batches of one host are serialised by that host's ``flow_hosts`` row (``FOR UPDATE``),
which makes the sequence check and the uuid check exact even when the host reports
to two replicas at once; a host's uuids come only from that host (checked at ingest),
so no other host's batch can collide with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import sql

from ztnet.controller.flowstore import FlowPage, FlowQuery, FlowRow, StoredBatch, flow_filters

DAY_NS = 86_400 * 1_000_000_000
PARTITION_LOCK = 0x7A746E6571  # advisory lock keys shared by every replica
PRUNE_LOCK = 0x7A746E6570
_FAIR_STEP = 16  # as flowstore._FAIR_STEP
_PARTITION = re.compile(r"flows_d(\d+)\Z")
_COLUMNS = ("time_ns", "host", "agent", "verdict", "drop_reason", "event_type", "proto",
            "destination", "destination_port", "grant_id", "uuid", "record", "received_ns")

Conn = psycopg.Connection[tuple[Any, ...]]


def day_of(received_ns: int) -> int:
    return received_ns // DAY_NS


class PgFlowStore:
    _partitions: set[int]

    def _tx(self, *, snapshot: bool = False) -> AbstractContextManager[Conn]:
        raise NotImplementedError

    def store_flows(self, host: str, sequence: int, rows: Sequence[FlowRow]) -> StoredBatch:
        self._ensure_partitions({day_of(row.received_ns) for row in rows})
        with self._tx() as conn:
            conn.execute("INSERT INTO flow_hosts VALUES (%s, 0, 0) ON CONFLICT DO NOTHING",
                         (host,))
            held = conn.execute("SELECT sequence FROM flow_hosts WHERE host = %s FOR UPDATE",
                                (host,)).fetchone()
            if held is not None and sequence <= int(held[0]):
                return StoredBatch(duplicate=True)
            seen = _stored_uuids(conn, rows)
            fresh = []
            for row in rows:
                if row.uuid not in seen:
                    seen.add(row.uuid)
                    fresh.append(row)
            if fresh:
                with conn.cursor().copy(f"COPY flows ({', '.join(_COLUMNS)}) FROM STDIN"
                                        .encode()) as copy:
                    for row in fresh:
                        copy.write_row(row.values())
            conn.execute("UPDATE flow_hosts SET sequence = %s, rows = rows + %s "
                         "WHERE host = %s", (sequence, len(fresh), host))
            _add_rows(conn, len(fresh))  # last: the one row every batch updates
        return StoredBatch(duplicate=False, stored=len(fresh), ignored=len(rows) - len(fresh))

    def flow_sequence(self, host: str) -> int:
        with self._tx() as conn:
            row = conn.execute("SELECT sequence FROM flow_hosts WHERE host = %s",
                               (host,)).fetchone()
        return int(row[0]) if row else 0

    def reset_flow_sequence(self, conn: Conn, host: str) -> None:
        conn.execute("UPDATE flow_hosts SET sequence = 0 WHERE host = %s", (host,))

    def query_flows(self, query: FlowQuery) -> FlowPage:
        where, params = flow_filters(query)
        text = ("SELECT record FROM flows"
                + (f" WHERE {' AND '.join(where)}" if where else "")
                + " ORDER BY received_ns DESC, time_ns DESC LIMIT ?").replace("?", "%s")
        with self._tx() as conn:
            rows = conn.execute(text.encode(), (*params, query.limit + 1)).fetchall()
        return FlowPage([str(row[0]) for row in rows[:query.limit]], len(rows) > query.limit)

    def prune_flows(self, *, before_ns: int, max_rows: int, chunk: int,
                    max_rows_per_host: int = 0) -> int:
        with self._tx() as conn:
            if not _scalar(conn, "SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,)):
                return 0  # another replica is pruning
            deleted = 0
            if before_ns > 0:
                deleted += self._drop_partitions(conn, before_ns)
                deleted += _delete(conn, "received_ns < %s", (before_ns,), chunk - deleted)
            if max_rows_per_host > 0 and deleted < chunk:
                over = conn.execute("SELECT host, rows FROM flow_hosts WHERE rows > %s "
                                    "ORDER BY rows DESC", (max_rows_per_host,)).fetchall()
                for host, count in over:
                    if deleted >= chunk:
                        break
                    deleted += _delete(conn, "host = %s", (host,),
                                       min(int(count) - max_rows_per_host, chunk - deleted))
            while max_rows > 0 and deleted < chunk and (excess := _rows(conn) - max_rows) > 0:
                top = conn.execute("SELECT host, rows FROM flow_hosts ORDER BY rows DESC "
                                   "LIMIT 2").fetchall()
                if not top:
                    break
                gap = int(top[0][1]) - (int(top[1][1]) if len(top) > 1 else 0)
                gone = _delete(conn, "host = %s", (top[0][0],),
                               min(excess, chunk - deleted, max(gap + 1, _FAIR_STEP)))
                if gone == 0:
                    break
                deleted += gone
        return deleted

    def flow_count(self) -> int:
        with self._tx() as conn:
            return _rows(conn)

    def flow_partitions(self) -> list[int]:
        """The days that have a partition (oldest first)."""
        with self._tx() as conn:
            return sorted(_partitions(conn))

    # --- partitions --------------------------------------------------------------------

    def _ensure_partitions(self, days: set[int]) -> None:
        missing = days - self._partitions
        if not missing:
            return
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            existing = _partitions(conn)
            for day in sorted(missing - existing):
                conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF flows FOR VALUES FROM ({}) "
                                     "TO ({})").format(sql.Identifier(f"flows_d{day}"),
                                                       sql.Literal(day * DAY_NS),
                                                       sql.Literal((day + 1) * DAY_NS)))
        self._partitions |= missing

    def _drop_partitions(self, conn: Conn, before_ns: int) -> int:
        """Drop every partition whose day ends at or before ``before_ns``; the rows gone."""
        gone = 0
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        for day in sorted(_partitions(conn)):
            if (day + 1) * DAY_NS > before_ns:
                break
            table = sql.Identifier(f"flows_d{day}")
            counts = conn.execute(sql.SQL("SELECT host, count(*) FROM {} GROUP BY host")
                                  .format(table)).fetchall()
            conn.execute(sql.SQL("DROP TABLE {}").format(table))
            _forget(conn, {str(host): int(n) for host, n in counts})
            gone += sum(int(n) for _, n in counts)
            self._partitions.discard(day)
        return gone


def _partitions(conn: Conn) -> set[int]:
    rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = "
                        "i.inhrelid WHERE i.inhparent = 'flows'::regclass").fetchall()
    return {int(match.group(1)) for (name,) in rows if (match := _PARTITION.match(str(name)))}


def _stored_uuids(conn: Conn, rows: Sequence[FlowRow]) -> set[str]:
    if not rows:
        return set()
    found = conn.execute(
        "SELECT f.uuid FROM flows f JOIN unnest(%s::bigint[], %s::text[]) AS b (t, u) "
        "ON f.time_ns = b.t AND f.uuid = b.u",
        ([row.time_ns for row in rows], [row.uuid for row in rows])).fetchall()
    return {str(uuid) for (uuid,) in found}


def _delete(conn: Conn, where: str, params: tuple[object, ...], count: int) -> int:
    """Delete the ``count`` oldest-received rows matching ``where``, keeping the row
    counts in step; how many went."""
    if count <= 0:
        return 0
    hosts = conn.execute(
        f"DELETE FROM flows WHERE (received_ns, id) IN (SELECT received_ns, id FROM flows "
        f"WHERE {where} ORDER BY received_ns, time_ns LIMIT %s) RETURNING host".encode(),
        (*params, count)).fetchall()
    per_host: dict[str, int] = {}
    for (host,) in hosts:
        per_host[str(host)] = per_host.get(str(host), 0) + 1
    _forget(conn, per_host)
    return len(hosts)


def _forget(conn: Conn, per_host: dict[str, int]) -> None:
    for host, count in _items(per_host):
        conn.execute("UPDATE flow_hosts SET rows = greatest(0, rows - %s) WHERE host = %s",
                     (count, host))
    _add_rows(conn, -sum(per_host.values()))


def _items(per_host: dict[str, int]) -> Iterator[tuple[str, int]]:
    # a fixed order: two transactions updating the same hosts never deadlock
    return iter(sorted(per_host.items()))


def _rows(conn: Conn) -> int:
    return int(_scalar(conn, "SELECT value FROM counters WHERE name = 'flow_rows'"))


def _add_rows(conn: Conn, delta: int) -> None:
    if delta:
        conn.execute("UPDATE counters SET value = value + %s WHERE name = 'flow_rows'",
                     (delta,))


def _scalar(conn: Conn, text: str, params: tuple[object, ...] = ()) -> Any:
    row = conn.execute(text.encode(), params).fetchone()
    assert row is not None
    return row[0]
