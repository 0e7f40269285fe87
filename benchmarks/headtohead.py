"""Head-to-head benchmark: what ztnet costs an agent next to the firewalls users already run.

    sudo .venv/bin/python -m benchmarks.headtohead [--smoke] [--pairs 7] [--out FILE.json]
        [--plot FILE.png] [--doc docs/performance.md]
    sudo .venv/bin/python -m benchmarks.headtohead --render FILE.json --plot ... --doc ...

Scenarios (benchmarks/h2h_scenarios.py), each in network namespaces of its own joined by a
veth: no filter; ztnet with 1, 1,000 and 100,000 grants, each a real `ztnet daemon` recording
flows; nftables with a ``socket cgroupv2`` match and a set of 1, 1,000 and 100,000 elements;
iptables with a cgroup match and 1 and 1,000 linear rules; OpenSnitch (Debian's opensnitchd,
unpacked by scripts/setup.sh, run in the client namespace and a private mount namespace) with
one rule. Nothing is loaded into the host's network namespace.

Workloads, run by ``benchmarks/loadgen.c`` (compiled here with the system compiler) and
iperf3, as the client of each scenario pinned to one CPU: TCP connect+close rate with p50/p99
connect latency; 64-byte UDP ``sendto`` rate on an unconnected socket; bulk TCP (iperf3)
over the veth; denied connect latency; the daemons' CPU while each ran and their RSS. They
run in interleaved pairs, A B A B …: in each round every filtered scenario runs next to a
fresh no-filter sample (the order within a pair alternates), so each ratio compares two
samples taken seconds apart. Then, with
``kernel.bpf_stats_enabled=1`` (restored afterwards), each workload runs again per ztnet
scenario and the kernel's run time per program is read from the programs attached to the
instance's cgroup.

With every scenario gone, two measurements of ztnet's own, reusing their benchmarks'
functions: the control plane (benchmarks/bundle.py: verify and apply of 1, 1,000 and
100,000 grants, RSS, one grant revoked and added, resync with nothing changed, restart
with the programs pinned) and the flow pipeline (benchmarks/flows.py: the highest loss-free
record rate, held for 60 s, standalone and in controller mode; daemon CPU; connect() to
record latency).

The JSON holds every sample; the PNG and the section of docs/performance.md between the
``headtohead`` markers are generated from it (benchmarks/h2h_report.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import bundle, flows, h2h_report
from benchmarks.controller import cpu_seconds
from benchmarks.datapath import bpf_stats_enabled, cpu_plan, machine_facts, remove_stale_instances
from benchmarks.h2h_scenarios import (
    DENIED_PORT,
    IPERF_PORT,
    TCP_PORT,
    UDP_PORT,
    OpenSnitch,
    Scenario,
    Ztnet,
    child_setup,
    make_scenarios,
    tool_versions,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUN_TIMEOUT = 300.0
WORKLOADS = ("tcp", "udp", "deny", "bulk")
# A daemon is settled when it used less than this share of one CPU over SETTLE_WINDOW, twice
# in a row; it gets at most SETTLE_TIMEOUT to get there.
SETTLE_SHARE, SETTLE_WINDOW, SETTLE_TIMEOUT = 0.10, 0.25, 60.0


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    pairs: int
    tcp_connects: int
    udp_sends: int
    denials: int
    bulk: tuple[str, str]  # iperf3's length option: ("-t", seconds) or ("-n", bytes)
    stats_repeats: int
    ztnet_sizes: tuple[int, ...]
    nft_sizes: tuple[int, ...]
    iptables_sizes: tuple[int, ...]
    opensnitch_sizes: tuple[int, ...]
    smoke: bool
    # the control plane (benchmarks/bundle.py): grant counts, each on a daemon of its own;
    # the largest also with one-grant changes, resync and restart
    control_sizes: tuple[int, ...] = (1, 1_000, 100_000)
    resync_window: float = 10.0
    # the flow pipeline (benchmarks/flows.py's ladder): connections/s (2 records each)
    flow_modes: tuple[str, ...] = ("standalone", "controller")
    flow_rates: str = "5000,12500,25000"
    flow_seconds: int = 10
    flow_refine: int = 1
    flow_confirm: int = 60
    flow_latency: int = 200


FULL = Settings(7, 20_000, 200_000, 5_000, ("-t", "3"), 3, (1, 1_000, 100_000),
                (1, 1_000, 100_000), (1, 1_000), (1,), False)
SMOKE = Settings(1, 300, 3_000, 100, ("-n", "4M"), 1, (1, 10, 100), (1, 100), (1, 100), (1,),
                 True, control_sizes=(100,), resync_window=2.0, flow_rates="200",
                 flow_seconds=2, flow_refine=0, flow_confirm=0, flow_latency=10)


def build_loadgen(work: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BenchError("no C compiler (cc): the load generator is C")
    binary = work / "loadgen"
    proc = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / "loadgen.c")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"compiling loadgen.c failed:\n{proc.stderr}")
    return binary


def run_client(scenario: Scenario, argv: Sequence[str], cpu: int | None) -> str:
    full, cgroup = scenario.client(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
                          cwd=REPO, preexec_fn=child_setup(cgroup, cpu))
    if proc.returncode != 0:
        raise BenchError(f"{scenario.name}: {' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def _last_json(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON result in {text[-500:]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def expected_denial(scenario: Scenario) -> int:
    """ztnet refuses in the connect hook; nftables and iptables reject the SYN with a reset,
    and without a filter the server's kernel does (nothing listens there); OpenSnitch's
    reject rule aborts the socket while its SYN waits in the queue."""
    if scenario.kind == "ztnet":
        return errno.EPERM
    return errno.ECONNABORTED if scenario.kind == "opensnitch" else errno.ECONNREFUSED


def run_workload(scenario: Scenario, workload: str, settings: Settings, loadgen: Path,
                 cpu: int | None) -> dict[str, Any]:
    server = scenario.server
    if workload == "bulk":
        text = run_client(scenario, ["iperf3", "-c", server, "-p", str(IPERF_PORT), "-J",
                                     *settings.bulk], cpu)
        report = json.loads(text)
        end = report["end"]
        return {"bits_per_s": float(end["sum_received"]["bits_per_second"]),
                "retransmits": end["sum_sent"].get("retransmits"),
                "seconds": float(end["sum_received"]["seconds"])}
    port, calls = {"tcp": (TCP_PORT, settings.tcp_connects), "udp": (UDP_PORT, settings.udp_sends),
                   "deny": (DENIED_PORT, settings.denials)}[workload]
    calls = max(1, round(calls * scenario.calls_scale))
    result = _last_json(run_client(scenario, [str(loadgen), workload, server, str(port),
                                              str(calls)], cpu))
    if workload == "deny" and result["first_errno"] != expected_denial(scenario):
        raise BenchError(f"{scenario.name}: a denied connect gave errno "
                         f"{errno.errorcode.get(result['first_errno'], result['first_errno'])}, "
                         f"expected {errno.errorcode[expected_denial(scenario)]}")
    result["per_s"] = result["calls"] / result["ns"] * 1e9
    return result


def settle(daemon: int) -> float:
    """Wait until the daemon has worked off what the last workload left it (records queued in
    the ring buffer and the dispatcher); the seconds it took. Without this its backlog would
    run during the next workload, or during the next no-filter sample."""
    started = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - started < SETTLE_TIMEOUT:
        before = cpu_seconds(daemon)
        time.sleep(SETTLE_WINDOW)
        quiet = quiet + 1 if cpu_seconds(daemon) - before < SETTLE_SHARE * SETTLE_WINDOW else 0
    return time.monotonic() - started


def sample(scenario: Scenario, settings: Settings, loadgen: Path,
           cpu: int | None) -> dict[str, Any]:
    """Every workload once. For ztnet also the daemon's CPU while each ran (launch to exit),
    as a share of one CPU, and how long it then took to settle."""
    out: dict[str, Any] = {}
    daemon = scenario.daemon_pid()
    for workload in WORKLOADS:
        before = cpu_seconds(daemon) if daemon else 0.0
        started = time.monotonic()
        result = run_workload(scenario, workload, settings, loadgen, cpu)
        if daemon:
            result["daemon_cpu_share"] = (cpu_seconds(daemon) - before) / (time.monotonic()
                                                                          - started)
            result["daemon_settle_s"] = settle(daemon)
        out[workload] = result
    return out


def measure_pairs(scenarios: Sequence[Scenario], settings: Settings, loadgen: Path,
                  cpu: int | None) -> list[dict[str, Any]]:
    base, filtered = scenarios[0], list(scenarios[1:])
    pairs = []
    for round_number in range(settings.pairs):
        shift = round_number % len(filtered)
        for scenario in filtered[shift:] + filtered[:shift]:
            # each scenario alternates between going first and second from round to round
            baseline_first = (round_number + scenario.index) % 2 == 0
            order = (base, scenario) if baseline_first else (scenario, base)
            got = {s.name: sample(s, settings, loadgen, cpu) for s in order}
            pairs.append({"round": round_number, "scenario": scenario.name,
                          "baseline_first": baseline_first, "baseline": got[base.name],
                          "filtered": got[scenario.name]})
        print(f"  round {round_number + 1}/{settings.pairs} done", file=sys.stderr)
    return pairs


def measure_program_cost(scenarios: Sequence[Scenario], settings: Settings, loadgen: Path,
                         cpu: int | None) -> dict[str, list[dict[str, Any]]]:
    """Per ztnet scenario and repeat: per workload, each program's (run time, runs) delta."""
    out: dict[str, list[dict[str, Any]]] = {}
    ztnets = [s for s in scenarios if isinstance(s, Ztnet)]
    for repeat in range(settings.stats_repeats):
        for scenario in ztnets if repeat % 2 == 0 else ztnets[::-1]:
            entry: dict[str, Any] = {}
            for workload in WORKLOADS:
                before = scenario.program_stats()
                result = run_workload(scenario, workload, settings, loadgen, cpu)
                after = scenario.program_stats()
                entry[workload] = {
                    "calls": result.get("calls"),
                    "programs": {name: {"run_time_ns": after[name][0] - before.get(name, (0, 0))[0],
                                        "run_cnt": after[name][1] - before.get(name, (0, 0))[1]}
                                 for name in after},
                }
            out.setdefault(scenario.name, []).append(entry)
    return out


