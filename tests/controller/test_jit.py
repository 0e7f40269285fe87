"""Just-in-time grants against a real controller process, with hosts on the real grant
stream: what each host's signed bundle carries, the auto-approve rules, the operator's
decisions, the audit trail, and what a host may not do."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from ztnet.controller.admin_client import AdminClient
from ztnet.errors import ControllerError
from ztnet.grants.bundle import VerifiedBundle
from ztnet.grants.model import format_grant_id
from ztnet.observe.audit import verify
from ztnet.testing.controller import (
    TRUST_DOMAIN,
    ControllerProcess,
    ControllerState,
    create_token,
    init_controller,
)
from ztnet.testing.nodes import FakeNode, HostIdentity, Push, enroll
from ztnet.v1 import node_pb2, node_pb2_grpc

T = TypeVar("T")

POLICY = f"""trust_domain = "{TRUST_DOMAIN}"
[agents.bot]
[[agents.bot.allow]]
to = "10.0.0.1"
ports = "443"

[agents.trainer]
hosts = {{ role = "gpu" }}

[jit]
max_ttl = "30m"

[[jit.auto_approve]]
agents = ["bot"]
to = "203.0.113.0/28"
ports = "443"
max_ttl = "5m"
"""


def in_background(call: Callable[[], T]) -> Future[T]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def jit_paths(bundle: VerifiedBundle) -> dict[str, tuple[str, str, str, float]]:
    """Grants that are not the policy's: id → (agent, destination, ports, lifetime)."""
    return {format_grant_id(g.grant_id): (g.agent, str(g.network), str(g.ports),
                                         round(g.not_after - g.not_before, 3))
            for g in bundle.grants if str(g.network) != "10.0.0.1/32"}


class Host:
    def __init__(self, controller: ControllerProcess, identity: HostIdentity) -> None:
        self.identity = identity
        self.node = FakeNode(controller, identity)
        self.channel = controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem)
        self.stub = node_pb2_grpc.NodeServiceStub(self.channel)
        self.last: Push | None = None

    def take(self) -> dict[str, tuple[str, str, str, float]]:
        """The next push, acknowledged: its JIT grants."""
        push = self.last = self.node.next_push()
        bundle = self.node.verify(push)
        self.node.ack(push)
        return jit_paths(bundle)

    def ask(self, agent: str, to: str, ports: str, ttl: float,
            reason: str = "TICKET-7") -> node_pb2.RequestGrantResponse:
        response: node_pb2.RequestGrantResponse = self.stub.RequestGrant(
            node_pb2.RequestGrantRequest(agent=agent, to=to, ports=ports, ttl_seconds=ttl,
                                         reason=reason), timeout=10)
        return response

    def close(self) -> None:
        self.node.close()
        self.channel.close()


@pytest.fixture
def state(tmp_path: Path) -> ControllerState:
    return init_controller(tmp_path / "state")


@pytest.fixture
def controller(state: ControllerState, tmp_path: Path) -> Iterator[ControllerProcess]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    with ControllerProcess(state, policy=policy) as process:
        yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def hosts(controller: ControllerProcess) -> Iterator[dict[str, Host]]:
    identities = {
        "web-1": enroll(controller, "web-1"),
        "gpu-1": enroll(controller, "gpu-1", token=create_token(controller.state, "gpu-1",
                                                                labels={"role": "gpu"}))}
    started = {name: Host(controller, identity) for name, identity in identities.items()}
    try:
        for host in started.values():
            assert host.take() == {}
        yield started
    finally:
        for host in started.values():
            host.close()


def issue(admin: AdminClient, nodes: dict[str, Host], expect: set[str], **options: object
          ) -> tuple[str, dict[str, dict[str, tuple[str, str, str, float]]]]:
    """Issue a grant while every host answers its push; what each host was sent."""
    answer = in_background(lambda: admin.issue_grant(**options, wait=10))  # type: ignore[arg-type]
    sent = {name: host.take() for name, host in nodes.items()}
    response = answer.result(timeout=20)
    assert {r.host: r.outcome for r in response.results} == dict.fromkeys(nodes, "ack")
    grant_id = response.grant.grant_id
    assert {name for name, grants in sent.items() if grant_id in grants} == expect
    return grant_id, sent


