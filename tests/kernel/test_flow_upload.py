"""Flow records reach the controller, every one exactly once, through a controller outage
and daemon restarts: a real `ztnet controller serve`, a host enrolled with `ztnet enroll`, a
real `ztnet daemon --controller` enforcing with the kernel, and an agent in a network
namespace making allowed and denied connections.

The reference is the daemon's own flow log (flows.jsonl): what the controller holds, read
back through the admin API's QueryFlows, must be exactly its records, by uuid, none
missing and none twice.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening import figures
from tests.kernel.test_controller_e2e import enroll_with_cli, event
from ztnet.daemon.spool import SPOOL_DIR
from ztnet.instance import FLOWS_FILE, Instance
from ztnet.lab.netns import NetnsPair, poll_until
from ztnet.lab.servers import ServerProcess
from ztnet.testing.agents import LineProcess, agent_argv, traffic_argv
from ztnet.testing.controller import ControllerProcess, init_controller, policy_toml
from ztnet.testing.daemon import HOST, DaemonProcess
from ztnet.testing.ports import free_port

ALLOWED, DENIED = 8080, 9090
AGENT = "bot"
DEADLINE = 20.0


@dataclass
class Lab:
    instance: Instance
    pair: NetnsPair
    state: Path
    controller: ControllerProcess
    agent: LineProcess | None = None

    def start_agent(self) -> None:
        """One long-lived agent process (`ztnet run` needs the datapath loaded)."""
        self.agent = LineProcess.start(agent_argv(self.instance, AGENT, traffic_argv("batch"),
                                                  netns=self.pair.a.netns, user="nobody"))

    def attempts(self, allowed: int, denied: int) -> int:
        """Non-blocking connects by the agent; returns how many records they make (an
        allowed connect makes two: the verdict and the flow's end when it is closed)."""
        assert self.agent is not None
        for port, count, outcome in ((ALLOWED, allowed, "EINPROGRESS"),
                                     (DENIED, denied, "EPERM")):
            for _ in range(count):
                result = self.agent.request(["tcp", self.pair.b.ipv4, port])
                assert result["result"] == outcome, result
        return 2 * allowed + denied

    def local(self) -> list[str]:
        """uuids of the records in the daemon's flow log, in order."""
        path = self.state / FLOWS_FILE
        text = path.read_text() if path.exists() else ""
        # the piece after the last newline is empty, or a line the daemon is still writing
        return [json.loads(line)["uuid"] for line in text.split("\n")[:-1] if line.strip()]

    def logged(self, count: int) -> list[str]:
        return poll_until(lambda: uuids if len(uuids := self.local()) >= count else None,
                          DEADLINE, f"{count} records in the flow log")

    def spooled(self) -> set[str]:
        """uuids in the spool's batch files (read directly: the daemon may be writing)."""
        uuids = set()
        for path in (self.state / SPOOL_DIR).glob("*.jsonl"):
            uuids |= {json.loads(line)["uuid"] for line in path.read_text().splitlines()}
        return uuids

    def wait_spooled(self, uuids: list[str]) -> None:
        poll_until(lambda: True if set(uuids) <= self.spooled() else None, DEADLINE,
                   "the records in the spool")

    def stored(self) -> list[str]:
        with self.controller.admin() as admin:
            response = admin.query_flows(host=HOST, limit=10_000)
        assert not response.truncated
        return [json.loads(record)["uuid"] for record in response.records]

    def wait_stored(self, expected: list[str]) -> list[str]:
        return poll_until(lambda: stored if len(stored := self.stored()) >= len(expected)
                          else None, DEADLINE, f"{len(expected)} records at the controller")


@pytest.fixture
def lab(instance: Instance, tmp_path: Path) -> Iterator[Lab]:
    with NetnsPair() as pair, ServerProcess(pair.b.netns, bind=[pair.b.ipv4],
                                            tcp=[ALLOWED, DENIED]):
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_toml({AGENT: [(f"{pair.b.ipv4}/32", str(ALLOWED))]}))
        # a fixed port: the controller must come back on the address the daemon dials
        controller = ControllerProcess(init_controller(tmp_path / "ctl"), policy=policy,
                                       extra_args=["--listen", f"127.0.0.1:{free_port()}"])
        with controller:
            lab = Lab(instance, pair, tmp_path / "state", controller)
            try:
                yield lab
            finally:
                if lab.agent is not None:
                    lab.agent.kill()


def daemon(lab: Lab) -> DaemonProcess:
    return DaemonProcess(lab.instance, None, None, lab.state,
                         controller=lab.controller.address)


@pytest.mark.fault  # issue 10: the controller away, flows spooled meanwhile arrive once
def test_every_record_reaches_the_controller_once_through_outages_and_restarts(
        lab: Lab) -> None:
    enrolled = enroll_with_cli(lab.controller, lab.state)
    assert enrolled.returncode == 0, enrolled.stderr
    with daemon(lab) as first:
        first.wait_event(event("bundle applied"))
        first.wait_event(event("flow upload connected"))
        lab.start_agent()
        # 1. the controller is up: N records arrive
        expected = lab.logged(lab.attempts(allowed=15, denied=10))
        assert sorted(lab.wait_stored(expected)) == sorted(expected)

        # 2. the controller dies; M more records are spooled meanwhile
        mark = first.mark()
        lab.controller.stop(signal.SIGKILL)
        first.wait_event(event("flow upload disconnected"), start=mark)
        expected = lab.logged(len(expected) + lab.attempts(allowed=10, denied=10))
        # stopped at once: what is still queued or in the open batch is spooled at exit
        assert first.stop() == 0
    assert set(expected[-30:]) <= lab.spooled()

    with daemon(lab) as second:
        # 3. a restarted daemon keeps spooling; then it crashes (SIGKILL)
        expected = lab.logged(len(expected) + lab.attempts(allowed=10, denied=10))
        lab.wait_spooled(expected[-30:])
        second.kill()

    with daemon(lab) as third:
        # 4. the controller comes back: everything arrives, nothing twice
        mark = third.mark()
        lab.controller.start()
        third.wait_event(event("flow upload connected"), start=mark)
        stored = lab.wait_stored(expected)
        assert len(stored) == len(set(stored)), "a record was stored twice"
        assert len(lab.local()) == len(expected) == 40 + 30 + 30
        assert sorted(stored) == sorted(lab.local())
        figures.records(lost=len(set(lab.local()) - set(stored)))
        poll_until(lambda: True if not lab.spooled() else None, DEADLINE, "an empty spool")