def daemon_facts(scenario: Ztnet | OpenSnitch, state: Path) -> dict[str, Any]:
    if isinstance(scenario, OpenSnitch):
        return {"rss_bytes": scenario.rss_bytes()}
    records = 0
    for path in state.glob("flows.jsonl*"):
        with path.open("rb") as handle:
            records += sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    counters = scenario.counters()
    return {"rss_bytes": scenario.rss_bytes(), "flow_records_written": records,
            "bundle_seconds": scenario.bundle_seconds,
            "counters": {k: v for k, v in counters.items()
                         if k in ("events_lost", "flows_untracked", "events_read")
                         or k.startswith("ztnet_flow_records")}}


def measure_control_plane(settings: Settings, work: Path) -> list[dict[str, Any]]:
    """benchmarks/bundle.py's measurements, each size on a daemon of its own (no agents):
    verify, apply, RSS, start; for the largest also one grant revoked and added, resync
    with nothing changed and a restart with the programs pinned."""
    out = []
    (work / "control").mkdir()
    for size in settings.control_sizes:
        print(f"  control plane, {size:,} grants …", file=sys.stderr)
        out.append(bundle.run_size(size, work / "control", full=size == max(
            settings.control_sizes), resync_window=settings.resync_window))
    return out


def measure_flow_pipeline(settings: Settings, work: Path) -> dict[str, Any]:
    """benchmarks/flows.py's ladder per mode: the highest connection rate (two records each)
    a daemon traces with nothing lost, held for ``flow_confirm`` s; its CPU; connect() to
    record latency."""
    args = flows.parse_args(["--rates", settings.flow_rates, "--seconds",
                             str(settings.flow_seconds), "--refine", str(settings.flow_refine),
                             "--confirm", str(settings.flow_confirm), "--latency",
                             str(settings.flow_latency)])
    out: dict[str, Any] = {}
    work = work / "flows"
    work.mkdir()
    with ExitStack() as stack:
        flowgen = flows.compile_flowgen(work)
        port = flows.start_listener(stack, work)
        for mode in settings.flow_modes:
            print(f"  flow pipeline, {mode} …", file=sys.stderr)
            out[mode] = flows.run_mode(mode, args, work, flowgen, port)
    return out


