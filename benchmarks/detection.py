"""Detection and response latency, and false alerts on benign traffic, in the lab (root).

    sudo .venv/bin/python -m benchmarks.detection [--trials 20] [--benign 60]

Brings up a lab of its own (controller, two agent hosts with their daemons), applies the lab
policy plus a ``[detection]`` table binding ``fan-out`` to ``quarantine`` (cool-down 1 s),
then, ``--trials`` times: ops-bot on host-b scans 20 ports of the exfil host (every
connect() EPERM), the fan-out detector fires on the 20th distinct target, the controller
quarantines the agent on host-b; the operator releases it. Per trial:

* **to the alert**: from the kernel's time of the connect() that crossed the threshold (the
  newest evidence record's ``time``: the verdict, stamped in the connect hook) to the
  alert's ``time`` (the controller's clock; one machine, one clock);
* **to quarantine in force**: from the same connect() to the moment host-b's daemon set the
  quarantine flag in the kernel map (``flags_at`` in its ``quarantine changed`` log line,
  taken right after the map update; from then on every attempt is EPERM).

Then the false-alert figure: a fresh policy version with default thresholds and a short
learning window (``--learning``), and ``--benign`` seconds of the lab's benign traffic from
both hosts (each agent's allowed matrix: research-bot's DNS query and API call, ops-bot's
API calls over IPv4 and IPv6, its ping and DNS query, one round every 0.5 s, learning
window included); every alert raised for it is a false alert. Reports JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from ztnet.lab.cluster import Lab
from ztnet.lab.netns import poll_until
from ztnet.lab.policy import OPS_BOT, RESEARCH_BOT, lab_policy
from ztnet.lab.scenarios import MATRIX
from ztnet.lab.topology import EXFIL_PORT, Role, Topology

RESPONSE = """
[detection]
cooldown = "1s"
max_auto_quarantines = 10000
[detection.actions]
fan-out = "quarantine"
"""


def operator(lab: Lab, *args: str) -> str:
    done = lab.operator(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ztnet {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def alerts(lab: Lab, agent: str = "") -> list[dict[str, Any]]:
    out = operator(lab, "alerts", "--json", "--limit", "10000",
                   *(("--agent", agent) if agent else ()))
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def flag_times(lab: Lab, host: Any) -> list[float]:
    times = []
    for line in lab.daemon_log(host).splitlines():
        if '"quarantine changed"' in line:
            entry = json.loads(line)
            if OPS_BOT in entry.get("quarantined", ()):
                times.append(float(entry["flags_at"]))
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * statistics.median(values), 1),
            "p99_ms": round(1000 * percentile(values, 99), 1),
            "max_ms": round(1000 * max(values), 1), "n": len(values)}


def trial(lab: Lab, b: Any, scan: list[dict[str, Any]], number: int) -> tuple[float, float]:
    """One scan: seconds from the threshold-crossing connect() to the alert, and to the
    quarantine flag in host-b's kernel."""
    seen = {a["id"] for a in alerts(lab, OPS_BOT)}
    flags_before = len(flag_times(lab, b))
    results = {r["result"] for r in lab.run_attempts(b, OPS_BOT, scan, timeout=0.5)}
    assert results == {"EPERM"}, results

    def fired() -> dict[str, Any] | None:
        new = [a for a in alerts(lab, OPS_BOT) if a["id"] not in seen
               and a["action"] == "quarantine"]
        return new[0] if new else None

    alert = poll_until(fired, 20.0, f"trial {number}: the quarantining alert")
    flags = poll_until(lambda: flag_times(lab, b)[flags_before:] or None, 20.0,
                       f"trial {number}: the quarantine in host-b's kernel")
    evidence = set(alert["evidence"])

    def trigger_record() -> float | None:
        times = [r.time_ns for r in lab.controller_flows(since="2m") if r.uuid in evidence]
        return max(times) / 1e9 if len(times) == len(evidence) else None

    trigger = poll_until(trigger_record, 20.0, "the evidence records")
    return alert["time"] - trigger, flags[0] - trigger


def latency(lab: Lab, trials: int) -> dict[str, Any]:
    topo = lab.topology
    b, exfil = topo.agent_hosts_list[1], topo.by_role(Role.EXFIL)[0]
    policy = lab.run_dir / "bench-detection.toml"
    policy.write_text(lab_policy(topo) + RESPONSE)
    operator(lab, "policy", "apply", str(policy))
    scan = [{"kind": "tcp", "host": exfil.ipv4, "port": EXFIL_PORT + i} for i in range(20)]
    to_alert, to_quarantine = [], []
    for number in range(trials):
        alert_s, quarantine_s = trial(lab, b, scan, number)
        to_alert.append(alert_s)
        to_quarantine.append(quarantine_s)
        operator(lab, "release", "--agent", OPS_BOT, "--reason", f"benchmark trial {number}")
        time.sleep(1.2)  # the policy's 1 s cool-down starts at the release: pacing
    return {"to_alert": summary(to_alert), "to_quarantine_in_force": summary(to_quarantine),
            "samples_ms": {"to_alert": [round(1000 * v, 1) for v in to_alert],
                           "to_quarantine": [round(1000 * v, 1) for v in to_quarantine]}}


def benign(lab: Lab, seconds: float, learning: str) -> dict[str, Any]:
    topo = lab.topology
    policy = lab.run_dir / "bench-benign.toml"
    policy.write_text(lab_policy(topo) + f'\n[detection]\nlearning = "{learning}"\n')
    operator(lab, "policy", "apply", str(policy))
    for agent in (RESEARCH_BOT, OPS_BOT):
        operator(lab, "baseline", "reset", agent)
    before = {a["id"] for a in alerts(lab)}
    rounds = {host.name: [a.spec(topo, host) for a in MATRIX if host.agent in a.allowed]
              for host in topo.agent_hosts_list}
    start, done = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for host in topo.agent_hosts_list:
            lab.run_attempts(host, host.agent, rounds[host.name])
        done += 1
        time.sleep(0.5)  # the traffic's own pacing
    time.sleep(2.0)  # the last uploads (batched, 200 ms) reach the controller
    raised = [a for a in alerts(lab) if a["id"] not in before]
    return {"seconds": seconds, "rounds": done,
            "attempts": done * sum(len(r) for r in rounds.values()),
            "learning": learning, "false_alerts": len(raised),
            "alerts": [f"{a['detector']}: {a['summary']}" for a in raised[:10]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--benign", type=float, default=60.0, help="seconds of benign replay")
    parser.add_argument("--learning", default="20s", help="baseline learning window")
    args = parser.parse_args(argv)
    lab = Lab(Topology(f"zb{os.getpid():x}"))
    try:
        lab.up()
        result = {"latency": latency(lab, args.trials),
                  "benign": benign(lab, args.benign, args.learning)}
    finally:
        lab.down()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
