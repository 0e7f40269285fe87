"""`ztnet lab up --replicas 2 --database postgres`: two controller replicas over a real
PostgreSQL in the controller's namespace, every daemon following both. The replica the
hosts follow is killed: they carry on enforcing, move to the other, and a revocation made
through it reaches them."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.conftest import skip_without_postgres
from tests.kernel.conftest import require_bpf, require_tools
from ztnet.lab import replicas
from ztnet.lab.cluster import Lab, orphan_labs
from ztnet.lab.policy import RESEARCH_BOT
from ztnet.lab.procs import json_event, wait_log
from ztnet.lab.topology import API_PORT, Topology

PREFIX = "zr"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_bpf()
    require_tools("nsenter", "sysctl", "setpriv")
    skip_without_postgres()
    for name in orphan_labs(PREFIX):
        Lab(Topology(name)).down()
    the_lab = Lab(Topology(f"{PREFIX}{os.getpid():x}"), replicas=2, database="postgres")
    try:
        assert the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


def test_hosts_carry_on_when_their_replica_is_killed(lab: Lab) -> None:
    topo = lab.topology
    host = topo.host("host-a")
    api = topo.host("api")
    to_api = [{"kind": "tcp", "host": api.ipv4, "port": API_PORT, "payload": "hi"}]
    assert lab.run_attempts(host, RESEARCH_BOT, to_api)[0]["result"] == "OK"
    first, second = (replicas.listen_addresses(topo, i)[0] for i in (0, 1))
    records = {record.name: record for record in lab.records()}
    daemon = records["daemon host-a"]
    wait_log(daemon, json_event("controller connected", controller=first), 30, "replica 0")
    os.kill(records["controller"].pid, signal.SIGKILL)
    wait_log(daemon, json_event("controller connected", controller=second), 30, "replica 1")
    assert lab.run_attempts(host, RESEARCH_BOT, to_api)[0]["result"] == "OK"
    revoked = lab.operator("revoke", "--agent", RESEARCH_BOT, replica=1)
    assert revoked.returncode == 0, revoked.stderr
    assert "host-a  ack" in revoked.stdout, revoked.stdout
    assert lab.run_attempts(host, RESEARCH_BOT, to_api)[0]["result"] == "EPERM"
    hosts = lab.operator("hosts", replica=1)
    assert hosts.returncode == 0 and "host-a" in hosts.stdout and "host-b" in hosts.stdout
