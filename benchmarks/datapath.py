"""Datapath benchmark: what ztnet's BPF programs cost an agent.

    sudo .venv/bin/python -m benchmarks.datapath [--quick] [--out FILE] [--json]

Measures, in one run and against a no-ztnet baseline measured in the same run:

1. connect() rate of a worker process: TCP connect+close to a local listener,
   and connect() of a UDP socket (the hook alone, no packet), as a plain
   process (baseline), as an agent with 2 grants, and as an agent whose
   instance holds 100,001 grants;
2. the latency of a connect() ztnet denies (EPERM) next to a connect() the
   kernel refuses without ztnet (ECONNREFUSED from a closed local port);
3. the kernel-side cost per run of zt_connect4 and zt_egress (BPF run-time
   statistics, kernel.bpf_stats_enabled);
4. the wall time of installing 100,000 grants: from empty, then twice with
   1% changed, and of compiling them alone; the process RSS afterwards.

Every condition gets its own throwaway instance (programs, maps, cgroups):
``bench-<pid>-none`` (a cgroup only, nothing attached), ``bench-<pid>-small``
and ``bench-<pid>-large``. So the rounds can be interleaved without
reloading grants between them, and each instance's program statistics count
only its own workload. Everything is torn down at the end, also on errors.

See docs/performance.md for the method and the figures of a reference run.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from ztnet.datapath import abi
from ztnet.datapath.bpfsys import prog_info
from ztnet.datapath.compile import BootClock, compile_desired_state
from ztnet.datapath.datapath import ApplyResult, Datapath, teardown
from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.identity import cgroups
from ztnet.instance import BPFFS, Instance, find_cgroup2_mount
from ztnet.testing.agents import agent_argv

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
AGENT = "bench"
HOST = "127.0.0.1"
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
PROGRAMS = ("zt_connect4", "zt_egress")
GRANT_TTL = 3600.0  # realistic grants expire; the kernel compares every window
CHANGED_EVERY = 100  # 1% of the large grant set changes between loads
WORKER_TIMEOUT = 300.0
STATS_REPEATS = 3
# Rates per wall-clock second and per CPU second of the worker: the second
# leaves out time other processes took on a shared machine.
RATE_METRICS = ("tcp_per_s", "tcp_per_cpu_s", "udp_per_s", "udp_per_cpu_s")
DENY_KEYS = ("mean_ns", "p50_ns", "p99_ns", "min_ns")
# Condition names, in the order the tables show them.
NONE, SMALL, LARGE = "none", "small", "large"
CONDITIONS = (NONE, SMALL, LARGE)


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    connects: int
    udp_connects: int
    denials: int
    grants: int
    rounds: int
    worker: str  # auto | c | python


# --- machine and worker ----------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    model = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "ztnet_commit": commit,
    }


@dataclass(frozen=True)
class Worker:
    """How to start the load generator (worker.c compiled, or worker.py)."""

    kind: str  # "c" or "python"
    argv: tuple[str, ...]

    def command(self, *args: object) -> list[str]:
        return [*self.argv, *(str(arg) for arg in args)]


def build_worker(choice: str, directory: Path) -> Worker:
    """Compile worker.c with the system compiler; fall back to Python when
    there is none (or when asked to), and say so in the results."""
    python = Worker("python", (sys.executable, str(HERE / "worker.py")))
    if choice == "python":
        return python
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        if choice == "c":
            raise BenchError("no C compiler (cc) found and --worker c was given")
        print("note: no C compiler found; using the Python worker, whose own overhead "
              "hides most of the BPF cost", file=sys.stderr)
        return python
    binary = directory / "worker"
    result = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(HERE / "worker.c")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        if choice == "c":
            raise BenchError(f"compiling worker.c failed:\n{result.stderr}")
        print(f"note: compiling worker.c failed, using the Python worker:\n{result.stderr}",
              file=sys.stderr)
        return python
    return Worker("c", (str(binary),))


def cpu_plan() -> tuple[int | None, int | None]:
    """(worker CPU, listener CPU). On two or more CPUs the worker and the
    listener each get their own, so neither waits for the other's time slice;
    on one CPU nothing is pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[-1]


def _child_setup(cgroup: Path | None, cpu: int | None) -> Callable[[], None]:
    def setup() -> None:
        # runs in the child before exec: the worker is confined (or not) and
        # pinned before its first instruction
        if cgroup is not None:
            cgroups.join(cgroup)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return setup


