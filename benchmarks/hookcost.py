"""What each ztnet program costs per run, by the kernel's own statistics, as shipped.

    sudo .venv/bin/python -m benchmarks.hookcost [--grants 100000] [--repeats 3] [--json FILE]

The program-cost part of ``make bench`` alone, for iterating on the BPF programs: one real
`ztnet daemon` recording flows (benchmarks/h2h_scenarios.py ``Ztnet``, in network namespaces of
its own), with ``--grants`` grants, and the head-to-head workloads (TCP connect+close,
unconnected 64-byte UDP ``sendto``, denied connect, bulk TCP) each run with
``kernel.bpf_stats_enabled=1`` (restored afterwards). Prints, per workload and program, the
run time per run and the runs per call. No rates: those need the interleaved no-filter
baseline of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.datapath import bpf_stats_enabled, cpu_plan, machine_facts, remove_stale_instances
from benchmarks.h2h_scenarios import make_scenarios
from benchmarks.headtohead import FULL, build_loadgen, measure_program_cost


def table(cost: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over the repeats of ns per run and runs per call, per (workload, program)."""
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for entry in cost:
        for workload, got in entry.items():
            calls = got.get("calls") or 0
            for program, stats in got["programs"].items():
                if not stats["run_cnt"]:
                    continue
                per_run = stats["run_time_ns"] / stats["run_cnt"]
                per_call = stats["run_cnt"] / calls if calls else 0.0
                rows.setdefault((workload, program), []).append((per_run, per_call))
    out = []
    for (workload, program), samples in sorted(rows.items()):
        runs = sorted(s[0] for s in samples)
        out.append({"workload": workload, "program": program, "ns_per_run": runs[len(runs) // 2],
                    "runs_per_call": samples[0][1], "samples": [s[0] for s in samples]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hookcost",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--grants", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the samples here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.hookcost: needs root (namespaces, cgroups, BPF)", file=sys.stderr)
        return 2
    settings = replace(FULL, pairs=0, stats_repeats=args.repeats, ztnet_sizes=(args.grants,),
                       nft_sizes=(), iptables_sizes=(), opensnitch_sizes=())
    remove_stale_instances()
    with tempfile.TemporaryDirectory(prefix="ztnet-hookcost-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        client_cpu, server_cpu = cpu_plan()
        scenarios = make_scenarios(settings.ztnet_sizes, (), ())
        for scenario in scenarios:
            scenario.start(stack, work, loadgen, server_cpu)
        with bpf_stats_enabled():
            cost = measure_program_cost(scenarios, settings, loadgen, client_cpu)
    rows = table(next(iter(cost.values())))
    for row in rows:
        print(f"{row['workload']:6} {row['program']:18} {row['ns_per_run']:8.0f} ns/run "
              f"({row['runs_per_call']:.2f} runs/call)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_facts(), "settings": asdict(settings),
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
