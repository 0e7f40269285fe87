"""Flow store benchmark: one million flow records in the controller's database.

    .venv/bin/python -m benchmarks.flowstore [--records 1000000] [--runs 200] [--out FILE]

1. **Insert**: synthetic records from a fleet of 50 hosts and 200 agents over the last
   24 h (flowstore_fleet.py: Zipf agent activity, 8 % denied; schema-1 JSON with the
   real UUIDv5), buffered per host and stored through the ``Store``
   (``SqliteStore.store_flows``: one transaction per batch of 500, sequence and uuid
   checks included) in a fresh `ztnet controller init` state directory, with WAL
   checkpoints in their own thread as `controller serve` runs them. Records are built
   100,000 at a time, then stored, so the timings are the store's alone. Reported: the
   insert rate, the time of one batch (how long the event loop is held), the size on disk.
2. **Queries through the store** (``query_flows``, its read-only connection), each shape
   ``--runs`` times with random parameters: an agent over the last 10 minutes, denied
   flows of the last hour, a host's newest 100, the newest 100 of all, and a bad case
   (an agent on a host it never ran on: the agent index is read to its end).
3. **The same queries through `QueryFlows`**: a `ztnet controller serve` process on that
   database, over mutual TLS on loopback, with an admin certificate (AdminClient).
4. **Ingest through `ReportFlows`**: one enrolled host streams batches of 500 fresh
   records (the controller decodes and checks every record, then stores the batch).
5. **Retention**: the time of one prune chunk (``Retention.chunk`` oldest rows deleted).

The page cache is warm (the data was just written); everything is on one machine.
See docs/performance.md for the method and a reference run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.datapath import machine_facts
from benchmarks.flowstore_fleet import AGENTS, NS, SPAN_NS, Fleet, check_fleet, layout
from ztnet.controller.flows import Retention
from ztnet.controller.flowstore import FlowQuery, FlowRow
from ztnet.controller.store import SqliteStore
from ztnet.testing.controller import ControllerProcess, ControllerState, init_controller
from ztnet.testing.flows import report
from ztnet.testing.nodes import enroll

BATCH = 500


def insert(store: SqliteStore, fleet: Fleet, count: int, end_ns: int,
           rng: random.Random) -> dict[str, Any]:
    hosts, runs, weights = layout(rng)
    agents = [f"agent-{i:03d}" for i in range(AGENTS)]
    host_of = {agent: hosts[i] for i, run in enumerate(runs) for agent in run}
    times = sorted(rng.randrange(end_ns - SPAN_NS, end_ns) // 1000 * 1000 for _ in range(count))
    chosen = rng.choices(agents, weights, k=count)
    buffers: dict[str, list[FlowRow]] = {host: [] for host in hosts}
    pending: list[tuple[str, list[FlowRow]]] = []
    sequences = dict.fromkeys(hosts, 0)
    batch_seconds: list[float] = []
    build = 0.0

    def store_pending() -> None:
        # built first, stored after: the insert timings are the store's alone
        for host, rows in pending:
            sequences[host] += 1
            started = time.perf_counter()
            store.store_flows(host, sequences[host], rows)
            batch_seconds.append(time.perf_counter() - started)
        pending.clear()

    started = time.perf_counter()
    for cookie, (time_ns, agent) in enumerate(zip(times, chosen, strict=True)):
        host = host_of[agent]
        buffers[host].append(fleet.row(host, agent, time_ns, cookie))
        if len(buffers[host]) == BATCH:
            pending.append((host, buffers[host]))
            buffers[host] = []
            if len(pending) == 200:  # 100,000 records at a time: bounded memory
                build += time.perf_counter() - started
                store_pending()
                started = time.perf_counter()
    pending += [(host, rows) for host, rows in buffers.items() if rows]
    build += time.perf_counter() - started
    store_pending()
    stored = sum(batch_seconds)
    return {"records": store.flow_count(), "batches": len(batch_seconds),
            "build_seconds": build, "insert_seconds": stored,
            "insert_per_second": count / stored, "batch_ms": spread_ms(batch_seconds),
            "hosts": hosts, "runs": runs, "agents_by_weight": weighted(agents, weights)}


def weighted(agents: list[str], weights: list[float]) -> list[str]:
    return [a for _, a in sorted(zip(weights, agents, strict=True), reverse=True)]


def shapes(info: dict[str, Any], end_ns: int,
           rng: random.Random) -> dict[str, Callable[[], FlowQuery]]:
    hosts: list[str] = info["hosts"]
    runs: list[list[str]] = info["runs"]
    top = info["agents_by_weight"][0]
    stranger = next(h for h, run in zip(hosts, runs, strict=True) if top not in run)
    return {
        "agent, last 10 min": lambda: FlowQuery(
            agent=rng.choice(info["agents_by_weight"][:50]), since_ns=end_ns - 600 * NS),
        "denied, last hour": lambda: FlowQuery(verdict="DENIED", since_ns=end_ns - 3600 * NS),
        "host, newest 100": lambda: FlowQuery(host=rng.choice(hosts)),
        "no filter, newest 100": lambda: FlowQuery(),
        "bad case: busiest agent on a host it never ran on": lambda: FlowQuery(
            agent=top, host=stranger),
    }


def time_queries(run: Callable[[FlowQuery], int], queries: dict[str, Callable[[], FlowQuery]],
                 runs: int) -> dict[str, Any]:
    results = {}
    for name, make_query in queries.items():
        seconds, returned = [], []
        run(make_query())  # warm-up, not counted
        for _ in range(runs if not name.startswith("bad") else max(5, runs // 10)):
            query = make_query()
            started = time.perf_counter()
            returned.append(run(query))
            seconds.append(time.perf_counter() - started)
        results[name] = {"ms": spread_ms(seconds), "rows": statistics.fmean(returned),
                         "runs": len(seconds)}
    return results


def rpc_part(state_root: Path, queries: dict[str, Callable[[], FlowQuery]], runs: int,
             fleet: Fleet) -> dict[str, Any]:
    state = ControllerState(state_root, "bench.example")
    # no per-host flow rate: this measures what the controller can ingest
    with ControllerProcess(state, extra_args=["--flow-retention", "0", "--host-flow-rate", "off"]) \
            as controller:
        with controller.admin() as admin:
            def run(query: FlowQuery) -> int:
                return len(admin.query_flows(
                    host=query.host, agent=query.agent, verdict=query.verdict,
                    since_ns=query.since_ns, limit=query.limit).records)

            timings = time_queries(run, queries, runs)
        identity = enroll(controller, "bench-ingest")
        now = time.time_ns() // 1000 * 1000
        cookies = itertools.count(10**9)
        # encoded beforehand: only the controller's work (and gRPC) is timed
        batches = [(seq + 1, [fleet.row("bench-ingest", "agent-000", now + seq * NS + i * 1000,
                                        next(cookies)).record.encode() for i in range(BATCH)])
                   for seq in range(40)]
        started = time.perf_counter()
        acks = report(controller, identity, batches, timeout=120).acks
        elapsed = time.perf_counter() - started
        assert acks == [seq for seq, _ in batches], acks
    return {"queries": timings, "ingest": {"records": 40 * BATCH, "seconds": elapsed,
                                           "per_second": 40 * BATCH / elapsed}}


def spread_ms(values: Sequence[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)

    def pct(q: float) -> float:
        position = (len(ms) - 1) * q
        low = int(position)
        high = min(low + 1, len(ms) - 1)
        return ms[low] + (ms[high] - ms[low]) * (position - low)

    return {"p50": pct(0.5), "p99": pct(0.99), "max": ms[-1], "mean": statistics.fmean(ms)}


def prune_chunks(store: SqliteStore, chunks: int) -> dict[str, float]:
    chunk, seconds = Retention().chunk, []
    for _ in range(chunks):
        started = time.perf_counter()
        store.prune_flows(before_ns=0, max_rows=store.flow_count() - chunk, chunk=chunk)
        seconds.append(time.perf_counter() - started)
    return spread_ms(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=200, help="runs of each query shape")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    args = parser.parse_args(argv)
    rng = random.Random(20270115)
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="ztnet-flowstore-"))
    try:
        state = init_controller(workdir / "state", "bench.example")
        database = state.paths.database
        end_ns = time.time_ns()
        store = SqliteStore.open(database)
        checkpointer = store.checkpoint_in_background()  # as `controller serve` does
        try:
            print(f"inserting {args.records} records …", file=sys.stderr)
            fleet = Fleet(rng)
            check_fleet(fleet)
            info = insert(store, fleet, args.records, end_ns, rng)
            checkpointer.stop()
            store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            size = database.stat().st_size
            queries = shapes(info, end_ns, rng)
            print("querying the store …", file=sys.stderr)
            direct = time_queries(lambda q: len(store.query_flows(q).records), queries,
                                  args.runs)
        finally:
            checkpointer.stop()
            store.close()
        print("querying over QueryFlows, ingesting over ReportFlows …", file=sys.stderr)
        rpc = rpc_part(state.root, queries, args.runs // 2, fleet)
        store = SqliteStore.open(database)
        checkpointer = store.checkpoint_in_background()
        try:
            prune = prune_chunks(store, 20)
        finally:
            checkpointer.stop()
            store.close()
        for key in ("hosts", "runs", "agents_by_weight"):
            info.pop(key)
        # other work on the machine (a lab of VMs …) moves these figures: say how much
        load = {"before": load_before, "after": os.getloadavg()[0]}
        results = {"machine": machine_facts(), "load_1min": load, "insert": info,
                   "database_bytes": size, "bytes_per_record": size / args.records,
                   "store_queries": direct, "rpc": rpc, "prune_chunk_ms": prune}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_table(r: dict[str, Any]) -> None:
    ins = r["insert"]
    print(f"insert: {ins['records']} records in {ins['batches']} batches of {BATCH}: "
          f"{ins['insert_per_second']:,.0f} records/s; one batch p50 {ins['batch_ms']['p50']:.1f}"
          f" ms, p99 {ins['batch_ms']['p99']:.1f} ms, max {ins['batch_ms']['max']:.1f} ms; "
          f"building the records {ins['build_seconds']:.1f} s")
    print(f"load average (1 min) before / after: {r['load_1min']['before']:.1f} / "
          f"{r['load_1min']['after']:.1f}")
    print(f"database: {r['database_bytes'] / 2**20:.0f} MiB, "
          f"{r['bytes_per_record']:.0f} bytes per record")
    print("\n| query | rows | store p50 | store p99 | QueryFlows p50 | QueryFlows p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, direct in r["store_queries"].items():
        rpc = r["rpc"]["queries"][name]
        print(f"| {name} | {direct['rows']:.0f} | {direct['ms']['p50']:.2f} ms | "
              f"{direct['ms']['p99']:.2f} ms | {rpc['ms']['p50']:.2f} ms | "
              f"{rpc['ms']['p99']:.2f} ms |")
    ingest = r["rpc"]["ingest"]
    print(f"\nReportFlows ingest: {ingest['records']} records in {ingest['seconds']:.2f} s = "
          f"{ingest['per_second']:,.0f} records/s")
    print(f"prune chunk ({Retention().chunk} rows): p50 {r['prune_chunk_ms']['p50']:.1f} ms, "
          f"max {r['prune_chunk_ms']['max']:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
