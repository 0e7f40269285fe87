"""Issue 11: a socket's stamped verdict (struct zt_stamp) lets its packets skip the grant trie,
and never outlives what it stood for: a new grant set without the grant, a quarantine, or the
entry's expiry cut the established flow on its very next packet (no socket destroyed here, so
only the egress program can have stopped it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kernel.support import grant
from ztnet.datapath.datapath import Datapath
from ztnet.grants.model import Proto
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair, poll_until
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv

ALLOWED = 8080
AGENT = "bot"


@pytest.fixture
def setup(instance: Instance) -> Iterator[tuple[Datapath, NetnsPair]]:
    with NetnsPair() as pair, Datapath.open(instance) as datapath, \
            ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[ALLOWED]):
        yield datapath, pair


def hold(datapath: Datapath, pair: NetnsPair) -> LineProcess:
    holder = LineProcess.start(agent_argv(datapath.instance, AGENT, traffic_argv(
        "hold", pair.b.ipv4, str(ALLOWED), "--interval", "0.02", "--limit", "30",
        "--timeout", "1"), netns=pair.a.netns, user="nobody"))
    assert holder.read()["event"] == "connected"
    return holder


def stamped_packets(datapath: Datapath) -> int:
    counters = datapath.counters()
    return counters["egress_pass"] - counters["egress_judged"]


def wait_stamped(datapath: Datapath) -> None:
    """The holder's echo traffic passes on its socket's stamp (the fast path is in use)."""
    before = stamped_packets(datapath)
    poll_until(lambda: stamped_packets(datapath) >= before + 10 or None, 10.0,
               "packets passed on a stamp")


@pytest.mark.parametrize("change", ["revoke", "quarantine"])
def test_a_stamped_flow_is_cut_by_a_change_on_its_next_packet(
        setup: tuple[Datapath, NetnsPair], change: str) -> None:
    datapath, pair = setup
    datapath.install_unverified([grant(1, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED))])
    holder = hold(datapath, pair)
    try:
        wait_stamped(datapath)
        if change == "revoke":
            datapath.install_unverified([grant(2, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", "1")])
        else:
            datapath.set_quarantined(AGENT, True)
        broken = holder.read()
        assert broken["event"] == "broken" and broken["result"] == "TIMEOUT", broken
        reason = "NO_GRANT" if change == "revoke" else "QUARANTINED"
        assert datapath.agent_drops()[AGENT][reason] >= 1
    finally:
        holder.kill()


def test_a_stamp_lapses_with_the_grant_it_stands_for(setup: tuple[Datapath, NetnsPair]) -> None:
    datapath, pair = setup
    datapath.install_unverified([grant(3, AGENT, Proto.TCP, f"{pair.b.ipv4}/32", str(ALLOWED),
                                       ttl=3.0, start=-1)])
    holder = hold(datapath, pair)
    try:
        wait_stamped(datapath)
        broken = holder.read()  # nothing is written to the maps: the clock alone ends it
        assert broken["event"] == "broken" and broken["result"] == "TIMEOUT", broken
        assert int(broken["sent"]) > 10
        assert datapath.agent_drops()[AGENT]["NO_GRANT"] >= 1
    finally:
        holder.kill()