def run_worker(argv: Sequence[str], *, cgroup: Path | None, cpu: int | None) -> dict[str, Any]:
    """Run one measurement to completion and return its JSON result."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                          check=False, cwd=REPO, preexec_fn=_child_setup(cgroup, cpu))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"worker {' '.join(argv)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- grants ----------------------------------------------------------------------------


def _grant(grant_id: int, proto: Proto, to: str, port: int, now: float) -> Grant:
    return Grant(grant_id, AGENT, proto, ipaddress.ip_network(to), PortRange(port, port),
                 now - 60.0, now + GRANT_TTL)


def small_grants(port: int, now: float) -> list[Grant]:
    """What the workload needs: TCP and UDP to the listener's port."""
    return [_grant(1, Proto.TCP, f"{HOST}/32", port, now),
            _grant(2, Proto.UDP, f"{HOST}/32", port, now)]


def large_grants(port: int, count: int, now: float, version: int = 0) -> list[Grant]:
    """``count`` TCP grants to /32s spread evenly over 127.0.0.0/8, all on the
    listener's port, 127.0.0.1 being one of them; plus the UDP grant.

    Why there and not in 10.0.0.0/8: the LPM key holds the port before the
    address, so the walk for 127.0.0.1:port is as deep as the trie gets only
    when the other entries share that port and surround that address. Grants
    elsewhere would be branched off near the root and cost the lookup nothing.

    ``version`` > 0 moves every 100th grant (never the one the worker uses)
    to a new address with a new id: a 1% change.
    """
    step = (2**24 - 2) // count
    assert step > version + 1, "too many grants to spread over 127.0.0.0/8"
    base = int(ipaddress.IPv4Address(HOST))
    grants = []
    for i in range(count):
        moved = version and i and i % CHANGED_EVERY == version % CHANGED_EVERY
        offset = i * step + (version if moved else 0)
        grant_id = 1000 + i + (version * 10_000_000 if moved else 0)
        grants.append(_grant(grant_id, Proto.TCP, f"{ipaddress.IPv4Address(base + offset)}/32",
                             port, now))
    grants.append(_grant(2, Proto.UDP, f"{HOST}/32", port, now))
    return grants