def test_an_operator_grant_reaches_the_agents_hosts_clamped_listed_and_audited(
        controller: ControllerProcess, hosts: dict[str, Host], state: ControllerState) -> None:
    with controller.admin() as admin:
        first, sent = issue(admin, hosts, {"web-1", "gpu-1"}, agent="bot", to="10.0.0.9",
                            ports="443", ttl=600, reason="TICKET-42")
        assert sent["web-1"][first] == ("bot", "10.0.0.9/32", "443", 600.0)
        # ttl clamped to [jit] max_ttl; the agent's host selector decides where it goes
        clamped, sent = issue(admin, hosts, {"gpu-1"}, agent="trainer", to="10.0.5.0/24",
                              ports="8000-8100", ttl=7200, reason="training run")
        assert sent["gpu-1"][clamped] == ("trainer", "10.0.5.0/24", "8000-8100", 1800.0)
        # the earlier grant is still carried: grants live until their own end
        assert first in sent["gpu-1"] and first in sent["web-1"]
        pinned, _ = issue(admin, hosts, {"web-1"}, agent="bot", to="10.0.0.10", ports="22",
                          ttl=60, reason="ssh for INC-9", hosts=["web-1"])

        listed = {g.grant_id: g for g in admin.list_grants().grants}
        assert set(listed) == {first, clamped, pinned}
        assert (listed[first].reason, listed[first].approver, listed[first].requested_by) == (
            "TICKET-42", "ops", "admin:ops")
        assert list(listed[pinned].hosts) == ["web-1"]

        with pytest.raises(ControllerError, match="INVALID_ARGUMENT: reason: must say why"):
            admin.issue_grant("bot", "10.0.0.9", "443", ttl=60, reason=" ")
        with pytest.raises(ControllerError, match="NOT_FOUND: agent: 'ghost'"):
            admin.issue_grant("ghost", "10.0.0.9", "443", ttl=60, reason="x")
        with pytest.raises(ControllerError, match="INVALID_ARGUMENT: to: .*IP address or pre"):
            admin.issue_grant("bot", "10.0.0.9/8", "443", ttl=60, reason="x")
        with pytest.raises(ControllerError, match="INVALID_ARGUMENT: ttl_seconds"):
            admin.issue_grant("bot", "10.0.0.9", "443", ttl=0, reason="x")
        with pytest.raises(ControllerError, match="NOT_FOUND: hosts: not enrolled: web-9"):
            admin.issue_grant("bot", "10.0.0.9", "443", ttl=60, reason="x", hosts=["web-9"])
    assert all(host.node.no_push_within(0.3) for host in hosts.values())  # refusals push nothing
    records = [json.loads(line) for line in (state.root / "audit.jsonl").read_text().splitlines()]
    issued = [r["fields"] for r in records if r["kind"] == "jit.issued"]
    assert [(f["grant"], f["approver"], f["reason"], f["ttl"]) for f in issued] == [
        (first, "ops", "TICKET-42", 600.0), (clamped, "ops", "training run", 1800.0),
        (pinned, "ops", "ssh for INC-9", 60.0)]
    assert verify(state.root / "audit.jsonl").ok


def test_auto_approve_waiting_approve_and_deny(
        controller: ControllerProcess, hosts: dict[str, Host], state: ControllerState) -> None:
    web = hosts["web-1"]
    # inside a rule: granted at once, for the requesting host only, ttl clamped to the rule's
    auto = in_background(lambda: web.ask("bot", "203.0.113.5", "443", 3600))
    sent = {name: host.take() for name, host in hosts.items()}
    answer = auto.result(timeout=20)
    assert (answer.state, answer.ttl_seconds) == ("approved", 300.0)
    assert "rule 0" in answer.message
    assert sent["web-1"][answer.grant_id] == ("bot", "203.0.113.5/32", "443", 300.0)
    assert answer.grant_id not in sent["gpu-1"]

    # outside every rule (a private address, another port, a wider prefix): waits
    waiting = [web.ask("bot", "10.0.0.7", "443", 60), web.ask("bot", "203.0.113.5", "22", 60),
               web.ask("bot", "203.0.113.0/24", "443", 60)]
    assert {w.state for w in waiting} == {"pending"} and not any(w.grant_id for w in waiting)
    assert all(host.node.no_push_within(0.3) for host in hosts.values())
    with controller.admin() as admin:
        pending = {r.id: r for r in admin.list_grant_requests("pending").requests}
        assert set(pending) == {w.request_id for w in waiting}
        assert pending[waiting[0].request_id].host == "web-1"

        approval = in_background(lambda: admin.decide_grant_request(
            waiting[0].request_id, approve=True, note="ok", wait=10))
        sent = {name: host.take() for name, host in hosts.items()}
        approved = approval.result(timeout=20)
        assert approved.request.state == "approved" and approved.request.decided_by == "ops"
        assert sent["web-1"][approved.grant.grant_id] == ("bot", "10.0.0.7/32", "443", 60.0)
        assert approved.grant.grant_id not in sent["gpu-1"]
        assert approved.grant.reason == "TICKET-7" and approved.grant.approver == "ops"

        denied = admin.decide_grant_request(waiting[1].request_id, approve=False, note="no")
        assert denied.request.state == "denied" and not denied.grant.grant_id
        assert all(host.node.no_push_within(0.3) for host in hosts.values())
        with pytest.raises(ControllerError, match="FAILED_PRECONDITION: .* already denied"):
            admin.decide_grant_request(waiting[1].request_id, approve=True)
        with pytest.raises(ControllerError, match="FAILED_PRECONDITION: .* already approved"):
            admin.decide_grant_request(waiting[0].request_id, approve=False)
    status = web.stub.GetGrantRequest(node_pb2.GetGrantRequestRequest(
        request_id=waiting[1].request_id), timeout=10)
    assert status.state == "denied" and not status.grant_id

    kinds = [(r["kind"], r["fields"].get("request")) for r in map(
        json.loads, (state.root / "audit.jsonl").read_text().splitlines())
        if r["kind"].startswith("jit.")]
    assert ("jit.approved", answer.request_id) in kinds
    assert ("jit.approved", waiting[0].request_id) in kinds
    assert ("jit.denied", waiting[1].request_id) in kinds
    assert sum(kind == "jit.requested" for kind, _ in kinds) == 4


