"""Agent processes: a command run as an agent through `ztnet run` (optionally in a network
namespace), the traffic agent (ztnet.lab.traffic) run that way, and processes spoken to in
JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ztnet.identity.launch import DYNAMIC_USER, run_user_flags
from ztnet.instance import Instance
from ztnet.lab.netns import nsenter_argv
from ztnet.lab.procs import ztnet_argv


def agent_argv(instance: Instance, agent: str, argv: Sequence[str], *,
               netns: str | None = None, user: str | None = None) -> list[str]:
    """``argv`` run as ``agent`` through `ztnet run`, optionally in a namespace.

    ``user``: None runs a root agent (``--allow-root``); ``"nobody"``, what the tests say
    for "an unprivileged agent", runs it as a dynamic uid of its own (``--dynamic-user``),
    since `ztnet run` refuses a uid that another agent holds and parallel test sessions
    would otherwise all share nobody's; any other name is passed as ``--user NAME``."""
    run = ztnet_argv("run", "--instance", instance.name, "--agent", agent,
                     *run_user_flags(DYNAMIC_USER if user == "nobody" else user))
    full = [*run, "--", *argv]
    return nsenter_argv(netns, full) if netns else full


def allow_ping_sockets(netns: str) -> None:
    """ICMP (ping) sockets are refused to every group by default in a new
    namespace; the traffic agent uses them to send echo requests without raw sockets."""
    subprocess.run(nsenter_argv(netns, ["sysctl", "-q", "-w",
                                        "net.ipv4.ping_group_range=0 2147483647"]), check=True)


def traffic_argv(*args: str) -> list[str]:
    """The traffic agent with ``args`` (e.g. ``"tcp", HOST, PORT``)."""
    return [sys.executable, "-m", "ztnet.lab.traffic", *args]


def run_traffic(instance: Instance, agent: str, args: Sequence[str], *,
                netns: str | None = None, user: str | None = None,
                timeout: float = 30.0) -> dict[str, object]:
    """Run the traffic agent once as ``agent`` and return its (last) JSON result."""
    proc = subprocess.run(agent_argv(instance, agent, traffic_argv(*args), netns=netns,
                                     user=user),
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, \
        f"traffic agent failed ({proc.returncode}): {proc.stderr}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


@dataclass
class LineProcess:
    """A subprocess spoken to in JSON lines (a datapath driver, long-lived traffic agents)."""

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
        prog_ids = (self.ready or {}).get("prog_ids")
        assert isinstance(prog_ids, dict), f"no program ids in {self.ready}"
        return sorted(int(v) for v in prog_ids.values())

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
