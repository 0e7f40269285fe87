"""Quarantine, release and automatic response across the lab's two agent hosts, with real
daemons, a real controller and the real kernel (ztnet/lab/cluster.py).

* An operator's quarantine reaches both hosts at once: the agent's established connections
  are cut (ECONNABORTED), every new attempt fails with EPERM and is recorded as
  QUARANTINED, and a sniffer on the API host sees none of its packets afterwards (after an
  unconfined positive control proved the capture works). Release restores the grants.
* A scripted scan makes the fan-out detector fire; the policy binds it to ``quarantine``, so
  the agent is quarantined on the host that scanned and only there. After a release, the
  same scan within the cool-down alerts again but quarantines nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel.conftest import require_bpf, require_tools
from ztnet.lab.cluster import Lab, orphan_labs
from ztnet.lab.hold import HeldConnection
from ztnet.lab.netns import poll_until
from ztnet.lab.policy import OPS_BOT, RESEARCH_BOT, lab_policy
from ztnet.lab.topology import API_ALT_PORT, API_PORT, DNS_PORT, EXFIL_PORT, Role, Topology
from ztnet.lab.wire import Wire
from ztnet.observe.records import Verdict

PREFIX = "zq"
DETECTION = """
[detection]
cooldown = "10m"
[detection.actions]
fan-out = "quarantine"
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_bpf()
    require_tools("nsenter", "sysctl")
    for name in orphan_labs(PREFIX):
        Lab(Topology(name)).down()
    the_lab = Lab(Topology(f"{PREFIX}{os.getpid():x}"))
    try:
        assert the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


