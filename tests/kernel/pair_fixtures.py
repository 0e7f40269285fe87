"""Fixtures shared by the enforcement and hostile-agent tests: a veth pair (agent side a,
peer side b) with an echo server on b, and the datapath of the test's instance.
tests/kernel/conftest.py offers them to every kernel test module; a module that defines its
own keeps its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ztnet.datapath.datapath import Datapath
from ztnet.instance import Instance
from ztnet.lab.netns import NetnsPair
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import allow_ping_sockets

ALLOWED, DENIED, CONTROL = 8080, 9090, 7070
AGENT = "bot"


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with NetnsPair() as topology:
        allow_ping_sockets(topology.a.netns)
        yield topology


@pytest.fixture
def server(pair: NetnsPair) -> Iterator[ServerProcess]:
    with ServerProcess(pair.b.netns, bind=[pair.b.ipv4, pair.b.ipv6],
                       tcp=[ALLOWED, DENIED, CONTROL], udp=[ALLOWED, DENIED, CONTROL]) as srv:
        yield srv


@pytest.fixture
def datapath(instance: Instance) -> Iterator[Datapath]:
    with Datapath.open(instance) as dp:
        yield dp