# --- instances -------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the run created, so that ``cleanup`` can remove it."""

    pid: int = field(default_factory=os.getpid)
    instances: dict[str, Instance] = field(default_factory=dict)
    datapaths: dict[str, Datapath] = field(default_factory=dict)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)

    def instance(self, condition: str) -> Instance:
        if condition not in self.instances:
            self.instances[condition] = Instance.resolve(f"bench-{self.pid}-{condition}")
        return self.instances[condition]

    def agent_cgroup(self, condition: str) -> Path:
        return self.instance(condition).agent_cgroup(AGENT)

    def cleanup(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for sock in self.sockets:
            sock.close()
        for datapath in self.datapaths.values():
            datapath.close()
        failures = []
        for instance in self.instances.values():
            try:
                teardown(instance)
            except Exception as exc:  # tear down the others regardless
                failures.append(f"{instance.name}: {exc}")
        if failures:
            raise BenchError("teardown failed: " + "; ".join(failures))


def remove_stale_instances() -> None:
    """Instances a crashed earlier run left behind; names carry its pid."""
    names = {p.name for p in find_cgroup2_mount().glob("ztnet-bench-*")}
    names |= {p.name for p in BPFFS.glob("ztnet-bench-*")}
    for name in sorted(names):
        owner = name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            teardown(Instance.resolve(name.removeprefix("ztnet-")))


def start_listener(setup: Setup, worker: Worker, cpu: int | None) -> int:
    """The accept()-and-close loop, outside every agent cgroup (its SYN-ACKs
    must not meet an agent's egress filter). Returns its port."""
    proc = subprocess.Popen(worker.command("listen"), stdout=subprocess.PIPE, text=True,
                            preexec_fn=_child_setup(None, cpu))
    setup.processes.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise BenchError("the listener exited before reporting its port")
    return int(json.loads(line)["port"])


def closed_port(setup: Setup) -> int:
    """A local port that is bound but never listens, held for the whole run:
    a connect() there is refused (ECONNREFUSED) by the kernel itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    setup.sockets.append(sock)
    return int(sock.getsockname()[1])


def open_datapath(setup: Setup, condition: str) -> Datapath:
    datapath = Datapath.open(setup.instance(condition))
    setup.datapaths[condition] = datapath
    return datapath


def check_installed(result: ApplyResult, grants: int) -> None:
    """Each benchmark grant compiles to exactly one trie entry."""
    if result.entries != grants:
        raise BenchError(f"expected {grants} trie entries, the grant set has {result.entries}")


def live_entries_in_kernel(datapath: Datapath) -> int:
    """Entries of the live generation, counted by walking the kernel's trie
    (not what the loader believes it wrote)."""
    live = datapath.generation
    keys = datapath.maps["zt_grants_v1"].keys(abi.ZtGrantKey)
    return sum(1 for key in keys if abi.EntryKey.from_c(key)[0] == live)


# --- 4. loading ------------------------------------------------------------------------


def _apply_record(result: ApplyResult) -> dict[str, Any]:
    return {"seconds": result.seconds, "entries": result.entries, "written": result.written,
            "deleted": result.deleted, "generation": result.generation}


def measure_loading(datapath: Datapath, port: int, count: int) -> dict[str, Any]:
    """Install the large set three times. Two generations take turns, so the
    first and second loads each fill an empty generation; the third is the
    steady state: a diff against the set of two loads ago. Each version is
    built just before its load, so the RSS afterwards is what a daemon
    holding one such set keeps, not the benchmark's spare copies."""
    rss_before = psutil.Process().memory_info().rss
    now = time.time()
    indices = datapath.ensure_agents([AGENT])
    grants = large_grants(port, count, now)
    started = time.perf_counter()
    compile_desired_state(grants, indices, now=now, clock=BootClock.now(), bundle_expires=math.inf)
    compile_seconds = time.perf_counter() - started
    loads = []
    for version in (0, 1, 2):
        grants = large_grants(port, count, now, version)
        result = datapath.install_unverified(grants)
        check_installed(result, count + 1)
        loads.append(_apply_record(result))
    del grants
    rss_after = psutil.Process().memory_info().rss
    in_kernel = live_entries_in_kernel(datapath)
    if in_kernel != count + 1:
        raise BenchError(f"the live generation holds {in_kernel} entries, not {count + 1}")
    return {
        "grants": count + 1,
        "entries_in_kernel": in_kernel,
        "compile_seconds": compile_seconds,
        "from_empty": loads[0],
        "second_generation_1pct_changed": loads[1],
        "diff_1pct_changed": loads[2],
        "rss_bytes_before": rss_before,
        "rss_bytes_after": rss_after,
    }


# --- 1 and 2. rates and denied latency ---------------------------------------------------


@dataclass(frozen=True)
class Target:
    listen_port: int
    closed_port: int


def launch(setup: Setup, worker: Worker, condition: str, *args: object) -> tuple[list[str],
                                                                                  Path | None]:
    """(argv, cgroup to join before exec). The baseline runs the worker
    directly in a cgroup at the agents' depth with nothing attached; the
    agents go through `ztnet run` exactly as users start them."""
    argv = worker.command(*args)
    if condition == NONE:
        return argv, setup.agent_cgroup(NONE)
    instance = setup.instance(condition)
    return agent_argv(instance, AGENT, argv), None


def measure_once(setup: Setup, worker: Worker, settings: Settings, target: Target,
                 condition: str, cpu: int | None) -> dict[str, Any]:
    def run(*args: object) -> dict[str, Any]:
        argv, cgroup = launch(setup, worker, condition, *args)
        return run_worker(argv, cgroup=cgroup, cpu=cpu)

    tcp = run("tcp", HOST, target.listen_port, settings.connects)
    udp = run("udp", HOST, target.listen_port, settings.udp_connects)
    deny = run("deny", HOST, target.closed_port, settings.denials)
    # ztnet refuses before any packet exists; without it the kernel answers
    # the SYN to a closed port with an RST
    expected = errno.ECONNREFUSED if condition == NONE else errno.EPERM
    if deny["errno"] != expected:
        raise BenchError(f"{condition}: denied connect gave errno "
                         f"{errno.errorcode.get(deny['errno'], deny['errno'])}, "
                         f"expected {errno.errorcode[expected]}")
    return {
        "tcp_per_s": tcp["calls"] / tcp["ns"] * 1e9,
        "tcp_per_cpu_s": tcp["calls"] / tcp["cpu_ns"] * 1e9,
        "udp_per_s": udp["calls"] / udp["ns"] * 1e9,
        "udp_per_cpu_s": udp["calls"] / udp["cpu_ns"] * 1e9,
        "deny": {key: deny[key] for key in DENY_KEYS},
    }


def measure_rounds(setup: Setup, worker: Worker, settings: Settings, target: Target,
                   cpu: int | None) -> dict[str, list[dict[str, Any]]]:
    """Each round runs every condition once; the order rotates between rounds
    so that no condition always runs right after the same other one."""
    samples: dict[str, list[dict[str, Any]]] = {condition: [] for condition in CONDITIONS}
    for round_number in range(settings.rounds):
        shift = round_number % len(CONDITIONS)
        for condition in CONDITIONS[shift:] + CONDITIONS[:shift]:
            samples[condition].append(measure_once(setup, worker, settings, target, condition,
                                                   cpu))
        print(f"  round {round_number + 1}/{settings.rounds} done", file=sys.stderr)
    return samples


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarise_rounds(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per condition; for the agents also the ratio to the baseline,
    the range of the per-round ratios (each against the baseline of the same
    round: how noisy the figure is), and the added time per call (difference
    of 1/rate), which compares directly with the kernel's per-program figures."""
    summary: dict[str, Any] = {}
    for condition, rounds in samples.items():
        entry: dict[str, Any] = {metric: _median([r[metric] for r in rounds])
                                 for metric in RATE_METRICS}
        entry["deny"] = {key: _median([r["deny"][key] for r in rounds]) for key in DENY_KEYS}
        summary[condition] = entry
    base = summary[NONE]
    for condition in (SMALL, LARGE):
        entry = summary[condition]
        for metric in RATE_METRICS:
            rate, base_rate = entry[metric], base[metric]
            paired = [r[metric] / b[metric] for r, b in zip(samples[condition], samples[NONE],
                                                             strict=True)]
            entry[f"{metric}_ratio"] = rate / base_rate
            entry[f"{metric}_round_ratios"] = [min(paired), max(paired)]
            entry[f"{metric}_added_ns"] = 1e9 / rate - 1e9 / base_rate
        for key in DENY_KEYS:
            entry["deny"][f"{key}_ratio"] = entry["deny"][key] / base["deny"][key]
    return summary


# --- 3. kernel-side program cost --------------------------------------------------------


@contextmanager
def bpf_stats_enabled() -> Iterator[str]:
    """kernel.bpf_stats_enabled=1 while measuring, then the previous value.
    Only for this phase: the statistics add two clock reads to every program
    run, which the rate rounds must not pay."""
    previous = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1\n")
    try:
        yield previous
    finally:
        STATS_SYSCTL.write_text(f"{previous}\n")


def _snapshot(datapath: Datapath) -> dict[str, tuple[int, int]]:
    assert datapath.programs is not None
    stats = {name: prog_info(datapath.programs.prog_fds[name]) for name in PROGRAMS}
    return {name: (s.run_time_ns, s.run_cnt) for name, s in stats.items()}


def _per_run(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
             name: str) -> tuple[float | None, int]:
    runs = after[name][1] - before[name][1]
    elapsed = after[name][0] - before[name][0]
    return (elapsed / runs if runs else None), runs


def program_cost_once(setup: Setup, worker: Worker, settings: Settings, target: Target,
                      condition: str, cpu: int | None) -> dict[str, Any]:
    """ns per program run, per workload: allowed TCP connects (connect4 and
    the egress packets they make), allowed UDP connects, denied connects."""
    datapath = setup.datapaths[condition]
    workloads = {"tcp": (target.listen_port, settings.connects),
                 "udp": (target.listen_port, settings.udp_connects),
                 "deny": (target.closed_port, settings.denials)}
    result: dict[str, Any] = {}
    for mode, (port, calls) in workloads.items():
        before = _snapshot(datapath)
        argv, cgroup = launch(setup, worker, condition, mode, HOST, port, calls)
        run_worker(argv, cgroup=cgroup, cpu=cpu)
        after = _snapshot(datapath)
        connect_ns, connect_runs = _per_run(before, after, "zt_connect4")
        egress_ns, egress_runs = _per_run(before, after, "zt_egress")
        result[mode] = {"calls": calls, "connect4_ns": connect_ns, "connect4_runs": connect_runs,
                        "egress_ns": egress_ns, "egress_runs": egress_runs,
                        "egress_packets_per_call": egress_runs / calls}
    return result


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    if not present:
        return None
    median = _median(present)
    # counts stay counts in the JSON
    return int(median) if all(isinstance(v, int) for v in present) and median.is_integer() \
        else median


def measure_program_cost(setup: Setup, worker: Worker, settings: Settings, target: Target,
                         cpu: int | None) -> dict[str, Any]:
    """A few repeats, alternating which instance goes first; the median of
    each figure (one run of a few seconds varies by tens of percent here)."""
    samples: dict[str, list[dict[str, Any]]] = {SMALL: [], LARGE: []}
    for repeat in range(min(settings.rounds, STATS_REPEATS)):
        for condition in (SMALL, LARGE) if repeat % 2 == 0 else (LARGE, SMALL):
            samples[condition].append(program_cost_once(setup, worker, settings, target,
                                                        condition, cpu))
    medians: dict[str, Any] = {}
    for condition, repeats in samples.items():
        medians[condition] = {
            mode: {key: _median_or_none([r[mode][key] for r in repeats])
                   for key in repeats[0][mode]}
            for mode in repeats[0]
        }
        medians[condition]["repeats"] = repeats
    return medians


# --- report ---------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _print_rates(s: dict[str, Any]) -> None:
    for kind, title in (("tcp", "TCP connect+close, per second"),
                        ("udp", "UDP connect(), per second")):
        metric, cpu_metric = f"{kind}_per_s", f"{kind}_per_cpu_s"
        cells = [f"{_fmt(s[c][metric])} ({s[c][f'{metric}_ratio']:.3f}x)" for c in (SMALL, LARGE)]
        print(f"{title:34}{_fmt(s[NONE][metric]):>14}{cells[0]:>22}{cells[1]:>22}")
        ranges = ["{:.2f}-{:.2f}".format(*s[c][f"{metric}_round_ratios"]) for c in (SMALL, LARGE)]
        print(f"{'  per-round ratios':34}{'':>14}{ranges[0]:>22}{ranges[1]:>22}")
        added = [_fmt(s[c][f"{metric}_added_ns"]) for c in (SMALL, LARGE)]
        print(f"{'  added ns per call':34}{'':>14}{added[0]:>22}{added[1]:>22}")
        ratios = [f"{s[c][f'{cpu_metric}_ratio']:.3f}x" for c in (SMALL, LARGE)]
        print(f"{'  ratio per CPU-second':34}{'':>14}{ratios[0]:>22}{ratios[1]:>22}")


def print_report(results: dict[str, Any]) -> None:
    s, labels = results["rates"], results["labels"]
    facts = results["machine"]
    print(f"\nztnet datapath benchmark — {facts['date']}, kernel {facts['kernel']}, "
          f"{facts['nproc']} CPUs, Python {facts['python']}, {results['worker']} worker, "
          f"median of {results['settings']['rounds']} rounds")
    print(f"\n{'':34}{labels[NONE]:>14}{labels[SMALL]:>22}{labels[LARGE]:>22}")
    _print_rates(s)
    print(f"{'denied connect() ns':34}{'ECONNREFUSED':>14}{'EPERM':>22}{'EPERM':>22}")
    for key in ("mean_ns", "p50_ns", "p99_ns"):
        cells = [f"{_fmt(s[c]['deny'][key])} ({s[c]['deny'][f'{key}_ratio']:.2f}x)"
                 for c in (SMALL, LARGE)]
        print(f"{'  ' + key.removesuffix('_ns'):34}{_fmt(s[NONE]['deny'][key]):>14}"
              f"{cells[0]:>22}{cells[1]:>22}")
    cost = results["program_cost"]
    print(f"\n{'kernel BPF statistics, ns per run':34}{'':>14}{labels[SMALL]:>22}"
          f"{labels[LARGE]:>22}")
    rows = (("zt_connect4, TCP allowed", "tcp", "connect4_ns"),
            ("zt_connect4, UDP allowed", "udp", "connect4_ns"),
            ("zt_connect4, denied", "deny", "connect4_ns"),
            ("zt_egress, per packet", "tcp", "egress_ns"),
            ("  packets per TCP connect", "tcp", "egress_packets_per_call"))
    for title, mode, key in rows:
        digits = 1 if key == "egress_packets_per_call" else 0
        print(f"{title:34}{'':>14}{_fmt(cost[SMALL][mode][key], digits):>22}"
              f"{_fmt(cost[LARGE][mode][key], digits):>22}")
    load = results["loading"]
    print(f"\ngrant loading ({load['grants']:,} grants; {load['entries_in_kernel']:,} entries "
          "counted in the kernel's live generation)")
    print(f"  compile only                    {load['compile_seconds']:8.2f} s")
    for key, title in (("from_empty", "replace, from empty"),
                       ("second_generation_1pct_changed", "replace, 1% changed (2nd gen.)"),
                       ("diff_1pct_changed", "replace, 1% changed (diff)")):
        entry = load[key]
        print(f"  {title:32}{entry['seconds']:8.2f} s   written {entry['written']:,}, "
              f"deleted {entry['deleted']:,}")
    print(f"  RSS after                       {load['rss_bytes_after'] / 2**20:8.1f} MiB "
          f"(before loading {load['rss_bytes_before'] / 2**20:.1f} MiB)")


# --- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datapath",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    # 50,000 TCP connects take ~1.5 s here: shorter runs vary by +-10% on a VM
    parser.add_argument("--connects", type=int, default=50_000,
                        help="TCP connect+close per measurement (default 50000)")
    parser.add_argument("--udp-connects", type=int, default=200_000,
                        help="UDP connect() calls per measurement (default 200000)")
    parser.add_argument("--denials", type=int, default=20_000,
                        help="denied connect() calls per measurement (default 20000)")
    parser.add_argument("--grants", type=int, default=100_000,
                        help="grants in the large set (default 100000)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; medians are reported (default 7)")
    parser.add_argument("--worker", choices=("auto", "c", "python"), default="auto",
                        help="load generator: compiled C (auto when cc exists) or Python")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: fewer calls, 3 rounds and 10,000 grants")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--json", action="store_true", help="also print the JSON to stdout")
    args = parser.parse_args(argv)
    if args.quick:
        args.connects, args.udp_connects, args.denials = 5_000, 20_000, 5_000
        args.grants, args.rounds = min(args.grants, 10_000), min(args.rounds, 3)
    if min(args.connects, args.udp_connects, args.denials, args.grants, args.rounds) < 1:
        parser.error("counts must be positive")
    settings = Settings(args.connects, args.udp_connects, args.denials, args.grants,
                        args.rounds, args.worker)
    return settings, args


def run(settings: Settings, setup: Setup, workdir: Path) -> dict[str, Any]:
    worker = build_worker(settings.worker, workdir)
    worker_cpu, listener_cpu = cpu_plan()
    target = Target(start_listener(setup, worker, listener_cpu), closed_port(setup))
    cgroups.ensure_agent_cgroup(setup.instance(NONE), AGENT)

    print("loading programs and grants …", file=sys.stderr)
    small = open_datapath(setup, SMALL)
    check_installed(small.install_unverified(small_grants(target.listen_port, time.time())), 2)
    loading = measure_loading(open_datapath(setup, LARGE), target.listen_port, settings.grants)

    print(f"measuring rates ({settings.rounds} rounds) …", file=sys.stderr)
    samples = measure_rounds(setup, worker, settings, target, worker_cpu)

    print("measuring program cost (bpf_stats_enabled=1) …", file=sys.stderr)
    with bpf_stats_enabled() as previous:
        cost = measure_program_cost(setup, worker, settings, target, worker_cpu)
    return {
        "machine": machine_facts(),
        "settings": settings.__dict__,
        "worker": worker.kind,
        "pinning": {"worker_cpu": worker_cpu, "listener_cpu": listener_cpu},
        "labels": {NONE: "no ztnet", SMALL: "2 grants", LARGE: f"{settings.grants + 1:,} grants"},
        "bpf_stats_enabled_before": previous,
        "rates": summarise_rounds(samples),
        "rounds": samples,
        "program_cost": cost,
        "loading": loading,
    }


def main(argv: Sequence[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("benchmarks.datapath: needs root (BPF programs, cgroups)", file=sys.stderr)
        return 2
    settings, args = parse_args(argv)
    remove_stale_instances()
    setup = Setup()
    try:
        with tempfile.TemporaryDirectory(prefix="ztnet-bench-") as workdir:
            results = run(settings, setup, Path(workdir))
    finally:
        setup.cleanup()
    print_report(results)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"\nresults written to {args.out}")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
