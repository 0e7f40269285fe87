"""The whole system across hosts: the lab (ztnet/lab/cluster.py), checked end to end.

A real controller and two agent hosts, each enrolled with a one-time token and running its
own daemon instance, with different agents and so different policies (ztnet/lab/policy.py).
From each agent host, its agent tries every other role — the API (v4/v6, both ports, ping),
the exfil sink (TCP and UDP, v4 and v6), the metadata address, the DNS resolver (v4 and v6),
the controller's two listeners, the other agent host — and, as root, raw packets. The
daemons run ztnet's resolver (--dns), so a DNS attempt no address grant covers goes to it and
is REFUSED (no hostname grant names api.lab.internal). Three witnesses must agree:

* the traffic agent's errno (EPERM at once for what is denied);
* sniffers on the api and exfil hosts: every allowed attempt arrived, no denied packet did
  (proven after an unconfined positive control, see ztnet/lab/sniff.py);
* the flow records in the controller's flow store (`ztnet flows --controller --json`, which
  the daemons feed), which must name exactly these attempts, each with the right verdict, and
  whose flow ends carry the very source ports the sniffers saw.

Also: `ztnet demo` exits 0 with the right summary, and `ztnet lab down` cleans up after a
SIGKILLed `ztnet lab up`. Lab names carry this process's pid (zl…, zd…, zk…), so concurrent
test runs and a developer's own `ztnet lab` never collide; leftovers of crashed runs are
removed first.

The traffic matrix, and how each witness is matched to an attempt, are in
ztnet/lab/scenarios.py: vagrant/vmcheck.py applies the same checks across VMs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.kernel.conftest import require_bpf, require_tools
from ztnet.datapath.bpfsys import attached_prog_ids
from ztnet.datapath.loader import PROGRAMS
from ztnet.identity import cgroups
from ztnet.instance import Instance, find_cgroup2_mount
from ztnet.lab.cluster import Lab, orphan_labs
from ztnet.lab.netns import list_netns, poll_until
from ztnet.lab.procs import alive
from ztnet.lab.scenarios import (
    MATRIX,
    OPS,
    PAYLOAD,
    RAW,
    RESEARCH,
    SNIFFED,
    Outcome,
    agent_packets,
    arrived,
    control_attempts,
    expected_key,
    sniffed_target,
    verdict_key,
)
from ztnet.lab.sniff import CapturedPacket, Sniffer
from ztnet.lab.topology import HOST_IFACE, LabHost, Topology
from ztnet.lab.wire import control_from
from ztnet.observe.records import EventType, FlowRecord

PREFIXES = ("zl", "zd", "zk")  # e2e lab, demo lab, killed lab


@pytest.fixture(scope="module", autouse=True)
def _clean_crashed_runs() -> None:
    require_bpf()
    require_tools("nsenter", "sysctl")
    for prefix in PREFIXES:
        for name in orphan_labs(prefix):
            Lab(Topology(name)).down()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    the_lab = Lab(Topology(f"zl{os.getpid():x}"))
    try:
        assert the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


def test_two_agent_hosts_every_role_three_witnesses_agree(lab: Lab) -> None:
    topo = lab.topology
    started = time.time()
    sniffers = {role: Sniffer(topo.netns(role), HOST_IFACE) for role in SNIFFED}
    outcomes: list[Outcome] = []
    try:
        for sniffer in sniffers.values():
            sniffer.start()
        for host in topo.agent_hosts_list:
            results = lab.run_attempts(host, host.agent, [a.spec(topo, host) for a in MATRIX])
            results += lab.run_attempts(host, host.agent, [a.spec(topo, host) for a in RAW],
                                        user=None)
            outcomes += [Outcome(host, a, r, dns_redirect=True)
                         for a, r in zip((*MATRIX, *RAW), results, strict=True)]
        # positive controls: unconfined, from each agent host, after all agent traffic
        for host in topo.agent_hosts_list:
            lab.run_attempts(host, None, control_attempts(topo), timeout=1.0)
        for sniffer in sniffers.values():
            for host in topo.agent_hosts_list:
                sniffer.wait_for(control_from(host), 10.0,
                                 f"the positive control from {host.name}")
    finally:
        captured = {role: sniffer.stop() for role, sniffer in sniffers.items()}

    # 1. the traffic agent: allowed works end to end, denied fails at once with EPERM
    for o in outcomes:
        what = f"{o.agent}@{o.host.name} {o.attempt}"
        if o.attempt.kind == "raw":
            continue  # sendto() of a raw socket reports nothing useful; the wire decides
        if o.redirected:  # RCODE 5: REFUSED by ztnet's resolver
            assert o.result == {"index": o.result["index"], "result": "RCODE5",
                                "addresses": []}, (what, o.result)
        elif not o.allowed:
            assert o.result["result"] == "EPERM", (what, o.result)
        elif o.attempt.kind == "tcp":
            assert (o.result["result"], o.result["received"]) == ("OK", len(PAYLOAD)), what
        elif o.attempt.kind == "dns":
            assert o.result == {"index": o.result["index"], "result": "OK",
                                "addresses": [topo.host("api").ipv4]}, what
        else:
            assert o.result["result"] == "OK", (what, o.result)

    # 2. the wire: allowed arrived, denied did not, and nothing else from an agent host did
    explained: set[CapturedPacket] = set()
    for o in outcomes:
        role = sniffed_target(o)
        if role is None:
            continue
        packets = arrived(captured[role], topo, o)
        assert bool(packets) == o.allowed, (f"{o.agent}@{o.host.name} {o.attempt}", packets)
        explained |= set(packets)
    for role in SNIFFED:
        unexplained = [p.summary for p in agent_packets(captured[role], topo)
                       if p not in explained]
        assert not unexplained, (role, unexplained)

    # 3. the controller's flow store: exactly these verdicts, and the sniffed source ports
    expected = sorted(k for o in outcomes if (k := expected_key(topo, o)) is not None)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started - 1))

    kernel = (EventType.CONNECT, EventType.SENDMSG)  # FLOW_END and DNS are checked below
    refusals = sorted((o.host.name, o.agent) for o in outcomes if o.redirected)

    def stored() -> list[FlowRecord] | None:
        records = lab.controller_flows(since=since)
        verdicts = sorted(verdict_key(r) for r in records if r.event_type in kernel)
        ends = [r for r in records if r.event_type == EventType.FLOW_END]
        tcp_allowed = sum(o.allowed for o in outcomes if o.attempt.kind == "tcp")
        queries = sum(r.event_type == EventType.DNS for r in records)
        return records if verdicts == expected and len(ends) >= tcp_allowed \
            and queries >= len(refusals) else None

    records = poll_until(stored, 20.0, "the controller's flow store to hold every attempt")
    verdicts = sorted(verdict_key(r) for r in records if r.event_type in kernel)
    assert verdicts == expected
    # each redirected DNS attempt: one query record from ztnet's resolver, REFUSED
    queries = [r for r in records if r.event_type == EventType.DNS]
    assert sorted((r.host, r.agent.name) for r in queries) == refusals, queries
    assert all(r.dns is not None and r.dns.rcode == "REFUSED"
               and r.dns.name == topo.host("api").fqdn for r in queries), queries
    ends = [r for r in records if r.event_type == EventType.FLOW_END]
    for o in outcomes:
        if o.attempt.kind != "tcp" or not o.allowed:
            continue
        sport = int(o.result["sport"])
        end = [r for r in ends if (r.host, r.source_port, r.destination_port) ==
               (o.host.name, sport, o.attempt.port)]
        assert len(end) == 1, (o, end)
        assert end[0].grant is not None and end[0].flow is not None
        assert end[0].flow.bytes_out > len(PAYLOAD) and end[0].flow.bytes_in > len(PAYLOAD)
        role = sniffed_target(o)
        assert role is not None
        syns = [p for p in arrived(captured[role], topo, o) if p.is_syn]
        assert [(p.src, p.sport) for p in syns] == [(end[0].source, sport)], (o, syns)
    pings = [r for r in ends if r.agent.name == OPS and r.proto == 1
             and r.destination == topo.host("api").ipv4]
    assert pings and all(r.grant is not None for r in pings)
    assert not [r for r in ends if r.agent.name == RESEARCH and r.proto in (1, 58)]
    # the controller and each host's own log agree, record for record
    local = {r.uuid for h in topo.agent_hosts_list for r in _local_flows(lab, h, started - 1)}
    assert local <= {r.uuid for r in records}


def _local_flows(lab: Lab, host: LabHost, since: float) -> list[FlowRecord]:
    from ztnet.observe.query import read_flows

    return [r for r in read_flows(lab.flows_path(host)) if r.time >= since]


def _local_flows_or_none(lab: Lab, host: LabHost) -> list[FlowRecord] | None:
    return _local_flows(lab, host, 0) or None


def test_each_daemon_owns_its_programs_maps_and_agents(lab: Lab) -> None:
    """Two daemons share one kernel: each has its own programs attached at its own cgroup
    root, its own pins, and records only its own agents' cgroups."""
    programs: dict[str, set[int]] = {}
    agent_cgroups: dict[str, set[int]] = {}
    for host in lab.topology.agent_hosts_list:
        instance = lab.instance(host)
        lab.run_attempts(host, host.agent, [{"kind": "tcp", "host": lab.topology.host("api").ipv4,
                                      "port": 443}])
        fd = os.open(instance.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            per_hook = [attached_prog_ids(fd, spec.attach_type) for spec in PROGRAMS]
        finally:
            os.close(fd)
        assert all(len(ids) == 1 for ids in per_hook), (host.name, per_hook)
        programs[host.name] = {i for ids in per_hook for i in ids}
        assert (instance.pin_dir / "zt_grants_v1").exists()
        agent_cgroups[host.name] = {cgroups.cgroup_id(path) for path in
                                    cgroups.agent_cgroups(instance).values()}
        records = poll_until(partial(_local_flows_or_none, lab, host), 10.0,
                             f"{host.name}'s flow log")
        # (DNS query records come from ztnet's resolver, not a socket hook: no cgroup id)
        assert {r.cgroup_id for r in records if r.event_type != EventType.DNS} \
            <= agent_cgroups[host.name]
        assert {r.host for r in records} == {host.name}
    a, b = (lab.topology.agent_hosts_list[i].name for i in (0, 1))
    assert not programs[a] & programs[b]
    assert not agent_cgroups[a] & agent_cgroups[b]
    assert lab.instance(a).pin_dir != lab.instance(b).pin_dir


# --- the demo, and down after a crash -------------------------------------------------------


def ztnet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_the_demo_tells_the_story_and_its_summary_adds_up() -> None:
    name = f"zd{os.getpid():x}"
    start = time.monotonic()
    done = ztnet("demo", "--name", name)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert took < 60, took
    out = done.stdout
    assert "FAIL" not in out and "all 23 steps behaved as described" in out
    assert "the held connection was cut: ECONNABORTED" in out  # the quarantine chapter
    assert "the upload failed with ECONNABORTED" in out  # the byte-budget chapter
    # the hostname chapter: the flow trace names the CDN's addresses, a second edge after
    # the TTL, the ungranted name REFUSED
    assert "cdn.example.com (198.51.100.1):443" in out
    assert "cdn.example.com (198.51.100.2):443" in out
    assert "the name is REFUSED" in out
    # AGENT HOST ATTEMPTS ALLOWED DENIED ALERTS BYTES-OUT BYTES-IN
    rows: dict[tuple[str, str], list[int]] = {}
    for line in out[out.index("\nsummary"):].splitlines():
        cells = line.split()
        if len(cells) == 8 and cells[2].isdigit():
            rows[(cells[0], cells[1])] = [int(cell) for cell in cells[2:]]
    assert rows[(RESEARCH, "host-a")][:4] == [8, 3, 5, 1], rows
    assert rows[(OPS, "host-b")][:4] == [2, 1, 1, 0], rows
    assert rows[("total", "-")][:4] == [10, 4, 6, 1], rows
    assert all(row[4] > 0 and row[5] > 0 for row in rows.values()), rows
    assert "ALERT metadata-endpoint attempt: research-bot@host-a" in out
    assert '"result": "ECONNABORTED"' in out
    assert not list_netns(f"{name}-") and not Topology(name).run_dir.exists()


def test_lab_down_removes_everything_after_a_sigkilled_up() -> None:
    topo = Topology(f"zk{os.getpid():x}")
    lab = Lab(topo)
    up = subprocess.Popen([sys.executable, "-m", "ztnet.cli", "lab", "up", "--name", topo.name],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # kill it mid-way: the controller serves and the daemons are starting (not yet ready)
        def daemons_started() -> bool | None:
            names = [r.name for r in lab.records()]
            return True if sum(n.startswith("daemon") for n in names) == 2 else None

        poll_until(daemons_started, 60.0, "lab up to start the daemons")
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    records = lab.records()
    assert list_netns(f"{topo.name}-") and any(alive(r) for r in records)
    done = ztnet("lab", "down", "--name", topo.name)
    assert done.returncode == 0, done.stderr
    assert not list_netns(f"{topo.name}-")
    assert not topo.run_dir.exists()
    assert not any(alive(r) for r in records)
    mount = find_cgroup2_mount()
    for host in topo.agent_hosts_list:
        instance = Instance.resolve(topo.instance_name(host), mount)
        assert not instance.cgroup_root.exists() and not instance.bpffs_dir.exists()
    assert not [p for p in Path("/sys/fs/bpf").glob(f"ztnet-{topo.name}-*")]
    again = ztnet("lab", "down", "--name", topo.name)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    json.loads(ztnet("lab", "status", "--name", topo.name, "--json").stdout)
