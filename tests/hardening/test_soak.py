"""The controller under load (issue 10, "Faults to survive"): 200 concurrent daemon streams
and an admin apply every second for a minute. Every stream acks what it is pushed, the way
a daemon does; at the end every host holds the latest version (none left behind) and the
controller's memory stopped growing.

Long: runs in `make test-hardening` only (HARDENING_SOAK=1). HARDENING_SOAK_HOSTS and
HARDENING_SOAK_SECONDS change the size (defaults 200 and 60).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ztnet.testing.controller import ControllerProcess, init_controller, policy_toml
from ztnet.testing.nodes import HostIdentity, enroll
from ztnet.v1 import node_pb2, node_pb2_grpc

HOSTS = int(os.environ.get("HARDENING_SOAK_HOSTS", "200"))
SECONDS = int(os.environ.get("HARDENING_SOAK_SECONDS", "60"))
pytestmark = [pytest.mark.fault, pytest.mark.soak,
              pytest.mark.skipif(os.environ.get("HARDENING_SOAK") != "1",
                                 reason="the soak runs in make test-hardening (HARDENING_SOAK=1)")]


class AckingNode:
    """One host's grant stream: subscribe, then ack every push at once (as a daemon)."""

    def __init__(self, controller: ControllerProcess, identity: HostIdentity) -> None:
        self.host = identity.host
        self.latest = 0
        self.pushes = 0
        self.error: grpc.RpcError | None = None
        self._out: queue.Queue[node_pb2.GrantStreamRequest | None] = queue.Queue()
        self._out.put(node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
            host=identity.host, version_held=0)))
        self._channel = controller.channel(key_pem=identity.key_pem,
                                           cert_pem=identity.cert_pem)
        self._call = node_pb2_grpc.NodeServiceStub(self._channel).StreamGrants(self._requests())
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[node_pb2.GrantStreamRequest]:
        while (request := self._out.get()) is not None:
            yield request

    def _run(self) -> None:
        try:
            for push in self._call:
                self._out.put(node_pb2.GrantStreamRequest(ack=node_pb2.Ack(
                    version=push.version, nonce=push.nonce)))
                with self._changed:
                    self.pushes += 1
                    self.latest = max(self.latest, push.version)
                    self._changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self.error = exc

    def wait_for(self, version: int, deadline: float) -> bool:
        with self._changed:
            while self.latest < version and self.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return self.latest >= version

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self._channel.close()
        self._thread.join(timeout=5)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200_streams_and_an_apply_every_second_all_converge(tmp_path: Path) -> None:
    state = init_controller(tmp_path / "ctl")
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_toml({"bot": [("10.0.0.1", "1000")]}))
    with ControllerProcess(state, policy=policy) as controller:
        identities = [enroll(controller, f"soak-{i:03d}") for i in range(HOSTS)]
        nodes = [AckingNode(controller, identity) for identity in identities]
        try:
            deadline = time.monotonic() + 60
            assert all(node.wait_for(1, deadline) for node in nodes), "not all subscribed"
            samples: list[int] = []
            latest = 0
            with controller.admin() as admin:
                started = time.monotonic()
                for second in range(SECONDS):
                    response = admin.apply_policy(policy_toml(
                        {"bot": [("10.0.0.1", str(1001 + second))]}))
                    latest = max(latest, response.version)
                    samples.append(rss_kib(controller.pid))
                    # pace the applies at one a second (pacing, not synchronisation)
                    time.sleep(max(0.0, started + second + 1 - time.monotonic()))
                deadline = time.monotonic() + 60
                behind = [n.host for n in nodes if not n.wait_for(latest, deadline)]
                assert not behind, f"{len(behind)} hosts left behind: {behind[:5]}"
                errors = [(n.host, n.error) for n in nodes if n.error is not None]
                assert not errors, errors[:3]
                hosts = {h.name: h for h in admin.list_hosts().hosts}
                stale = [name for name, h in hosts.items() if h.applied_version != latest]
                assert not stale, f"the controller sees {len(stale)} hosts behind: {stale[:5]}"
            # memory bounded: the last tenth grew little over the second tenth
            tenth = max(1, len(samples) // 10)
            early, late = max(samples[tenth:2 * tenth]), max(samples[-tenth:])
            print(f"soak: {HOSTS} streams, {SECONDS} applies up to version {latest}; "
                  f"controller RSS {samples[0] // 1024} -> {late // 1024} MiB; pushes "
                  f"{sum(n.pushes for n in nodes)}")
            assert late - early < 64 * 1024, f"controller RSS grew {early} -> {late} KiB"
        finally:
            for node in nodes:
                node.close()
        assert "Traceback" not in controller.log()
