"""The flow store in-process, on both backends (tests/controller/backends.py): dedupe,
the row count, retention in chunks, queries from another thread; then SQLite's own: the
query plans (every query reads an index in order: no scan, no sort), the schema upgrades."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.backends import Backend
from tests.controller.flow_support import NS, make_record
from tests.controller.schema_support import drop_tpm_schema
from ztnet.controller import flows
from ztnet.controller.flowstore import FlowQuery, FlowRow, flow_sql, iter_explain
from ztnet.controller.metrics import ControllerMetrics
from ztnet.controller.store import SCHEMA_VERSION, SqliteStore, Store
from ztnet.errors import RpcFailure
from ztnet.observe.records import EventType, FlowRecord, Verdict, to_json

BASE = 1_800_000_000 * NS


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore.create(tmp_path / "ztnet.db", "test.example")
    yield store
    store.close()


def rows(host: str, count: int, *, start: int = 0, agent: str = "bot",
         verdict: Verdict = Verdict.ALLOWED) -> list[FlowRow]:
    """Received when they were made (the tests of receive time vs record time
    are in test_hostile_hosts.py)."""
    return [FlowRow.of(make_record(host, agent=agent, verdict=verdict,
                                   time_ns=BASE + (start + i) * NS), BASE + (start + i) * NS)
            for i in range(count)]


def count_star(backend: Backend, store: Store) -> int:
    return int(backend.rows(store, "SELECT count(*) FROM flows")[0][0])


def test_sequences_and_uuids_keep_resends_out(store: Store, backend: Backend) -> None:
    batch = rows("h1", 4)
    assert store.store_flows("h1", 1, batch).stored == 4
    assert store.store_flows("h1", 1, batch).duplicate
    assert store.store_flows("h1", 2, rows("h1", 4, start=100)[:1] + batch).ignored == 4
    assert store.store_flows("h2", 1, rows("h2", 2)).stored == 2  # sequences are per host
    assert (store.flow_sequence("h1"), store.flow_sequence("h2"), store.flow_sequence("h3")) \
        == (2, 1, 0)
    assert store.flow_count() == count_star(backend, store) == 7
    store.enroll_host("h1", "spiffe://test.example/host/h1", now=1.0)
    assert store.flow_sequence("h1") == 0  # re-enrolled: a new spool


def _kept(backend: Backend, store: Store, host: str) -> list[int]:
    return [r[0] for r in backend.rows(
        store, "SELECT received_ns FROM flows WHERE host = ? ORDER BY received_ns", (host,))]


def test_retention_deletes_the_oldest_in_chunks(store: Store, backend: Backend) -> None:
    store.store_flows("h1", 1, rows("h1", 50, start=100))
    store.store_flows("h2", 1, rows("h2", 50))  # received earlier, though stored later
    deleted = store.prune_flows(before_ns=BASE + 30 * NS, max_rows=0, chunk=20)
    assert deleted == 20 and store.flow_count() == count_star(backend, store) == 80
    assert store.prune_flows(before_ns=BASE + 30 * NS, max_rows=0, chunk=20) == 10
    assert store.prune_flows(before_ns=BASE + 30 * NS, max_rows=0, chunk=20) == 0
    # the row limit takes from the host holding the most: h1's oldest, not h2's
    assert store.prune_flows(before_ns=0, max_rows=60, chunk=1000) == 10
    assert _kept(backend, store, "h1")[0] == BASE + 110 * NS
    assert _kept(backend, store, "h2")[0] == BASE + 30 * NS
    assert store.flow_count() == count_star(backend, store) == 60

    pruner = flows.Pruner(store, flows.Retention(max_age=0, max_rows=5, chunk=7),
                          lambda: 0.0, ControllerMetrics())
    assert asyncio.run(pruner.prune()) == 55  # eight chunks, the loop free in between
    assert pruner.metrics.flow_rows._value.get() == 5 == count_star(backend, store)
    h1, h2 = _kept(backend, store, "h1"), _kept(backend, store, "h2")  # each host's newest kept
    assert h1 == [BASE + i * NS for i in range(150 - len(h1), 150)]
    assert h2 == [BASE + i * NS for i in range(50 - len(h2), 50)]


def test_each_host_has_its_own_quota(store: Store, backend: Backend) -> None:
    store.store_flows("big", 1, rows("big", 30))
    store.store_flows("small", 1, rows("small", 5, start=100))
    assert store.prune_flows(before_ns=0, max_rows=0, max_rows_per_host=10, chunk=100) == 20
    assert _kept(backend, store, "big") == [BASE + i * NS for i in range(20, 30)]
    assert len(_kept(backend, store, "small")) == 5
    counts = dict(backend.rows(store, "SELECT host, rows FROM flow_hosts"))
    assert counts == {"big": 10, "small": 5} and store.flow_count() == 15


def _populate(store: SqliteStore) -> None:
    """Enough rows, over enough values, that a wrong plan would show."""
    for host in range(5):
        batch = []
        for agent in range(8):
            verdict = Verdict.DENIED if agent % 4 == 0 else Verdict.ALLOWED
            batch += rows(f"h{host}", 25, start=agent * 1000, agent=f"a{agent}",
                          verdict=verdict)
        store.store_flows(f"h{host}", 1, batch)
    store._db.execute("ANALYZE")  # statistics must not talk the planner out of the index


@pytest.mark.parametrize("query, index", [
    (FlowQuery(), "flows_by_received"),
    (FlowQuery(since_ns=BASE, until_ns=BASE + 10 * NS), "flows_by_received"),
    (FlowQuery(event_type="flow_end", since_ns=BASE), "flows_by_received"),
    (FlowQuery(agent="a1", since_ns=BASE + 600 * NS), "flows_by_agent"),
    (FlowQuery(verdict="DENIED", since_ns=BASE), "flows_by_verdict"),
    (FlowQuery(host="h1", limit=100), "flows_by_host"),
    (FlowQuery(host="h1", agent="a2", verdict="DENIED"), "flows_by_agent"),
    (FlowQuery(host="h1", verdict="DENIED", event_type="connect"), "flows_by_host"),
])
def test_every_query_reads_an_index_in_order(sqlite_store: SqliteStore, query: FlowQuery,
                                             index: str) -> None:
    store = sqlite_store
    _populate(store)
    plan = list(iter_explain(store._db, query))
    assert len(plan) == 1 and f"USING INDEX {index}" in plan[0], plan
    # the index's order is the answer's order: no sort, and LIMIT stops the read early
    assert not any("TEMP B-TREE" in step for step in plan), plan
    if query.since_ns or query.host or query.agent or query.verdict:
        assert plan[0].startswith("SEARCH"), plan  # a range of the index, not all of it
    sql, params = flow_sql(query)
    assert "ORDER BY received_ns DESC, time_ns DESC LIMIT" in sql and params[-1] == query.limit + 1


def test_the_log_starts_over_while_batches_keep_coming(tmp_path: Path) -> None:
    """Batches committed back to back, as ReportFlows does under load: PASSIVE
    checkpoints alone copy every frame, yet the log never starts over and grows
    by every batch (786 MB in a 20-second benchmark). The checkpointer must
    rewind it, and the commit after that cuts the file back to the limit."""
    store = SqliteStore.create(tmp_path / "ztnet.db", "test.example")
    limit = 1 << 20
    checkpointer = store.checkpoint_in_background(0.01, wal_limit=limit)
    wal = tmp_path / "ztnet.db-wal"
    try:
        sequence, largest = 0, 0
        # enough batches that a log that is never rewound holds tens of megabytes
        while sequence < 300 or checkpointer.restarts < 3:
            sequence += 1
            assert sequence <= 5000, f"the log never started over ({checkpointer.restarts})"
            store.store_flows("h1", sequence, rows("h1", 200, start=sequence * 200))
            largest = max(largest, wal.stat().st_size)
        restarts = checkpointer.restarts
        while checkpointer.restarts == restarts:  # a restart, then a commit to apply it
            sequence += 1
            assert sequence <= 10000, "the checkpointer stopped"
            store.store_flows("h1", sequence, rows("h1", 1, start=sequence * 200))
        store.store_flows("h1", sequence + 1, rows("h1", 1, start=(sequence + 1) * 200))
        assert store.flow_count() >= 300 * 200
        written = sequence * 200 * 500  # at least 500 bytes of frames per row
        assert largest < written / 4, (largest, written)
        # the first commit after the rewind (a one-row batch) cut the file to the limit
        assert wal.stat().st_size <= limit, (wal.stat().st_size, largest)
    finally:
        checkpointer.stop()
        store.close()


def test_queries_from_another_thread_see_committed_batches(store: Store) -> None:
    store.store_flows("h1", 1, rows("h1", 3))
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(len(store.query_flows(FlowQuery()).records)))
    worker.start()
    worker.join(10)
    store.store_flows("h1", 2, rows("h1", 2, start=10))
    page = store.query_flows(FlowQuery(limit=4))
    assert results == [3] and len(page.records) == 4 and page.more


def test_a_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    SqliteStore.create(path, "test.example").close()
    with sqlite3.connect(path) as db:  # back to what the first release made
        drop_tpm_schema(db)
        for table in ("flows", "flow_hosts"):
            db.execute(f"DROP TABLE {table}")
        db.execute("DELETE FROM meta WHERE key = 'flow_rows'")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        assert store.store_flows("h1", 1, rows("h1", 2)).stored == 2
        assert store.flow_count() == 2
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == \
            str(SCHEMA_VERSION)
    SqliteStore.open(path).close()  # and opens again as it is


_SCHEMA_2 = (
    "CREATE TABLE flows (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, host TEXT NOT NULL, "
    "agent TEXT NOT NULL, verdict TEXT NOT NULL, drop_reason TEXT NOT NULL, event_type TEXT "
    "NOT NULL, proto INTEGER NOT NULL, destination TEXT NOT NULL, destination_port INTEGER NOT "
    "NULL, grant_id TEXT NOT NULL, uuid TEXT NOT NULL, record TEXT NOT NULL)",
    "CREATE UNIQUE INDEX flows_by_time ON flows (time_ns, uuid)",
    "CREATE INDEX flows_by_agent ON flows (agent, time_ns)",
    "CREATE INDEX flows_by_host ON flows (host, time_ns)",
    "CREATE INDEX flows_by_verdict ON flows (verdict, time_ns)",
    "CREATE TABLE flow_hosts (host TEXT PRIMARY KEY, sequence INTEGER NOT NULL)",
)


def test_a_schema_2_database_gets_receive_times_and_host_counts(tmp_path: Path) -> None:
    path = tmp_path / "ztnet.db"
    SqliteStore.create(path, "test.example").close()
    far_future = 9_000_000_000 * NS  # 2255: stored before ingest bounded record times
    with sqlite3.connect(path) as db:
        drop_tpm_schema(db)  # schema 2 had neither receive times nor TPM attestation
        db.execute("DROP TABLE flows")
        db.execute("DROP TABLE flow_hosts")
        for statement in _SCHEMA_2:
            db.execute(statement)
        for row in rows("h1", 3) + [FlowRow.of(make_record("h2", time_ns=far_future), 0)]:
            db.execute("INSERT INTO flows (time_ns, host, agent, verdict, drop_reason, "
                       "event_type, proto, destination, destination_port, grant_id, uuid, "
                       "record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row.values()[:-1])
        db.execute("INSERT INTO flow_hosts VALUES ('h1', 7)")
        db.execute("UPDATE meta SET value = '4' WHERE key = 'flow_rows'")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    store = SqliteStore.open(path)
    try:
        counts = dict(store._db.execute("SELECT host, rows FROM flow_hosts").fetchall())
        assert counts == {"h1": 3, "h2": 1} and store.flow_sequence("h1") == 7
        received = dict(store._db.execute("SELECT host, max(received_ns) FROM flows "
                                          "GROUP BY host").fetchall())
        # the upgrade's time, or the record's own if earlier: never 2255
        assert received["h2"] < far_future
        assert received["h1"] == min(BASE + 2 * NS, received["h2"])
        assert store.prune_flows(before_ns=0, max_rows=0, max_rows_per_host=1, chunk=10) == 2
    finally:
        store.close()


def test_answers_are_cut_at_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows, "MAX_RESPONSE_BYTES", 25)
    response = flows.response(["x" * 10] * 3, more=False)
    assert len(response.records) == 2 and response.truncated
    assert not flows.response(["x" * 10] * 2, more=False).truncated


def test_decode_keeps_columns_and_refuses_bad_bounds() -> None:
    record = make_record("h1", event_type=EventType.FLOW_END, time_ns=BASE)
    (row,) = flows.decode_batch("h1", [row_json(record)], BASE)
    assert (row.host, row.agent, row.verdict, row.event_type, row.grant_id) == \
        ("h1", "bot", "ALLOWED", "flow_end", "g-0000000000000abc")
    with pytest.raises(RpcFailure, match=r"records\[0\]: protocol or destination"):
        flows.decode_batch("h1", [row_json(make_record("h1", port=70000, time_ns=BASE))], BASE)


def row_json(record: FlowRecord) -> bytes:
    return to_json(record).encode()


def test_dns_query_records_are_stored_and_read_back_whole(store: Store) -> None:
    from ztnet.daemon.dnsflows import DnsRecords
    from ztnet.daemon.resolverconf import QueryRecord
    from ztnet.observe.records import RecordContext, from_json

    ctx = RecordContext(host="h1", trust_domain="test.example", agent_names={1: "bot"})
    made = DnsRecords()
    records = [made.record(QueryRecord("bot", "api.lab.test", "A", "answered",
                                       answers=("203.0.113.10",), grant_ids=(7,),
                                       rcode="NOERROR"), ctx),
               made.record(QueryRecord("bot", "evil.lab.test", "A", "refused",
                                       rcode="REFUSED"), ctx)]
    batch = flows.decode_batch("h1", [to_json(r).encode() for r in records], BASE)
    assert store.store_flows("h1", 1, batch).stored == 2
    store.store_flows("h1", 2, rows("h1", 3))
    page = store.query_flows(FlowQuery(event_type=EventType.DNS.value))
    assert sorted(map(from_json, page.records), key=lambda r: r.time_ns) == records
    denied = store.query_flows(FlowQuery(event_type="dns", verdict=Verdict.DENIED.value))
    assert [from_json(r).dns for r in denied.records] == [records[1].dns]