def test_a_host_asks_only_for_its_own_agents_and_sees_only_its_requests(
        controller: ControllerProcess, hosts: dict[str, Host]) -> None:
    web, gpu = hosts["web-1"], hosts["gpu-1"]
    with pytest.raises(grpc.RpcError) as caught:
        web.ask("trainer", "203.0.113.5", "443", 60)  # trainer runs on gpu hosts only
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "does not run agent 'trainer'" in str(caught.value.details())
    mine = gpu.ask("trainer", "10.0.0.8", "443", 60)
    assert mine.state == "pending"
    with pytest.raises(grpc.RpcError) as caught:
        web.stub.GetGrantRequest(node_pb2.GetGrantRequestRequest(request_id=mine.request_id),
                                 timeout=10)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        web.ask("bot", "203.0.113.5", "443", 60, reason="x" * 513)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # the agent's words are untrusted: stored and shown escaped
    hostile = web.ask("bot", "10.0.0.8", "443", 60, reason="ok\x1b]0;owned\x07\nFORGED")
    with controller.admin() as admin:
        shown = {r.id: r.reason for r in admin.list_grant_requests().requests}
        with pytest.raises(ControllerError, match="INVALID_ARGUMENT: ports"):
            admin.issue_grant("bot", "10.0.0.9", "", ttl=60, reason="x")
    assert shown[hostile.request_id] == "ok\\x1b]0;owned\\x07\\nFORGED"
    with controller.admin() as admin:  # an admin certificate is no host: it cannot ask
        channel = controller.channel(controller.admin_dir)
        with channel, pytest.raises(grpc.RpcError) as caught:
            node_pb2_grpc.NodeServiceStub(channel).RequestGrant(node_pb2.RequestGrantRequest(
                agent="bot", to="203.0.113.5", ports="443", ttl_seconds=60, reason="x"),
                timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_an_expiring_grant_leaves_the_next_epoch_on_time(
        controller: ControllerProcess, hosts: dict[str, Host]) -> None:
    with controller.admin() as admin:
        grant_id, _ = issue(admin, hosts, {"web-1", "gpu-1"}, agent="bot", to="10.0.0.11",
                            ports="443", ttl=3, reason="short")
        not_after = next(g.not_after for g in admin.list_grants().grants
                         if g.grant_id == grant_id)
    # the controller starts an epoch without it just before it ends, unasked
    after = hosts["web-1"].take()
    assert grant_id not in after
    push = hosts["web-1"].last
    assert push is not None
    bundle = hosts["web-1"].node.verify(push)
    assert bundle.bundle.issued_at < not_after  # pushed before the kernel ends it
    with controller.admin() as admin:
        deadline = time.monotonic() + 10
        while grant_id in {g.grant_id for g in admin.list_grants().grants}:
            assert time.monotonic() < deadline, "still listed as live"
            time.sleep(0.05)
        assert time.time() >= not_after
        assert grant_id in {g.grant_id for g in admin.list_grants(include_expired=True).grants}


def test_a_jit_grant_can_be_revoked_before_it_ends(
        controller: ControllerProcess, hosts: dict[str, Host]) -> None:
    with controller.admin() as admin:
        grant_id, _ = issue(admin, hosts, {"web-1", "gpu-1"}, agent="bot", to="10.0.0.12",
                            ports="443", ttl=600, reason="oops")
        revoked = in_background(lambda: admin.revoke("bot", grant_id))
        sent = {name: host.take() for name, host in hosts.items()}
        assert [r.outcome for r in revoked.result(timeout=20).results] == ["ack", "ack"]
    assert not any(grant_id in grants for grants in sent.values())


def test_a_host_is_limited_in_how_often_it_asks(state: ControllerState, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    with ControllerProcess(state, policy=policy, extra_args=["--host-request-rate", "3/h"]) \
            as controller:
        host = Host(controller, enroll(controller, "web-1"))
        try:
            for _ in range(3):
                assert host.ask("bot", "10.0.0.7", "443", 60).state == "pending"
            with pytest.raises(grpc.RpcError) as caught:
                host.ask("bot", "10.0.0.7", "443", 60)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--host-request-rate" in str(caught.value.details())
        finally:
            host.close()
