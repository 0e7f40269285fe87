"""Flow-pipeline benchmark: the highest connection rate a real daemon traces with no loss, its
CPU at that rate, and the latency from connect() to the record in flows.jsonl.

    sudo .venv/bin/python -m benchmarks.flows [--mode standalone|controller|both]
        [--rates 2000,5000,...] [--per-agent 800] [--seconds 10] [--latency 200] [--out FILE]

A real `ztnet daemon` runs with its own instance (``bench-<pid>-flows``) and a Prometheus
listener (``--metrics``): standalone on a signed bundle file, or (``--mode controller``)
enrolled with a real `ztnet controller serve`, so that every record also goes through the
spool and the ReportFlows upload. The agents are ``benchmarks/flowgen.c`` (compiled at run
time), each started with `ztnet run --agent botN`; each makes TCP connections (connect,
close with an RST) to a listener outside every agent cgroup (``benchmarks/worker.c
listen``), on an absolute schedule at a fixed rate. Allowed connections, because the kernel
rate-limits deny events per agent (100 a second by default, by design); every connection
makes two records, its verdict (connect) and its end (flow_end, when the socket is
released). The kernel also budgets each agent's allowed-side events (2,000 a second,
``ZT_ALLOW_EVENTS_PER_SEC``, as shipped), so a rate is spread over as many agents as it
takes at ``--per-agent`` connections a second each (default 800: 1,600 records a second,
under the budget with room for a second's jitter); what a budget dropped anyway is counted
(``budget_dropped``) and fails the run.

For each rate, in increasing order, for ``--seconds``:

* records: the new lines of flows.jsonl (followed as `ztnet observe --follow` does, across
  rotations) must equal 2 x
  the connections that succeeded, and the pipeline must have caught up within
  ``--drain`` seconds of the generator's end (else it only buffered: the ring buffer holds
  4 MiB, the dispatcher 65,536 records, and a longer run would lose);
* the pipeline may lag and still lose nothing, so the benchmark then waits until the log stops
  growing for 5 s: "lost" is what never arrived;
* from the metrics endpoint, once it shows every connection (``connect_allow``): the
  kernel's ``events_lost`` and ``flows_untracked`` did not grow, the dispatcher dropped
  nothing (``ztnet_flow_records_dropped_total``); in controller mode also: the controller
  acknowledged every record (``ztnet_flow_upload_records_total``), the spool dropped none;
* the daemon's CPU (user + system, all threads, psutil) over the run and its drain, as a
  share of one CPU; and how busy the whole machine was (all CPUs, the load generator and
  the listener included), with the load average before the run: other work on a shared
  machine moves these figures.

The ladder stops at the first rate that loses, lags or that the generator cannot keep; a
few bisection steps (``--refine``) narrow the gap, and the best rate is then held for
``--confirm`` seconds (a backlog that grows slowly shows only in a long run). Then the
latency: ``--latency`` connections 20 ms apart, each stamped with CLOCK_REALTIME just
before connect() and its socket cookie; a thread follows flows.jsonl (inotify) and stamps
the moment the connect record with that cookie can be read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.controller import cpu_seconds, spread
from benchmarks.datapath import build_worker, machine_facts, remove_stale_instances
from ztnet.daemon.enroll import enroll
from ztnet.datapath.datapath import teardown
from ztnet.grants.bundle import sign_bundle
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.instance import FLOWS_FILE, Instance
from ztnet.observe.tail import LineTail
from ztnet.pki import fingerprint
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle
from ztnet.testing.agents import agent_argv
from ztnet.testing.controller import ControllerProcess, create_token, init_controller, policy_toml
from ztnet.testing.daemon import HOST as BUNDLE_HOST
from ztnet.testing.daemon import DaemonProcess
from ztnet.testing.ports import free_port

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
DEFAULT_RATES = "2000,5000,10000,15000,20000,25000,30000"


def agent_names(count: int) -> list[str]:
    return [f"bot{i}" for i in range(count)]


class BenchError(RuntimeError):
    pass


# --- counting records ----------------------------------------------------------------------


class FlowLog:
    """Follows flows.jsonl as `ztnet observe --follow` does (observe's LineTail: inotify,
    across rotations, each line once): counts the records written since it started and,
    while ``stamping``, notes when the connect record of each socket cookie could first be
    read."""

    def __init__(self, path: Path) -> None:
        self.lines = 0
        self.seen: dict[int, int] = {}
        self.stamping = False
        self.stop = threading.Event()
        self.tail = LineTail(path, poll_interval=0.5)
        for _ in self.tail.history(newer_than=time.time()):
            pass  # positioned at the end: only what is written from now on counts
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        # counted a read at a time: at 50,000 lines a second a loop per line took 6.5 % of a
        # CPU on the two vCPUs the daemon and the load generators share
        for lines in self.tail.follow_batches(self.stop):
            self.lines += len(lines)
            if self.stamping:
                now = time.time_ns()
                for line in lines:
                    record = json.loads(line)
                    if record["event_type"] == "connect":
                        self.seen.setdefault(int(record["socket_cookie"]), now)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.tail.close()


def scrape(port: int) -> dict[str, float]:
    """The metrics this benchmark checks, by sample name (and label)."""
    text = urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ztnet_datapath_total":
                values[sample.labels["counter"]] = sample.value
            elif sample.name == "ztnet_agent_events_dropped_total":
                key = f"events_dropped_{sample.labels['cause']}"
                values[key] = values.get(key, 0.0) + sample.value
            elif sample.name in ("ztnet_flow_records_dropped_total",
                                 "ztnet_flow_upload_dropped_total"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name.startswith(("ztnet_flow_", "ztnet_events_")):
                values[sample.name] = sample.value
    return values


# --- the setup -----------------------------------------------------------------------------


def compile_flowgen(work: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BenchError("no C compiler (cc): the load generator is C")
    binary = work / "flowgen"
    result = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / "flowgen.c")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"compiling flowgen.c failed:\n{result.stderr}")
    return binary


def start_listener(stack: ExitStack, work: Path) -> int:
    """accept() and close() forever, outside every agent cgroup."""
    worker = build_worker("c", work)
    proc = subprocess.Popen(worker.command("listen"), stdout=subprocess.PIPE, text=True)
    stack.callback(proc.wait)
    stack.callback(proc.kill)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchError("the listener exited before reporting its port")
    return int(json.loads(line)["port"])


def start_daemon(stack: ExitStack, mode: str, instance: Instance, work: Path, port: int,
                 metrics_port: int, agents: list[str]) -> DaemonProcess:
    metrics = ["--metrics", f"{LOOPBACK}:{metrics_port}"]
    state = work / f"state-{mode}"
    text = policy_toml({agent: [(f"{LOOPBACK}/32", str(port))] for agent in agents})
    if mode == "standalone":
        key, pub = generate_keypair(work / "keys")
        bundle = work / "bundle.json"
        policy = parse_policy(text, "bench-policy.toml")
        bundle.write_bytes(sign_bundle(issue_bundle(
            policy, host=BUNDLE_HOST, version=1, now=time.time(), issuer="bench",
            default_ttl=3 * 3600), load_private_key(key)))
        daemon = DaemonProcess(instance, pub, bundle, state, extra_args=metrics)
    else:
        policy_path = work / "policy.toml"
        policy_path.write_text(text)
        # no per-host flow rate limit (10,000/s by default): what is measured is the daemon
        # and the controller's ingest, not the policy that protects the controller
        controller = ControllerProcess(init_controller(work / "controller"), policy=policy_path,
                                       extra_args=["--host-flow-rate", "0"])
        controller.start()
        stack.callback(controller.stop)
        ca = fingerprint(x509.load_pem_x509_certificate(controller.state.ca_pem))
        host = "testhost"
        enroll(controller.enroll_address, create_token(controller.state, host), ca, state,
               host=host)
        daemon = DaemonProcess(instance, None, None, state, controller=controller.address,
                               extra_args=metrics)
    stack.enter_context(daemon)
    daemon.wait_event(lambda e: e.get("event") == "bundle applied", timeout=120)
    if mode == "controller":
        daemon.wait_event(lambda e: e.get("event") == "flow upload connected", timeout=60)
    return daemon


# --- one rate ------------------------------------------------------------------------------


def busy_cpus() -> float:
    """CPU seconds the whole machine has been busy (all CPUs), for its share of a run."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def wait_records(log: FlowLog, baseline: int, expected: int,
                 stalled: float = 5.0) -> tuple[int, float | None]:
    """Wait until ``expected`` new lines are in the flow log, or it stops growing for
    ``stalled`` s; returns (the new lines, when they were complete or None)."""
    last, progress = -1, time.monotonic()
    while True:
        records = log.lines - baseline
        now = time.monotonic()
        if records >= expected:
            return records, now
        if records != last:
            last, progress = records, now
        elif now - progress > stalled:
            return records, None
        time.sleep(0.01)  # polling the follower's count


