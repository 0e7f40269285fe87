"""Enforcement outlives whoever loaded it, expiry needs no user space, and
adoption by a new process never opens a gap."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.kernel.support import grant, grant_to_json, start_driver
from ztnet.datapath import loader
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Proto
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.lab.sniff import Sniffer
from ztnet.testing.agents import LineProcess, agent_argv, run_traffic, traffic_argv

ALLOWED, DENIED = 8080, 9090
AGENT = "bot"


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with NetnsPair() as topology:
        yield topology


@pytest.fixture
def server(pair: NetnsPair) -> Iterator[ServerProcess]:
    with ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[ALLOWED, DENIED]) as srv:
        yield srv


def test_sigkill_of_the_loader_leaves_enforcement_in_place(
        instance: Instance, pair: NetnsPair, server: ServerProcess) -> None:
    driver = start_driver(instance)
    try:
        reply = driver.request({"op": "replace", "grants": [grant_to_json(
            grant(1, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED)))]})
        assert reply["ok"]
    finally:
        driver.kill()
    assert driver.proc.returncode == -9
    assert loader.is_enforcing(instance)
    assert run_traffic(instance, AGENT, ["tcp", pair.b.ipv4, str(ALLOWED)], netns=pair.a.netns,
                       user="nobody")["result"] == "OK"
    assert run_traffic(instance, AGENT, ["tcp", pair.b.ipv4, str(DENIED)], netns=pair.a.netns,
                       user="nobody")["result"] == "EPERM"


def test_expiry_stops_new_and_established_flows_with_the_loader_dead(
        instance: Instance, pair: NetnsPair, server: ServerProcess) -> None:
    driver = start_driver(instance)
    try:
        driver.request({"op": "replace", "grants": [grant_to_json(
            grant(2, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED), ttl=4.0, start=-1))]})
    finally:
        driver.kill()
    holder = LineProcess.start(agent_argv(instance, AGENT, traffic_argv(
        "hold", pair.b.ipv4, str(ALLOWED), "--interval", "0.05", "--limit", "30"),
        netns=pair.a.netns, user="nobody"))
    try:
        assert holder.read()["event"] == "connected"
        broken = holder.read()  # returns when the established flow stops
        assert broken["event"] == "broken"
        assert int(broken["sent"]) > 0  # it did flow before the expiry
        assert broken["result"] in ("TIMEOUT", "EPERM", "ECONNABORTED", "ECONNRESET")
    finally:
        holder.kill()
    assert run_traffic(instance, AGENT, ["tcp", pair.b.ipv4, str(ALLOWED)], netns=pair.a.netns,
                       user="nobody")["result"] == "EPERM"


def test_removing_a_grant_cuts_its_established_flow(
        instance: Instance, pair: NetnsPair, server: ServerProcess) -> None:
    with Datapath.open(instance) as datapath:
        datapath.install_unverified([grant(3, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
        holder = LineProcess.start(agent_argv(instance, AGENT, traffic_argv(
            "hold", pair.b.ipv4, str(ALLOWED), "--interval", "0.05", "--limit", "30",
            "--timeout", "10"), netns=pair.a.netns, user="nobody"))
        try:
            assert holder.read()["event"] == "connected"
            datapath.install_unverified([])  # grant 3 removed
            cut = datapath.cut_unauthorized()
            assert [(f.agent, f.remote[1]) for f in cut] == [(AGENT, ALLOWED)]
            broken = holder.read()
            assert broken["event"] == "broken"
            assert broken["result"] == "ECONNABORTED"  # told at once, not left hanging
        finally:
            holder.kill()


def test_adoption_under_a_tight_denied_connect_loop_lets_nothing_through(
        instance: Instance, pair: NetnsPair, server: ServerProcess) -> None:
    first = start_driver(instance)
    first.request({"op": "replace", "grants": [grant_to_json(
        grant(4, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED)))]})
    with Sniffer(pair.b.netns, pair.b.iface, "tcp") as sniffer:
        looper = LineProcess.start(agent_argv(instance, AGENT, traffic_argv(
            "loop", pair.b.ipv4, str(DENIED)),
            netns=pair.a.netns, user="nobody"))
        try:
            assert looper.read()["event"] == "started"
            previous = first
            adopted_ids = set()
            for _ in range(3):  # each new loader adopts the last one's state, then it dies
                successor = start_driver(instance, fresh=True)
                previous.kill()
                adopted_ids.add(tuple(successor.read_ids()))
                previous = successor
            looper.proc.send_signal(signal.SIGUSR1)
            done = looper.read()
        finally:
            looper.kill()
            previous.kill()
        assert run_traffic(instance, AGENT, ["tcp", pair.b.ipv4, str(ALLOWED)],
                           netns=pair.a.netns, user="nobody")["result"] == "OK"
        sniffer.wait_for(lambda p: p.dport == ALLOWED and p.is_syn)
    packets = sniffer.stop()
    outcomes = done["outcomes"]
    assert set(outcomes) == {"EPERM"} and outcomes["EPERM"] > 100, outcomes
    assert not [p for p in packets if p.dport == DENIED]
    assert len(adopted_ids) == 3  # three different program generations really took over
    counts = loader.attached_counts(instance)
    assert set(counts.values()) == {1}, counts  # the old programs were detached


def test_a_second_open_adopts_pinned_state_without_reinstalling(instance: Instance) -> None:
    with Datapath.open(instance) as first:
        first.install_unverified([grant(5, AGENT, Proto.UDP, "10.9.0.0/16", "53")])
        generation = first.generation
    started = time.monotonic()
    with Datapath.open(instance) as second:
        assert second.generation == generation
        # read from the kernel: no file on the side says what is installed
        assert second.live_grant_ids() == {AGENT: {5}}
        assert second.live_grant_counts() == {AGENT: 1}
    assert time.monotonic() - started < 60


def test_teardown_kills_agents_and_removes_everything(instance: Instance) -> None:
    with Datapath.open(instance) as datapath:
        datapath.install_unverified([grant(6, AGENT, Proto.TCP, "10.9.0.0/16", "53")])
    sleeper = subprocess.Popen(agent_argv(instance, AGENT, ["sleep", "600"]))
    from ztnet.identity import cgroups
    from ztnet.lab.netns import poll_until

    poll_until(lambda: cgroups.pids(instance.agent_cgroup(AGENT)) or None, 10, "agent start")
    from ztnet.datapath.datapath import teardown

    teardown(instance)
    assert sleeper.wait(timeout=10) == -9
    assert not instance.cgroup_root.exists()
    assert not instance.bpffs_dir.exists()