def operator(lab: Lab, *args: str) -> str:
    done = lab.operator(*args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def results(lab: Lab, host: Any, agent: str, attempts: list[dict[str, Any]]) -> list[str]:
    return [r["result"] for r in lab.run_attempts(host, agent, attempts)]


def alerts(lab: Lab, agent: str) -> list[dict[str, Any]]:
    out = operator(lab, "alerts", "--json", "--agent", agent)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_quarantine_reaches_both_hosts_cuts_connections_and_release_restores(lab: Lab) -> None:
    topo = lab.topology
    hosts = topo.agent_hosts_list
    api, dns = topo.by_role(Role.API)[0], topo.by_role(Role.DNS)[0]
    tries = [{"kind": "tcp", "host": api.ipv4, "port": API_PORT},
             {"kind": "udp", "host": dns.ipv4, "port": DNS_PORT}]
    for host in hosts:  # every host holds every agent's grants
        assert results(lab, host, RESEARCH_BOT, tries) == ["OK", "OK"]
    wire = Wire(lab)
    wire.start()
    try:
        wire.ready()
        with HeldConnection(lab, hosts[0], RESEARCH_BOT, api.ipv4, API_PORT) as held_a, \
                HeldConnection(lab, hosts[1], RESEARCH_BOT, api.ipv4, API_PORT) as held_b:
            assert held_a.event()["event"] == held_b.event()["event"] == "connected"
            out = operator(lab, "quarantine", "--agent", RESEARCH_BOT, "--reason",
                           "e2e: suspected compromise")
            quarantined_at = time.time()
            assert out.count(" ack ") == 2, out  # both hosts applied it before the answer
            for held in (held_a, held_b):
                broken = held.event()
                assert (broken.get("event"), broken.get("result")) == ("broken",
                                                                       "ECONNABORTED"), broken
        for host in hosts:
            assert results(lab, host, RESEARCH_BOT, tries) == ["EPERM", "EPERM"]
        wire.control(hosts)
        late = [p for p in wire.agent_traffic(wire.sniffers[Role.API].packets())
                if p.time > quarantined_at and not p.is_bare_reset]
        assert late == [], [p.summary for p in late]
    finally:
        wire.close()
    listed = operator(lab, "quarantines")
    assert RESEARCH_BOT in listed and "e2e: suspected compromise" in listed

    def recorded() -> bool | None:
        denied = {r.host for r in lab.controller_flows(since="1m")
                  if r.agent.name == RESEARCH_BOT and r.verdict == Verdict.DENIED
                  and r.drop_reason == "QUARANTINED"}
        return True if denied == {h.name for h in hosts} else None

    poll_until(recorded, 20.0, "QUARANTINED records from both hosts")
    out = operator(lab, "release", "--agent", RESEARCH_BOT, "--reason", "e2e: cleared")
    assert out.count(" ack ") == 2, out
    for host in hosts:
        assert results(lab, host, RESEARCH_BOT, tries) == ["OK", "OK"]
    assert "no agent is quarantined" in operator(lab, "quarantines")


def test_a_scan_quarantines_the_agent_on_its_host_only_and_the_cooldown_holds(
        lab: Lab) -> None:
    topo = lab.topology
    a, b = topo.agent_hosts_list
    api, exfil = topo.by_role(Role.API)[0], topo.by_role(Role.EXFIL)[0]
    policy = lab.run_dir / "detect-policy.toml"
    policy.write_text(lab_policy(topo) + DETECTION)
    operator(lab, "policy", "apply", str(policy))
    call = [{"kind": "tcp", "host": api.ipv4, "port": API_ALT_PORT}]
    scan = [{"kind": "tcp", "host": exfil.ipv4, "port": EXFIL_PORT + i} for i in range(25)]
    assert results(lab, b, OPS_BOT, call) == ["OK"]
    assert set(results(lab, b, OPS_BOT, scan)) == {"EPERM"}

    def quarantined() -> dict[str, Any] | None:
        fired = [x for x in alerts(lab, OPS_BOT) if x["detector"] == "fan-out"]
        return fired[-1] if fired and fired[-1]["action"] == "quarantine" else None

    alert = poll_until(quarantined, 20.0, "the fan-out alert and its quarantine")
    assert alert["host"] == b.name and len(alert["evidence"]) == 20

    def enforced() -> bool | None:
        return True if results(lab, b, OPS_BOT, call) == ["EPERM"] else None

    poll_until(enforced, 10.0, f"the quarantine on {b.name}")
    assert results(lab, a, OPS_BOT, call) == ["OK"]  # the other host did not report it
    assert f"{OPS_BOT}  {b.name}" in operator(lab, "quarantines")

    operator(lab, "release", "--agent", OPS_BOT, "--reason", "e2e: false alarm")
    assert results(lab, b, OPS_BOT, call) == ["OK"]
    first = alert["id"]
    assert set(results(lab, b, OPS_BOT, scan)) == {"EPERM"}

    def alerted_again() -> dict[str, Any] | None:
        fired = [x for x in alerts(lab, OPS_BOT) if x["detector"] == "fan-out"
                 and x["id"] > first]
        return fired[-1] if fired else None

    again = poll_until(alerted_again, 20.0, "the second fan-out alert")
    assert "cool-down" in again["action"], again
    assert results(lab, b, OPS_BOT, call) == ["OK"]
    assert "no agent is quarantined" in operator(lab, "quarantines")


def test_a_frozen_quarantine_on_one_host_freezes_there_only_and_release_thaws(lab: Lab) -> None:
    topo = lab.topology
    a, b = topo.agent_hosts_list
    api = topo.by_role(Role.API)[0]
    call = [{"kind": "tcp", "host": api.ipv4, "port": API_ALT_PORT}]
    frozen = {host.name: lab.instance(host).agent_cgroup(OPS_BOT) / "cgroup.freeze"
              for host in (a, b)}
    operator(lab, "quarantine", "--agent", OPS_BOT, "--host", a.name, "--freeze",
             "--reason", "e2e: freeze on one host")
    assert frozen[a.name].read_text().strip() == "1"
    assert not frozen[b.name].exists() or frozen[b.name].read_text().strip() == "0"
    assert results(lab, b, OPS_BOT, call) == ["OK"]  # host-b is not affected
    operator(lab, "release", "--agent", OPS_BOT, "--reason", "e2e: thaw")
    assert frozen[a.name].read_text().strip() == "0"
    assert results(lab, a, OPS_BOT, call) == ["OK"]
