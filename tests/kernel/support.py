"""Helpers for the kernel tests: test instances, agents, the driver process."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ztnet.grants.model import Grant, PortRange, Proto
from ztnet.instance import Instance, find_cgroup2_mount
from ztnet.lab.netns import nsenter_argv

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


def agent_argv(instance: Instance, agent: str, argv: Sequence[str], *,
               netns: str | None = None, user: str | None = None) -> list[str]:
    """``argv`` run as ``agent`` through `ztnet run`, optionally in a namespace."""
    run = [sys.executable, "-m", "ztnet.cli", "run", "--instance", instance.name,
           "--agent", agent]
    if user:
        run += ["--user", user]
    full = [*run, "--", *argv]
    return nsenter_argv(netns, full) if netns else full


def allow_ping_sockets(netns: str) -> None:
    """ICMP (ping) sockets are refused to every group by default in a new
    namespace; the probes use them to send echo requests without raw sockets."""
    subprocess.run(nsenter_argv(netns, ["sysctl", "-q", "-w",
                                        "net.ipv4.ping_group_range=0 2147483647"]), check=True)


def probe_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztnet.lab.probe", *args]


def run_probe(instance: Instance, agent: str, args: Sequence[str], *, netns: str | None = None,
              user: str | None = None, timeout: float = 30.0) -> dict[str, object]:
    """Run one probe as the agent and return its (last) JSON result."""
    proc = subprocess.run(agent_argv(instance, agent, probe_argv(*args), netns=netns, user=user),
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"probe failed ({proc.returncode}): {proc.stderr}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


@dataclass
class LineProcess:
    """A subprocess spoken to in JSON lines (the driver, long-lived probes)."""

    proc: subprocess.Popen[str]
    ready: dict[str, object] | None = None

    @classmethod
    def start(cls, argv: Sequence[str]) -> LineProcess:
        return cls(subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, bufsize=1))

    def request(self, message: object) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"process ended early: {stderr}")
        result: dict[str, object] = json.loads(line)
        return result

    def read_ids(self) -> list[int]:
        """The program ids a freshly started driver reported."""
        return sorted(int(v) for v in self.ready["prog_ids"].values())  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_driver(instance: Instance) -> LineProcess:
    """A separate process that drives the datapath API and can be SIGKILLed."""
    driver = LineProcess.start([sys.executable, "-m", "tests.kernel.driver", instance.name])
    driver.ready = driver.read()
    assert driver.ready.get("ok"), driver.ready
    return driver
