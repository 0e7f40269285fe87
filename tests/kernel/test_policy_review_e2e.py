"""Audit mode, `policy plan` and `policy suggest` end to end: a real `ztnet controller
serve`, a host enrolled with `ztnet enroll`, a real `ztnet daemon --controller` enforcing with
the kernel, an agent in a network namespace, an echo server on the other side.

1. The agent runs in audit mode: what its one grant does not cover reaches the server and is
   recorded as AUDIT at the controller; loopback and the metadata address stay EPERM.
2. `policy plan` replays those records against a candidate; the candidate is then enforced
   for real, and the attempts that now fail with EPERM are exactly the plan's ``refused``.
3. `policy suggest` drafts a policy from the records; applied, it lets through every attempt
   that went ahead and refuses everything else in the test's matrix.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.test_controller_e2e import enroll_with_cli, event
from ztnet.cli.policy_review import controller_flows, policy_plan, policy_suggest
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, poll_until
from ztnet.lab.servers import ServerProcess
from ztnet.observe.records import EventType, Verdict
from ztnet.testing.agents import agent_argv, traffic_argv
from ztnet.testing.controller import ControllerProcess, init_controller, policy_toml
from ztnet.testing.daemon import HOST, DaemonProcess

A, B, C, D, U = 8080, 8081, 8082, 8083, 5353
AGENT = "bot"
DEADLINE = 30.0

# (kind, side, port): side "b4"/"b6" is the server's IPv4/IPv6 address, else a literal host
RECORDED = [("tcp", "b4", A), ("tcp", "b4", B), ("tcp", "b6", B), ("tcp", "b4", C),
            ("udp", "b4", U), ("tcp", "127.0.0.1", A), ("tcp", "169.254.169.254", 80)]
PROTECTED = RECORDED[5:]
NEVER_TRIED = [("tcp", "b4", D), ("udp", "b4", A), ("tcp", "b6", C), ("udp", "b6", U)]
Attempt = tuple[str, str, int]


@dataclass
class Lab:
    instance: Instance
    pair: NetnsPair
    server: ServerProcess
    controller: ControllerProcess

    def host(self, side: str) -> str:
        return {"b4": self.pair.b.ipv4, "b6": self.pair.b.ipv6}.get(side, side)

    def run(self, attempts: list[Attempt]) -> dict[Attempt, str]:
        """Each attempt once, from one agent process run as nobody: the kernel's answers."""
        script = [{"kind": kind, "host": self.host(side), "port": port, "payload": "ping"}
                  for kind, side, port in attempts]
        argv = agent_argv(self.instance, AGENT, traffic_argv("many", json.dumps(script)),
                          netns=self.pair.a.netns, user="nobody")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        by_index = {int(r["index"]): str(r["result"]) for r in results}
        return {attempt: by_index[i] for i, attempt in enumerate(attempts)}

    def key(self, attempt: Attempt) -> tuple[str, int | None, str]:
        kind, side, port = attempt
        return (kind, port, self.host(side))

    def apply(self, text: str) -> None:
        with self.controller.admin() as admin:
            response = admin.apply_policy(text)
        assert [(r.host, r.outcome) for r in response.results] == [(HOST, "ack")], response


def audit_policy(lab: Lab) -> str:
    text = policy_toml({AGENT: [(f"{lab.pair.b.ipv4}/32", str(A))]})
    return text.replace(f"[agents.{AGENT}]\n", f'[agents.{AGENT}]\nmode = "audit"\n')


@pytest.fixture
def lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4, pair.b.ipv6],
                                            tcp=[A, B, C, D], udp=[A, U]) as server:
        policy = tmp_path / "policy.toml"
        controller = ControllerProcess(init_controller(tmp_path / "ctl"), policy=policy)
        lab = Lab(instance, pair, server, controller)
        policy.write_text(audit_policy(lab))
        with controller:
            assert enroll_with_cli(controller, tmp_path / "state").returncode == 0
            with DaemonProcess(instance, None, None, tmp_path / "state",
                               controller=controller.address) as daemon:
                daemon.wait_event(event("bundle applied"))
                yield lab


