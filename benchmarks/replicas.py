"""Controller replicas over PostgreSQL: apply → every simulated host acknowledged, with one
and with two replicas; failover; CPU and RSS per replica; flow ingest into PostgreSQL.

    nice -n 10 .venv/bin/python -m benchmarks.replicas [--hosts 1000] [--applies 20] [--out F]

Everything is real except the hosts: a PostgreSQL server (ztnet.testing.postgres, its
own cluster in a temporary directory), `ztnet controller serve --database` processes on
loopback, and one helper process (ztnet.testing.simhosts, which
tests/controller/test_replicas.py uses too) holding one mutual-TLS grant stream per host
(each host enrolled with its own token and certificate) and ACKing every push as it
arrives; with two replicas, even hosts follow replica 0 and odd ones replica 1.
No BPF is involved: what is measured is the control plane.

1. **apply → all hosts acknowledged**: ApplyPolicy through replica 0 (not waiting for the
   answers); the clock starts before the call, and each host's time is when the helper read
   the push of that version (CLOCK_MONOTONIC, shared by the processes). Reported: per
   apply the time until the last host had it (p50/p99 over the applies), and every host's
   time (p50/p99 over hosts × applies).
2. **failover**: replica 0 is killed (SIGKILL); its hosts reconnect to replica 1 (after
   the daemon's first backoff step, 0.25-0.5 s) holding their version; an apply through
   replica 1 right after the kill is timed until every host has it.
3. **CPU and RSS per replica** over the apply series (psutil: user+system seconds, RSS).
4. **flow ingest into PostgreSQL**: ``PgStore.store_flows`` in batches of 500 from this
   process (the path ReportFlows takes after decoding), against ``SqliteStore`` in the same
   run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.flowstore_fleet import AGENTS, Fleet
from ztnet.controller.pgstore import PgStore
from ztnet.controller.store import SqliteStore, Store
from ztnet.testing.controller import (
    ControllerProcess,
    init_controller,
    policy_toml,
    replica_state,
)
from ztnet.testing.postgres import PostgresServer
from ztnet.testing.simhosts import Simulator, enroll_hosts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- the run ----------------------------------------------------------------------------


def apply_series(replica: ControllerProcess, simulator: Simulator, applies: int,
                 processes: list[psutil.Process]) -> dict[str, Any]:
    all_acked, per_host = [], []
    cpu0 = [p.cpu_times() for p in processes]
    with replica.admin() as admin:
        for n in range(applies + 2):
            text = policy_toml({"bot": [("10.0.0.1", "443"), (f"10.1.{n // 250}.{n % 250 + 1}",
                                                             "443")]})
            started = time.monotonic()
            version = admin.apply_policy(text, wait=0.001).version
            times = simulator.wait(version)
            if n < 2:
                continue  # warm-up
            latencies = [t - started for t in times.values()]
            all_acked.append(max(latencies))
            per_host += latencies
    cpu = [sum(b[:2]) - sum(a[:2]) for a, b in zip(cpu0, (p.cpu_times() for p in processes),
                                                     strict=True)]
    return {"applies": applies,
            "all_acked_p50_s": round(percentile(all_acked, 0.5), 3),
            "all_acked_p99_s": round(percentile(all_acked, 0.99), 3),
            "per_host_p50_s": round(percentile(per_host, 0.5), 3),
            "per_host_p99_s": round(percentile(per_host, 0.99), 3),
            "cpu_s_per_apply": [round(c / applies, 4) for c in cpu],
            "rss_mib": [round(p.memory_info().rss / 2**20, 1) for p in processes]}


def run_replicas(work: Path, server: PostgresServer, count: int, hosts: int,
                 applies: int) -> dict[str, Any]:
    state = init_controller(work / f"r{count}-0", database=server.create_database())
    states = [state] + [replica_state(state, work / f"r{count}-{i}") for i in range(1, count)]
    policy = work / f"policy-{count}.toml"
    policy.write_text(policy_toml({"bot": [("10.0.0.1", "443")]}))
    extra = ["--apply-timeout", "1s", "--host-subscribe-rate", "off", "--host-max-streams", "0"]
    replicas = [ControllerProcess(s, policy=policy if i == 0 else None, extra_args=extra)
                for i, s in enumerate(states)]
    simulator: Simulator | None = None
    try:
        for replica in replicas:
            replica.start()
        enrolled = time.monotonic()
        identities = enroll_hosts(state, replicas, hosts)
        enroll_s = time.monotonic() - enrolled
        simulator = Simulator(work / f"hosts-{count}.json", replicas, identities)
        processes = [psutil.Process(r.pid) for r in replicas]
        with replicas[0].admin() as admin:
            simulator.wait(admin.get_policy().version)  # everyone connected and current
        result: dict[str, Any] = {"replicas": count, "hosts": hosts,
                                  "enroll_s": round(enroll_s, 1)}
        result["apply"] = apply_series(replicas[0], simulator, applies, processes)
        if count > 1:
            killed = time.monotonic()
            replicas[0].stop(signal.SIGKILL)
            with replicas[1].admin() as admin:
                version = admin.apply_policy(policy_toml({"bot": [("10.0.0.9", "443")]}),
                                             wait=0.001).version
            times = simulator.wait(version)
            orphans = [t - killed for name, t in times.items() if int(name[-4:]) % count == 0]
            result["failover"] = {"hosts_moved": len(orphans),
                                  "kill_to_all_hosts_updated_s": round(max(times.values())
                                                                       - killed, 3),
                                  "moved_hosts_p50_s": round(percentile(orphans, 0.5), 3)}
        return result
    finally:
        if simulator is not None:
            simulator.close()
        for replica in replicas:
            replica.stop(signal.SIGKILL)


def ingest(store: Store, total: int, batch: int = 500) -> float:
    """Records a second through ``store_flows``: 50 hosts, batches of ``batch`` (the
    fleet of benchmarks/flowstore.py, received now)."""
    fleet = Fleet(random.Random(7))
    now_ns = time.time_ns()
    batches = []
    for n in range(0, total, batch):
        host = f"h{(n // batch) % 50}"
        batches.append((host, [fleet.row(host, f"agent-{n % AGENTS}", now_ns + (n + i) * 1000,
                                         n + i) for i in range(batch)]))
    started = time.monotonic()
    sequences: dict[str, int] = {}
    for host, rows in batches:
        sequences[host] = sequences.get(host, 0) + 1
        store.store_flows(host, sequences[host], rows)
    return total / (time.monotonic() - started)


def flow_ingest(work: Path, server: PostgresServer, total: int) -> dict[str, Any]:
    pg = PgStore.open(server.create_database(), trust_domain="test.example")
    try:
        pg_rate = ingest(pg, total)
    finally:
        pg.close()
    sqlite = SqliteStore.create(work / "flows.db", "test.example")
    try:
        sqlite_rate = ingest(sqlite, total)
    finally:
        sqlite.close()
    return {"records": total, "postgres_per_s": round(pg_rate), "sqlite_per_s": round(sqlite_rate)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--applies", type=int, default=20)
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, \
            PostgresServer.start() as server:
        work = Path(tmp)
        for count in (1, 2):
            results[f"replicas_{count}"] = run_replicas(work, server, count, args.hosts,
                                                        args.applies)
            print(json.dumps(results[f"replicas_{count}"]), flush=True)
        results["flow_ingest"] = flow_ingest(work, server, args.flows)
        print(json.dumps(results["flow_ingest"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