def run(settings: Settings, work: Path) -> dict[str, Any]:
    loadgen = build_loadgen(work)
    client_cpu, server_cpu = cpu_plan()
    scenarios = make_scenarios(settings.ztnet_sizes, settings.nft_sizes, settings.iptables_sizes,
                               settings.opensnitch_sizes)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        print(f"setting up {len(scenarios)} scenarios …", file=sys.stderr)
        for scenario in scenarios:
            scenario.start(stack, work, loadgen, server_cpu)
            print(f"  {scenario.label}: {scenario.entries:,} entries, "
                  f"{scenario.load_seconds:.1f} s", file=sys.stderr)
        print(f"measuring {settings.pairs} interleaved rounds …", file=sys.stderr)
        pairs = measure_pairs(scenarios, settings, loadgen, client_cpu)
        print("measuring kernel program cost (bpf_stats_enabled=1) …", file=sys.stderr)
        with bpf_stats_enabled() as previous:
            cost = measure_program_cost(scenarios, settings, loadgen, client_cpu)
        daemons = {s.name: daemon_facts(s, work / f"state-{s.name}")
                   for s in scenarios if isinstance(s, Ztnet | OpenSnitch)}
    # with every scenario gone: nothing else of the benchmark's runs beside these
    print("measuring the control plane …", file=sys.stderr)
    control = measure_control_plane(settings, work)
    print("measuring the flow pipeline …", file=sys.stderr)
    pipeline = measure_flow_pipeline(settings, work)
    return {
        "benchmark": "headtohead",
        "machine": machine_facts() | {"loadavg_before": load_before,
                                      "loadavg_after": os.getloadavg(),
                                      "tools": tool_versions()},
        "settings": asdict(settings),
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "bpf_stats_enabled_before": previous,
        "scenarios": [{"name": s.name, "kind": s.kind, "size": s.size, "label": s.label,
                       "entries": s.entries, "load_seconds": s.load_seconds} for s in scenarios],
        "pairs": pairs,
        "program_cost": cost,
        "daemons": daemons,
        "control_plane": control,
        "flow_pipeline": pipeline,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.headtohead",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny counts and sizes, one round: proves every scenario runs")
    parser.add_argument("--pairs", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--out", type=Path, help="write every sample as JSON here")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here")
    parser.add_argument("--doc", type=Path,
                        help="regenerate the head-to-head section of this Markdown file")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: render --plot/--doc from this JSON")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        if os.geteuid() != 0:
            print("benchmarks.headtohead: needs root (namespaces, cgroups, BPF)", file=sys.stderr)
            return 2
        settings = SMOKE if args.smoke else FULL
        if args.pairs:
            settings = Settings(**(asdict(settings) | {"pairs": args.pairs}))
        remove_stale_instances()
        with tempfile.TemporaryDirectory(prefix="ztnet-h2h-") as tmp:
            results = run(settings, Path(tmp))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(f"samples written to {args.out}", file=sys.stderr)
    summary = h2h_report.summarise(results)
    print(h2h_report.text_table(summary))
    if args.plot:
        h2h_report.plot(summary, results, args.plot)
    if args.doc:
        h2h_report.update_doc(args.doc, summary, results, args.plot, args.out or args.render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