def generate(rate: int, seconds: int, *, instance: Instance, flowgen: Path, port: int,
             agents: list[str], per_agent: int, agent_nice: int = 0) -> dict[str, int]:
    """``rate`` connections a second, spread over ceil(rate / per_agent) agents, each its
    own flowgen; their counts summed (``behind_ns``: the latest of them)."""
    count = min(len(agents), -(-rate // per_agent))
    shares = [rate // count + (1 if i < rate % count else 0) for i in range(count)]
    nice = ["nice", "-n", str(agent_nice)] if agent_nice else []
    procs = [subprocess.Popen(nice + agent_argv(instance, agent, [
        str(flowgen), "rate", LOOPBACK, str(port), str(share), str(seconds)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for agent, share in zip(agents, shares, strict=False)]
    total = {"attempts": 0, "ok": 0, "failed": 0, "behind_ns": 0, "agents": count}
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"flowgen failed ({proc.returncode}): {err}")
        gen = json.loads(lines[-1])
        for key in ("attempts", "ok", "failed"):
            total[key] += int(gen[key])
        total["behind_ns"] = max(total["behind_ns"], int(gen["behind_ns"]))
    return total


def settled_spool(metrics_port: int, timeout: float = 120.0) -> int:
    """Records still in the daemon's spool once it emptied or ``timeout`` ran out."""
    deadline = time.monotonic() + timeout
    while (left := int(scrape(metrics_port).get("ztnet_flow_spool_records", 0))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def run_rate(rate: int, seconds: int, *, instance: Instance, flowgen: Path, port: int,
             daemon: DaemonProcess, log: FlowLog, metrics_port: int, mode: str,
             drain: float, agents: list[str], per_agent: int,
             agent_nice: int = 0) -> dict[str, Any]:
    assert daemon.proc is not None
    # one daemon and controller serve the whole ladder: a run starts once the spool
    # has uploaded what the run before it left, or its uploads would count those too
    backlog = settled_spool(metrics_port) if mode == "controller" else 0
    load = os.getloadavg()[0]
    before, lines_before = scrape(metrics_port), log.lines
    cpu_before, machine_before = cpu_seconds(daemon.proc.pid), busy_cpus()
    started = time.monotonic()
    gen = generate(rate, seconds, instance=instance, flowgen=flowgen, port=port,
                   agents=agents, per_agent=per_agent, agent_nice=agent_nice)
    generated = time.monotonic()
    expected = 2 * int(gen["ok"])
    records, complete = wait_records(log, lines_before, expected)
    ended = complete or time.monotonic()
    cpu = cpu_seconds(daemon.proc.pid) - cpu_before
    machine = busy_cpus() - machine_before
    # metrics: wait for a snapshot taken after the last connection (the kernel counters
    # are copied in about once a second)
    metrics_deadline = time.monotonic() + 10
    while (after := scrape(metrics_port)).get("connect_allow", 0) \
            - before.get("connect_allow", 0) < int(gen["ok"]) \
            and time.monotonic() < metrics_deadline:
        time.sleep(0.2)

    def grew(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    result: dict[str, Any] = {
        "rate": rate, "seconds": seconds, "loadavg_before": load, "agents": gen["agents"],
        "attempts": gen["attempts"], "ok": gen["ok"],
        "generator_behind_ms": round(gen["behind_ns"] / 1e6, 1),
        "records": records, "expected_records": expected,
        # from the generator's end until every record was in the flow log
        "drain_s": round(complete - generated, 3) if complete else None,
        "events_lost": grew("events_lost"), "flows_untracked": grew("flows_untracked"),
        "dispatcher_dropped": grew("ztnet_flow_records_dropped_total"),
        "budget_dropped": grew("events_dropped_budget"),
        "daemon_cpu_pct": round(100 * cpu / (ended - started), 1),
        "machine_cpu_pct": round(100 * machine / (ended - started) / (os.cpu_count() or 1), 1),
    }
    if mode == "controller":
        upload_deadline = time.monotonic() + 30
        while grew("ztnet_flow_upload_records_total") < records \
                and time.monotonic() < upload_deadline:
            time.sleep(0.1)
            after = scrape(metrics_port)
        result["uploaded"] = grew("ztnet_flow_upload_records_total")
        result["spool_dropped"] = grew("ztnet_flow_upload_dropped_total")
        result["spool_backlog_at_start"] = backlog
    result["kept_rate"] = gen["failed"] == 0 and gen["behind_ns"] < 50e6
    result["loss_free"] = (records == expected and result["events_lost"] == 0
                           and result["flows_untracked"] == 0
                           and result["dispatcher_dropped"] == 0
                           and result["budget_dropped"] == 0
                           and result.get("uploaded", records) == records
                           and result.get("spool_dropped", 0) == 0
                           and result.get("spool_backlog_at_start", 0) == 0)
    result["kept_up"] = complete is not None and complete - generated <= drain
    return result


# --- latency -------------------------------------------------------------------------------


def measure_latency(count: int, *, instance: Instance, flowgen: Path, port: int,
                    log: FlowLog) -> dict[str, Any]:
    log.stamping = True
    try:
        argv = agent_argv(instance, agent_names(1)[0], [
            str(flowgen), "latency", LOOPBACK, str(port), str(count), "20"])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=count + 60,
                              check=False)
        probes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if len(probes) != count or any(p["errno"] for p in probes):
            raise BenchError(f"latency probe failed ({proc.returncode}): {proc.stderr}")
        deadline = time.monotonic() + 10
        while not all(p["cookie"] in log.seen for p in probes) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        log.stamping = False
    missing = [p for p in probes if p["cookie"] not in log.seen]
    if missing:
        raise BenchError(f"{len(missing)} connect records never appeared in the flow log")
    latencies = [(log.seen[p["cookie"]] - p["t_ns"]) / 1e6 for p in probes]
    return {"connects": count, "ms": {k: round(v, 2) for k, v in spread(latencies).items()}}


# --- the run -------------------------------------------------------------------------------


@contextmanager
def instance_for(mode: str) -> Iterator[Instance]:
    instance = Instance.resolve(f"bench-{os.getpid()}-flows{mode[0]}")
    try:
        yield instance
    finally:
        teardown(instance)


def run_mode(mode: str, args: argparse.Namespace, work: Path, flowgen: Path,
             port: int) -> dict[str, Any]:
    metrics_port = free_port()
    with ExitStack() as stack:
        instance = stack.enter_context(instance_for(mode))
        highest = max(int(r) for r in args.rates.split(","))
        agents = agent_names(max(1, -(-highest // args.per_agent)))
        daemon = start_daemon(stack, mode, instance, work, port, metrics_port, agents)
        state = work / f"state-{mode}"
        log = FlowLog(state / FLOWS_FILE)
        stack.callback(log.close)

        def run(rate: int, seconds: int) -> dict[str, Any]:
            result = run_rate(rate, seconds, instance=instance, flowgen=flowgen, port=port,
                              daemon=daemon, log=log, metrics_port=metrics_port,
                              mode=mode, drain=args.drain, agents=agents,
                              per_agent=args.per_agent, agent_nice=args.agent_nice)
            print(json.dumps({"mode": mode, **result}), flush=True)
            return result

        ladder: list[dict[str, Any]] = []
        for rate in (int(r) for r in args.rates.split(",")):
            ladder.append(run(rate, args.seconds))
            if not passed(ladder[-1]):
                break
        # bisect between the last rate that passed and the first that did not
        for _ in range(args.refine):
            good = [r["rate"] for r in ladder if passed(r)]
            bad = [r["rate"] for r in ladder if not passed(r)]
            if not good or not bad:
                break
            middle = (max(good) + min(r for r in bad if r > max(good))) // 2 // 100 * 100
            if middle in good or middle in bad:
                break
            ladder.append(run(middle, args.seconds))
        good = sorted((r for r in ladder if passed(r)), key=lambda r: r["rate"])
        # the highest rate that also holds for --confirm seconds: a slowly growing backlog
        # passes a short run; step down through the rates that passed until one holds
        confirmed: list[dict[str, Any]] = []
        for candidate in reversed(good[-3:] if args.confirm else []):
            confirmed.append(run(candidate["rate"], args.confirm))
            if passed(confirmed[-1]):
                break
        latency = measure_latency(args.latency, instance=instance, flowgen=flowgen, port=port,
                                  log=log) if args.latency else None
        if latency:
            print(json.dumps({"mode": mode, "latency": latency}), flush=True)
        assert daemon.proc is not None
        rss = psutil.Process(daemon.proc.pid).memory_info().rss
        held = [r for r in confirmed if passed(r)]
        return {"ladder": ladder, "best_short": good[-1] if good else None,
                "confirmed": confirmed, "sustained": held[0] if held else None,
                "latency": latency, "daemon_rss_mib": round(rss / 2**20, 1)}


def passed(result: dict[str, Any]) -> bool:
    return bool(result["loss_free"] and result["kept_up"] and result["kept_rate"])


def print_report(results: dict[str, Any]) -> None:
    for mode, result in results["modes"].items():
        print(f"\n{mode}: connections/s  records/s  seconds  missing  ring lost  "
              "queue dropped  drain s  daemon CPU  machine CPU  ok")
        for r in sorted(result["ladder"], key=lambda r: r["rate"]) + result["confirmed"]:
            drained = "-" if r["drain_s"] is None else f"{r['drain_s']:.2f}"
            print(f"  {r['rate']:>12,} {2 * r['rate']:>10,} {r['seconds']:>8} "
                  f"{r['expected_records'] - r['records']:>8} {r['events_lost']:>10} "
                  f"{r['dispatcher_dropped']:>14} {drained:>8} {r['daemon_cpu_pct']:>10.1f}% "
                  f"{r['machine_cpu_pct']:>11.1f}%  {'yes' if passed(r) else 'NO'}")
        for label, key in (("in a short run", "best_short"), ("sustained", "sustained")):
            best = result[key]
            print(f"  highest loss-free rate {label}: " + (
                "none" if best is None else
                f"{best['rate']:,} connections/s ({2 * best['rate']:,} records/s) for "
                f"{best['seconds']} s, daemon CPU {best['daemon_cpu_pct']}% of one CPU"))
        if result["latency"]:
            ms = result["latency"]["ms"]
            print(f"  connect() -> record in flows.jsonl: p50 {ms['p50']} ms, p99 {ms['p99']} "
                  f"ms, max {ms['max']} ms ({result['latency']['connects']} connects)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The settings (benchmarks/headtohead.py runs :func:`run_mode` with its own)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flows")
    parser.add_argument("--mode", choices=("standalone", "controller", "both"),
                        default="both")
    parser.add_argument("--rates", default=DEFAULT_RATES,
                        help=f"connections per second, in order (default {DEFAULT_RATES})")
    parser.add_argument("--seconds", type=int, default=10, help="length of each rate's run")
    parser.add_argument("--agent-nice", type=int, default=0,
                        help="run the load generators this much nicer than the daemon (0: "
                        "the same priority; see docs/performance.md)")
    parser.add_argument("--per-agent", type=int, default=800,
                        help="connections a second per agent (each agent's allowed-side "
                        "events are budgeted at 2,000 a second by the kernel)")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="the pipeline must catch up within this after a run (s)")
    parser.add_argument("--refine", type=int, default=2,
                        help="bisection steps between the last rate that passed and the next")
    parser.add_argument("--confirm", type=int, default=60,
                        help="then hold the best rate this long (s; 0: skip)")
    parser.add_argument("--latency", type=int, default=200,
                        help="connects for the latency figure (0: skip)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.flows: needs root (BPF, cgroups)")
    remove_stale_instances()
    modes = ["standalone", "controller"] if args.mode == "both" else [args.mode]
    results: dict[str, Any] = {
        "machine": machine_facts() | {"loadavg_at_start": os.getloadavg()},
        "settings": vars(args) | {"out": str(args.out) if args.out else None}, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ztnet-bench-flows-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        flowgen = compile_flowgen(work)
        port = start_listener(stack, work)
        for mode in modes:
            results["modes"][mode] = run_mode(mode, args, work, flowgen, port)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    print_report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
