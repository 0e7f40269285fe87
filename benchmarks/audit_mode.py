"""Audit-mode benchmark: what the audit decision costs the connect hook.

    sudo nice -n 10 .venv/bin/python -m benchmarks.audit_mode [--connects N] [--rounds R]

One agent re-connects one UDP socket N times to 192.0.2.1:9 (TEST-NET-1; a UDP connect()
sends no packet, so nothing leaves the host) under four conditions, interleaved over R
rounds, against a no-ztnet baseline (the same worker in a plain cgroup) in the same run:

* ``granted``: a grant covers it (enforce mode);
* ``refused``: no grant, enforce mode (EPERM);
* ``audited``: no grant, audit mode (the connect goes ahead, recorded as AUDIT);
* ``audit-granted``: audit mode with the grant (ALLOWED).

Reported per condition: connect() calls per second and the ratio to the baseline, and the
kernel's ns per zt_connect4 run (BPF run-time statistics). Refused and audited attempts emit
deny-side events, which the per-agent budget (100 a second) mostly suppresses: the figures are
those of a flood, the case that matters for cost. docs/performance.md has a reference run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.datapath import (
    AGENT,
    Setup,
    _child_setup,
    _snapshot,
    bpf_stats_enabled,
    build_worker,
    cpu_plan,
    open_datapath,
    remove_stale_instances,
)
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.identity import cgroups
from ztnet.lab.netns import BlackholeNetns, nsenter_argv
from ztnet.testing.agents import agent_argv

TARGET, PORT = "192.0.2.1", 9
CONDITIONS = ("granted", "refused", "audited", "audit-granted")
BASELINE = "none"


def _install(datapath: Datapath, condition: str) -> None:
    now = time.time()
    grant = Grant(1, AGENT, Proto.UDP, ipaddress.ip_network(f"{TARGET}/32"),
                  PortRange(PORT, PORT), now - 60, now + 3600)
    grants = [grant] if condition in ("granted", "audit-granted") else []
    audit = {AGENT} if condition.startswith("audit") else set()
    datapath.install_unverified(grants, audit=audit)


def _run(argv: list[str], cgroup: Path | None, cpu: int | None) -> dict[str, Any]:
    """The worker's JSON result; it exits 1 when connects failed, which ``refused`` expects."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=_child_setup(cgroup, cpu))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _expect(condition: str, result: dict[str, Any]) -> None:
    refused = condition == "refused"
    if (result["failed"] == result["calls"]) != refused or (refused and result["first_errno"]
                                                            != 1):
        raise RuntimeError(f"{condition}: unexpected outcome {result}")


def run(connects: int, rounds: int, workdir: Path, setup: Setup) -> dict[str, Any]:
    worker = build_worker("auto", workdir)
    cpu, _ = cpu_plan()
    datapath = open_datapath(setup, "audit")
    instance = setup.instance("audit")
    datapath.ensure_agents([AGENT])
    baseline_cgroup = cgroups.ensure_agent_cgroup(setup.instance(BASELINE), AGENT)
    rates: dict[str, list[float]] = {c: [] for c in (BASELINE, *CONDITIONS)}
    hook_ns: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    args = ("udp", TARGET, PORT, connects)
    # a namespace whose default route leads into a discarding device: the audited connect()
    # finds a route (a UDP connect sends nothing anyway)
    with BlackholeNetns() as netns, bpf_stats_enabled():
        for round_number in range(rounds):
            order = list(CONDITIONS[round_number % 4:] + CONDITIONS[:round_number % 4])
            for condition in [BASELINE, *order]:
                if condition == BASELINE:
                    result = _run(nsenter_argv(netns.netns, worker.command(*args)),
                                  baseline_cgroup, cpu)
                else:
                    _install(datapath, condition)
                    before = _snapshot(datapath)
                    result = _run(agent_argv(instance, AGENT, worker.command(*args),
                                             netns=netns.netns), None, cpu)
                    after = _snapshot(datapath)
                    _expect(condition, result)
                    runs = after["zt_connect4"][1] - before["zt_connect4"][1]
                    elapsed = after["zt_connect4"][0] - before["zt_connect4"][0]
                    hook_ns[condition].append(elapsed / runs if runs else float("nan"))
                rates[condition].append(result["calls"] / result["ns"] * 1e9)
            print(f"  round {round_number + 1}/{rounds} done", file=sys.stderr)
    base = statistics.median(rates[BASELINE])
    return {
        "connects": connects, "rounds": rounds, "worker": worker.kind,
        "baseline_per_s": base,
        "conditions": {c: {"per_s": statistics.median(rates[c]),
                           "ratio": statistics.median(rates[c]) / base,
                           "connect4_ns": statistics.median(hook_ns[c])}
                       for c in CONDITIONS},
    }


def main(argv: Sequence[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("benchmarks.audit_mode: needs root (BPF programs, cgroups)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit_mode")
    parser.add_argument("--connects", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    remove_stale_instances()
    setup = Setup()
    try:
        with tempfile.TemporaryDirectory(prefix="ztnet-bench-") as workdir:
            results = run(args.connects, args.rounds, Path(workdir), setup)
    finally:
        setup.cleanup()
    print(f"UDP connect() to {TARGET}:{PORT}, {args.connects} calls x {args.rounds} rounds "
          f"({results['worker']} worker); baseline {results['baseline_per_s']:,.0f}/s")
    print(f"{'condition':<14} {'calls/s':>12} {'vs baseline':>12} {'zt_connect4 ns':>15}")
    for name, entry in results["conditions"].items():
        print(f"{name:<14} {entry['per_s']:>12,.0f} {entry['ratio']:>12.3f} "
              f"{entry['connect4_ns']:>15.0f}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
