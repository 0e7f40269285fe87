"""The daemon and the quarantine flag, against the real kernel: a signed bundle naming the
agent quarantined denies it everything and cuts its established connection; the flag stays
set while no daemon runs (fail closed), is put back by a restarted daemon from its persisted
bundle and by a resync after someone cleared it; a bundle without the quarantine restores
the grants."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztnet.datapath.datapath import Datapath
from ztnet.grants.keys import generate_keypair, load_private_key
from ztnet.grants.payload import Quarantine
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.daemon import BundleFileHost, bundle_applied

pytestmark = pytest.mark.kernel

PORT = 8080
BOT = (Quarantine("bot"),)


@pytest.fixture
def host(instance: Instance, tmp_path: Path) -> Iterator[BundleFileHost]:
    key_path, pub = generate_keypair(tmp_path / "keys")
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4], tcp=[PORT]):
        setup = BundleFileHost(instance, pair, load_private_key(key_path), pub,
                               tmp_path / "bundle.json", tmp_path / "state")
        setup.publish(1, [PORT])
        yield setup


def flagged(instance: Instance) -> set[str]:
    with Datapath.inspect(instance) as datapath:
        return datapath.quarantined()


def test_a_quarantine_bundle_denies_everything_survives_restarts_and_lifts(
        host: BundleFileHost) -> None:
    with host.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        assert host.attempt(PORT) == "OK"
        host.publish(2, [PORT], quarantine=BOT)
        daemon.wait_event(bundle_applied(2))
        assert flagged(host.instance) == {"bot"}
        assert host.attempt(PORT) == "EPERM"
        assert daemon.stop() == 0
    assert host.attempt(PORT) == "EPERM"  # no daemon: the kernel keeps the flag
    with Datapath.inspect(host.instance) as datapath:
        datapath.set_quarantined("bot", False)  # someone clears it behind ztnet's back
    with host.daemon() as daemon:
        daemon.wait_event(bundle_applied(2))  # the persisted bundle, re-verified
        assert flagged(host.instance) == {"bot"}
        with Datapath.inspect(host.instance) as datapath:
            datapath.set_quarantined("bot", False)
        mark = daemon.mark()
        daemon.signal(signal.SIGHUP)  # a resync now
        daemon.wait_event(lambda e: e.get("event") == "quarantine drift repaired", start=mark)
        assert flagged(host.instance) == {"bot"}
        host.publish(3, [PORT])
        daemon.wait_event(bundle_applied(3))
        assert flagged(host.instance) == set()
        assert host.attempt(PORT) == "OK"


def test_an_established_connection_is_cut_by_the_quarantine(host: BundleFileHost) -> None:
    with host.daemon() as daemon:
        daemon.wait_event(bundle_applied(1))
        holder = LineProcess.start(agent_argv(host.instance, "bot", traffic_argv(
            "hold", host.pair.b.ipv4, str(PORT), "--interval", "0.05", "--limit", "30"),
            netns=host.pair.a.netns, user="nobody"))
        try:
            assert holder.read()["event"] == "connected"
            host.publish(2, [PORT], quarantine=BOT)
            daemon.wait_event(bundle_applied(2))
            broken = holder.read()
            assert (broken["event"], broken["result"]) == ("broken", "ECONNABORTED"), broken
        finally:
            holder.kill()
