"""The head-to-head benchmark's smoke mode: every scenario runs every workload and yields
numbers. It asserts nothing about speed (the counts are far too small to mean anything);
it proves that `make bench` works on this machine and that its JSON, plot and generated doc
section come out."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.h2h_scenarios import opensnitch_binary
from benchmarks.primitives import CGROUP_PREFIX, VARIANTS
from tests.kernel.conftest import require, require_tools
from ztnet.instance import find_cgroup2_mount

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = {"tcp": ("per_s", "p50_ns", "p99_ns"), "udp": ("per_s",),
             "bulk": ("bits_per_s",), "deny": ("p50_ns", "p99_ns")}
KINDS = {"none", "ztnet", "nftables", "iptables", "opensnitch"}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _host_rulesets() -> tuple[str, ...]:
    """The host's own nftables, iptables and ip6tables rules (counters left out):
    opensnitchd writes both of the latter where it runs."""
    out = [subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                          check=True).stdout]
    for save in ("iptables-save", "ip6tables-save"):
        text = subprocess.run([save], capture_output=True, text=True, check=True).stdout
        rules = [line for line in text.splitlines() if not line.startswith("#")]
        out.append("\n".join(line.split(" [")[0] for line in rules))
    return tuple(out)


def test_smoke_runs_every_scenario(tmp_path: Path) -> None:
    require_tools("cc", "nft", "iptables-restore", "ip6tables-save", "iperf3", "nsenter",
                  "unshare")
    require(opensnitch_binary().exists(),
            f"{opensnitch_binary()} is missing (scripts/setup.sh unpacks Debian's opensnitch)")
    host_rules = _host_rulesets()
    out, png, doc = tmp_path / "h2h.json", tmp_path / "h2h.png", tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written text stays\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.headtohead", "--smoke",
                           "--out", str(out), "--plot", str(png), "--doc", str(doc)],
                          cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    scenarios = {s["name"]: s for s in results["scenarios"]}
    assert {s["kind"] for s in scenarios.values()} == KINDS
    filtered = set(scenarios) - {"none"}
    assert {p["scenario"] for p in results["pairs"]} == filtered
    for pair in results["pairs"]:
        for side in ("baseline", "filtered"):
            for workload, keys in WORKLOADS.items():
                for key in keys:
                    value = pair[side][workload][key]
                    assert _number(value), (pair["scenario"], side, workload, key, value)
    ztnets = [name for name, s in scenarios.items() if s["kind"] == "ztnet"]
    assert sorted(results["program_cost"]) == sorted(ztnets)
    for name in ztnets:
        for workload in ("tcp", "udp", "deny"):
            programs = results["program_cost"][name][0][workload]["programs"]
            assert any(p["run_cnt"] > 0 and p["run_time_ns"] > 0 for p in programs.values()), \
                (name, workload, programs)
        assert results["daemons"][name]["flow_records_written"] > 0
    for name, scenario in scenarios.items():
        if scenario["kind"] in ("ztnet", "opensnitch"):
            assert _number(results["daemons"][name]["rss_bytes"]), name
    (control,) = results["control_plane"]  # the smoke's one size, measured in full
    for key in ("verify_ms", "apply_ms", "total_ms", "daemon_rss_mib"):
        assert _number(control[key]), (key, control)
    for key in ("revoke_one_grant", "add_one_grant"):
        assert _number(control[key]["total_ms"]), (key, control[key])
    assert _number(control["restart_pinned"]["start_to_datapath_ready_ms"]), control
    assert set(results["flow_pipeline"]) == {"standalone", "controller"}
    for mode, pipeline in results["flow_pipeline"].items():
        (rate,) = pipeline["ladder"]
        assert _number(rate["records"]) and _number(rate["daemon_cpu_pct"]), (mode, rate)
        assert _number(pipeline["latency"]["ms"]["p50"]), (mode, pipeline["latency"])
    assert _host_rulesets() == host_rules  # every filter stayed inside its namespaces
    assert png.read_bytes().startswith(b"\x89PNG")
    text = doc.read_text()
    assert "hand-written text stays" in text
    assert text.count("<!-- headtohead:begin") == 1 and text.count("<!-- headtohead:end -->") == 1
    for scenario in scenarios.values():
        assert f"| {scenario['label']} |" in text
    for part in ("**Control plane**", "add one grant", "**Flow pipeline**",
                 "flow pipeline, controller"):
        assert part in text, part


def test_primitives_smoke_measures_every_building_block(tmp_path: Path) -> None:
    """benchmarks/primitives.py with tiny counts: every variant loads, runs once per connect
    and yields a cost; the cgroup it made is gone afterwards."""
    require_tools("cc")
    out = tmp_path / "primitives.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.primitives", "--calls", "50",
                           "--rounds", "1", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {row["primitive"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(VARIANTS)
    for name, row in rows.items():
        assert _number(row["ns_per_run"]), (name, row)
    assert not list(find_cgroup2_mount().glob(CGROUP_PREFIX + "*"))
