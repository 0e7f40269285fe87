"""Controller replicas over PostgreSQL: apply → every simulated host acknowledged, with one
and with two replicas; failover; CPU and RSS per replica; flow ingest into PostgreSQL.

    nice -n 10 .venv/bin/python -m benchmarks.replicas [--hosts 1000] [--applies 20] [--out F]

Everything is real except the hosts: a PostgreSQL server (ztnet.testing.postgres, its
own cluster in a temporary directory), `ztnet controller serve --database` processes on
loopback, and one helper process (this module with ``--simulate``) holding one mutual-TLS
grant stream per host (each host enrolled with its own token and certificate) and ACKing
every push as it arrives; with two replicas, even hosts follow replica 0 and odd ones
replica 1. No BPF is involved: what is measured is the control plane.

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
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks.flowstore_fleet import AGENTS, Fleet
from ztnet.controller.enrollment import create_token
from ztnet.controller.pgstore import PgStore
from ztnet.controller.store import SqliteStore, Store
from ztnet.testing.controller import (
    ROOT,
    ControllerProcess,
    ControllerState,
    init_controller,
    policy_toml,
    replica_state,
)
from ztnet.testing.nodes import enroll
from ztnet.testing.postgres import PostgresServer
from ztnet.v1 import node_pb2, node_pb2_grpc

READY_TIMEOUT = 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- the simulated hosts (the --simulate helper) --------------------------------------


async def _host(host: dict[str, str], addresses: list[str], ca: bytes,
                seen: dict[int, dict[str, float]], held: dict[str, int],
                changed: asyncio.Event) -> None:
    """One host: subscribe with the version held, ACK each push, on a lost stream try the
    next replica after the daemon's first backoff step."""
    turn = int(host["replica"])
    credentials = grpc.ssl_channel_credentials(ca, host["key"].encode(), host["cert"].encode())
    while True:
        address = addresses[turn % len(addresses)]
        try:
            async with grpc.aio.secure_channel(address, credentials) as channel:
                call = node_pb2_grpc.NodeServiceStub(channel).StreamGrants()
                await call.write(node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
                    host=host["host"], version_held=held[host["host"]])))
                while True:
                    push = await call.read()
                    if push is grpc.aio.EOF:
                        break
                    now = time.monotonic()
                    await call.write(node_pb2.GrantStreamRequest(
                        ack=node_pb2.Ack(version=push.version, nonce=push.nonce)))
                    held[host["host"]] = push.version
                    seen.setdefault(push.version, {}).setdefault(host["host"], now)
                    changed.set()
        except grpc.RpcError:
            pass
        turn += 1
        await asyncio.sleep(0.25 + 0.25 * (hash(host["host"]) % 100) / 100)


async def simulate(spec_path: Path) -> int:
    """stdin: ``wait V`` lines; stdout: {"version": V, "times": {host: t}} once every host
    has version V or later."""
    spec = json.loads(spec_path.read_text())
    hosts: list[dict[str, str]] = spec["hosts"]
    seen: dict[int, dict[str, float]] = {}
    held = {h["host"]: 0 for h in hosts}
    changed = asyncio.Event()
    tasks = [asyncio.create_task(_host(h, spec["addresses"], spec["ca"].encode(), seen, held,
                                       changed)) for h in hosts]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"started": len(tasks)}), flush=True)
    while line := (await reader.readline()).decode().strip():
        version = int(line.split()[1])
        while True:
            times: dict[str, float] = {}
            for v, at in seen.items():
                if v >= version:
                    for name, t in at.items():
                        times[name] = min(t, times.get(name, t))
            if len(times) == len(hosts):
                break
            changed.clear()
            await changed.wait()
        print(json.dumps({"version": version, "times": times}), flush=True)
    for task in tasks:
        task.cancel()
    return 0


class Simulator:
    def __init__(self, spec: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.replicas", "--simulate",
                                      str(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator exited")
        message: dict[str, Any] = json.loads(line)
        return message

    def wait(self, version: int) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"wait {version}\n")
        self.proc.stdin.flush()
        times: dict[str, float] = self._read()["times"]
        return times

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# --- the run ----------------------------------------------------------------------------


def enroll_hosts(state: ControllerState, replicas: list[ControllerProcess],
                 count: int) -> list[dict[str, str]]:
    store = PgStore.open(str(state.database))
    try:
        tokens = [create_token(store, f"sim-{i:04d}", ttl=3600, now=time.time())
                  for i in range(count)]
    finally:
        store.close()
    hosts = []
    for i, token in enumerate(tokens):
        identity = enroll(replicas[i % len(replicas)], f"sim-{i:04d}", token=token)
        hosts.append({"host": identity.host, "key": identity.key_pem.decode(),
                      "cert": identity.cert_pem.decode(), "replica": str(i % len(replicas))})
    return hosts


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
        spec = work / f"hosts-{count}.json"
        spec.write_text(json.dumps({"addresses": [r.address for r in replicas],
                                    "ca": state.ca_pem.decode(),
                                    "hosts": enroll_hosts(state, replicas, hosts)}))
        enroll_s = time.monotonic() - enrolled
        simulator = Simulator(spec)
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
    parser.add_argument("--simulate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate:
        return asyncio.run(simulate(args.simulate))
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