def stored_decisions(lab: Lab) -> dict[tuple[str, int | None, str], set[Verdict]]:
    """Verdicts of the connect/sendmsg records at the controller, by (kind, port, host)."""
    with lab.controller.admin() as admin:
        flows = controller_flows(admin)
    found: dict[tuple[str, int | None, str], set[Verdict]] = {}
    for record in flows.records:
        if record.event_type is EventType.FLOW_END:
            continue
        kind = {6: "tcp", 17: "udp"}[record.proto]
        found.setdefault((kind, record.destination_port, record.destination),
                         set()).add(record.verdict)
    return found


def test_audit_plan_and_suggest_against_real_enforcement(lab: Lab, tmp_path: Path) -> None:
    # --- 1. audit mode: everything but loopback and metadata goes ahead, recorded AUDIT
    audited = lab.run(RECORDED)
    assert {a: r for a, r in audited.items() if a in PROTECTED} == \
        {a: "EPERM" for a in PROTECTED}
    assert all(r == "OK" for a, r in audited.items() if a not in PROTECTED), audited
    for port in (B, C):
        lab.server.wait_event(lambda e, p=port: e.kind == "data" and e.local[1] == p)
    lab.server.wait_event(lambda e: e.kind == "udp" and e.local[1] == U)
    expected = {lab.key(a): {Verdict.AUDIT} for a in RECORDED[1:5]}
    expected[lab.key(RECORDED[0])] = {Verdict.ALLOWED}
    expected |= {lab.key(a): {Verdict.DENIED} for a in PROTECTED}
    poll_until(lambda: True if stored_decisions(lab) == expected else None, DEADLINE,
               f"the audit-phase records at the controller: {expected}")

    # --- 2. plan a candidate, then enforce it and compare
    candidate = policy_toml({AGENT: [(f"{lab.pair.b.ipv4}/32", str(A)),
                                     (f"{lab.pair.b.ipv4}/32", str(B))]})
    candidate_file = tmp_path / "candidate.toml"
    candidate_file.write_text(candidate)
    out = io.StringIO()
    with lab.controller.admin() as admin:
        policy_plan(candidate_file, controller_flows(admin), as_json=True, out=out)
    (agent_plan,) = json.loads(out.getvalue())["agents"]
    planned = {({6: "tcp", 17: "udp"}[o["proto"]], o["port"], o["destination"])
               for o in agent_plan["refused"]}
    assert agent_plan["unused_grants"] == []
    lab.apply(candidate)
    enforced = lab.run(RECORDED)
    newly_refused = {lab.key(a) for a, r in enforced.items()
                     if r == "EPERM" and audited[a] != "EPERM"}
    assert newly_refused == planned
    assert planned == {lab.key(a) for a in RECORDED[2:5]}  # the matrix says which, too
    assert all(enforced[a] == "EPERM" for a in PROTECTED)

    # --- 3. suggest from what was recorded; applied, it allows that and nothing else
    suggested = tmp_path / "suggested.toml"
    with lab.controller.admin() as admin:
        policy_suggest(controller_flows(admin, agent=AGENT), agent=AGENT, out_path=suggested)
    text = suggested.read_text()
    assert text.startswith("# SUGGESTED POLICY FOR HUMAN REVIEW")
    lab.apply(text)
    matrix = RECORDED + NEVER_TRIED
    results = lab.run(matrix)
    went_ahead = {a for a, r in audited.items() if r == "OK"}
    assert {a for a, r in results.items() if r != "EPERM"} == went_ahead, results
    # the evidence names records the controller holds
    with lab.controller.admin() as admin:
        uuids = {json.loads(r)["uuid"] for r in admin.flow_history()}
    cited = {word.strip(",;") for line in text.splitlines() if line.startswith("# evidence:")
             for word in line.split() if word.count("-") == 4}
    assert cited and cited <= uuids
