"""The lab's end-to-end checks (tests/kernel/test_lab_e2e.py), applied to the Vagrant VMs.

e2e.py (on the machine running Vagrant) gathers the evidence over SSH and this module, run
in the controller VM with the project's virtualenv from /ztnet, plans and judges it with the
lab test's own traffic matrix and matching (ztnet/lab/scenarios.py):

    python vagrant/vmcheck.py plan            → {host: {"agent", "attempts", "raw", "controls"}}
    python vagrant/vmcheck.py judge < EVIDENCE → one JSON row per check: [name, ok, detail]

EVIDENCE is {"results": {host: [traffic agent result…]}, "raw": {host: […]}, "packets": [capture
line…], "flows": [`ztnet flows --json` line…]}. The VMs mirror the lab's roles and addresses
(the api, exfil and dns hosts are addresses of one services VM, so one capture there sees all
three; dns is judged like api and exfil).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ztnet.lab import scenarios
from ztnet.lab.scenarios import Outcome
from ztnet.lab.sniff import CapturedPacket
from ztnet.lab.topology import CONTROL_PORT, LabHost, Topology
from ztnet.observe.records import from_json

SNIFFED = ("api", "exfil", "dns")  # all on the services VM
TOPOLOGY = Topology()


def _hosts() -> tuple[LabHost, ...]:
    return TOPOLOGY.agent_hosts_list


def plan() -> dict[str, Any]:
    return {host.name: {
        "agent": host.agent,
        "attempts": [a.spec(TOPOLOGY, host) for a in scenarios.MATRIX],
        "raw": [a.spec(TOPOLOGY, host) for a in scenarios.RAW],
        "controls": scenarios.control_attempts(TOPOLOGY),
    } for host in _hosts()}


def _target(outcome: Outcome) -> str | None:
    role = "exfil" if outcome.attempt.role == "metadata" else outcome.attempt.role
    return role if role in SNIFFED else None


def _describe(outcome: Outcome) -> str:
    a = outcome.attempt
    return (f"{outcome.agent}@{outcome.host.name} {a.kind} "
            f"{a.address(TOPOLOGY, outcome.host)}:{a.port}")


def judge(evidence: dict[str, Any]) -> list[tuple[str, bool, str]]:
    rows: list[tuple[str, bool, str]] = []
    outcomes: list[Outcome] = []
    for host in _hosts():
        results = evidence["results"][host.name] + evidence["raw"][host.name]
        attempts = (*scenarios.MATRIX, *scenarios.RAW)
        outcomes += [Outcome(host, a, r) for a, r in zip(attempts, results, strict=True)]
    packets = [CapturedPacket.from_json(line) for line in evidence["packets"]]

    # 1. the traffic agent (as in the lab test): allowed works end to end, denied is EPERM at once
    for host in _hosts():
        wrong, allowed, denied = [], 0, 0
        for o in (o for o in outcomes if o.host == host and o.attempt.kind != "raw"):
            result = o.result
            if not o.allowed:
                good = result["result"] == "EPERM"
            elif o.attempt.kind == "tcp":
                good = (result["result"], result["received"]) == ("OK", len(scenarios.PAYLOAD))
            elif o.attempt.kind == "dns":
                good = (result["result"], result.get("addresses")) == (
                    "OK", [TOPOLOGY.host("api").ipv4])
            else:
                good = result["result"] == "OK"
            allowed, denied = allowed + o.allowed, denied + (not o.allowed)
            if not good:
                wrong.append(f"{_describe(o)} -> {result}")
        rows.append((f"{host.name} {host.agent}: {allowed} allowed work, {denied} denied EPERM",
                     not wrong, "; ".join(wrong) or "every attempt as the policy says"))

    # 2. the wire: the capture proves itself with the positive controls, then allowed
    # attempts arrived, denied ones did not, and nothing else from an agent host did
    controls = {p.src for p in packets if p.dport == CONTROL_PORT}
    missing = [h.name for h in _hosts() if h.ipv4 not in controls]
    rows.append(("sniffer saw the positive controls", not missing,
                 f"missing from {missing}" if missing else f"{len(packets)} packets captured"))
    wrong, explained = [], set[CapturedPacket]()
    for o in outcomes:
        if _target(o) is None:
            continue
        arrived = scenarios.arrived(packets, TOPOLOGY, o)
        if bool(arrived) != o.allowed:
            wrong.append(f"{_describe(o)} ({'allowed' if o.allowed else 'denied'}): "
                         f"{len(arrived)} packets arrived")
        explained |= set(arrived)
    unexplained = [p.summary for p in scenarios.agent_packets(packets, TOPOLOGY)
                   if p not in explained]
    checked = sum(_target(o) is not None for o in outcomes)
    rows.append(("wire: allowed arrived, denied never did", not wrong and not unexplained,
                 "; ".join(wrong + [f"unexplained: {unexplained}"] * bool(unexplained))
                 or f"{checked} attempts to api/exfil/dns match the capture"))

    # 3. the controller's flow store has every verdict the attempts caused
    records = [from_json(line) for line in evidence["flows"]]
    stored = {scenarios.verdict_key(r) for r in records}
    expected = {k for o in outcomes if (k := scenarios.expected_key(TOPOLOGY, o)) is not None}
    absent = sorted(expected - stored)
    rows.append(("controller flow store: every verdict recorded", not absent,
                 f"missing {absent[:5]}" if absent else
                 f"{len(expected)} verdicts among {len(records)} records"))
    return rows


def main(argv: list[str]) -> int:
    if argv == ["plan"]:
        print(json.dumps(plan()))
    elif argv == ["judge"]:
        for row in judge(json.load(sys.stdin)):
            print(json.dumps(row))
    else:
        print("usage: vmcheck.py plan|judge", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
