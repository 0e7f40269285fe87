"""Helpers for the kernel tests: test instances, grants, the driver process. Agent processes
(agent_argv, run_traffic, LineProcess, ...) are in ztnet.testing.agents."""

from __future__ import annotations

import ipaddress
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.instance import Instance, find_cgroup2_mount
from ztnet.testing.agents import LineProcess

TEST_INSTANCE_PREFIX = "t-"
_counter = itertools.count(1)


def new_instance() -> Instance:
    return Instance.resolve(f"{TEST_INSTANCE_PREFIX}{os.getpid()}-{next(_counter)}")


def stale_test_instances() -> Iterator[Instance]:
    """Instances a crashed earlier run left behind (cgroups or pins); names
    carry the pid of the session that made them."""
    mount = find_cgroup2_mount()
    names = {p.name for p in mount.glob(f"ztnet-{TEST_INSTANCE_PREFIX}*")}
    names |= {p.name for p in Path("/sys/fs/bpf").glob(f"ztnet-{TEST_INSTANCE_PREFIX}*")}
    for name in sorted(names):
        instance_name = name.removeprefix("ztnet-")
        owner = instance_name.removeprefix(TEST_INSTANCE_PREFIX).split("-")[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue  # a test session that is still running owns it
        yield Instance.resolve(instance_name, mount)


def grant(grant_id: int, agent: str, proto: Proto, to: str, ports: str = "any",
          ttl: float = 3600.0, start: float = -60.0) -> Grant:
    now = time.time()
    return Grant(grant_id, agent, proto, ipaddress.ip_network(to), PortRange.parse(ports),
                 now + start, now + ttl)


def grant_to_json(g: Grant) -> dict[str, object]:
    return {"id": g.grant_id, "agent": g.agent, "proto": int(g.proto), "to": str(g.network),
            "ports": str(g.ports) if g.ports else "any", "not_before": g.not_before,
            "not_after": g.not_after}


def grant_from_json(record: dict[str, object]) -> Grant:
    return Grant(int(record["id"]), str(record["agent"]), Proto(record["proto"]),  # type: ignore[call-overload]
                 ipaddress.ip_network(str(record["to"])), PortRange.parse(str(record["ports"])),
                 float(record["not_before"]), float(record["not_after"]))  # type: ignore[arg-type]


def start_driver(instance: Instance, *, fresh: bool = False) -> LineProcess:
    """A separate process that drives the datapath API and can be SIGKILLed
    (``fresh``: with programs of its own, not the pinned ones)."""
    driver = LineProcess.start([sys.executable, "-m", "tests.kernel.driver", instance.name,
                                *(["--fresh"] if fresh else [])])
    driver.ready = driver.read()
    assert driver.ready.get("ok"), driver.ready
    return driver
