"""The grant stream and the admin API against a real controller process:
bundles verify for their host, ApplyPolicy and Revoke push at once and
report each host's answer, bad input gets the right status."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import pytest

from tests.controller.conftest import BASE_POLICY
from ztnet.cli.controller import raise_version
from ztnet.controller.admin_client import AdminClient
from ztnet.errors import ControllerError
from ztnet.grants.bundle import VerifiedBundle
from ztnet.grants.model import format_grant_id
from ztnet.testing.controller import ControllerProcess, policy_toml
from ztnet.testing.nodes import FakeNode, HostIdentity, enroll
from ztnet.v1 import admin_pb2, admin_pb2_grpc, node_pb2

T = TypeVar("T")
NEW_POLICY = {"bot": [("10.0.0.1", "443"), ("10.0.0.3", "8443")]}


def in_background(call: Callable[[], T]) -> Future[T]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def destinations(bundle: VerifiedBundle, agent: str = "bot") -> set[tuple[str, str]]:
    return {(str(g.network), str(g.ports)) for g in bundle.grants if g.agent == agent}


def subscribed(controller: ControllerProcess, host: str) -> tuple[HostIdentity, FakeNode]:
    identity = enroll(controller, host)
    return identity, FakeNode(controller, identity)


def hosts_by_name(admin: AdminClient) -> dict[str, Any]:
    return {host.name: host for host in admin.list_hosts().hosts}


def test_a_node_gets_a_bundle_signed_for_it_and_acks(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-ack")
    with node, controller.admin() as admin:
        push = node.next_push()
        bundle = node.verify(push)
        assert bundle.bundle.audience == "node-ack"
        assert destinations(bundle) == {("10.0.0.1/32", "443"), ("10.0.0.2/32", "80")}
        assert destinations(bundle, "other") == {("10.9.0.0/16", "22")}
        assert 295 <= bundle.bundle.expires - bundle.bundle.issued_at <= 300  # 5 min default
        before = hosts_by_name(admin)["node-ack"]
        assert before.connected and before.applied_version == 0 and not before.in_sync
        node.ack(push)
        _eventually(lambda: hosts_by_name(admin)["node-ack"].applied_version == push.version)
        host = hosts_by_name(admin)["node-ack"]
        assert host.in_sync and host.connected and host.last_seen > 0


def test_holding_the_current_version_means_no_push(controller: ControllerProcess) -> None:
    identity, node = subscribed(controller, "node-held")
    with node:
        first = node.next_push()
        node.ack(first)
    with FakeNode(controller, identity, version_held=first.version) as again:
        assert again.no_push_within(0.5)
    with FakeNode(controller, identity, version_held=first.version - 1) as behind:
        # Same version, same bytes: a reconnecting host never sees one version
        # with two contents (which a daemon refuses).
        assert behind.next_push().envelope == first.envelope


def test_a_host_ahead_waits_for_the_operator_to_raise_the_version(
        controller: ControllerProcess) -> None:
    identity, node = subscribed(controller, "node-ahead")
    with node:
        current = node.next_push().version
    # its word alone moves nothing (tests/controller/test_hostile_hosts.py has the attack)
    with FakeNode(controller, identity, version_held=current + 50) as ahead:
        error = ahead.ended()
    assert error is not None and error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert f"raise-version --above {current + 50}" in (error.details() or "")
    # after a restore from a backup, the operator raises the counter; the next
    # epoch then passes what the host holds
    assert raise_version(controller.state.root, current + 50, out=io.StringIO()) == 0
    with FakeNode(controller, identity, version_held=current + 50) as ahead:
        push = ahead.next_push()
        assert push.version > current + 50
        ahead.verify(push, min_version=current + 50)


def test_apply_policy_pushes_and_returns_the_ack(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-apply")
    with node, controller.admin() as admin:
        node.ack(node.next_push())
        pending = in_background(lambda: admin.apply_policy(policy_toml(NEW_POLICY), wait=10))
        push = node.next_push()
        assert destinations(node.verify(push)) == {("10.0.0.1/32", "443"),
                                                   ("10.0.0.3/32", "8443")}
        node.ack(push)
        reply = pending.result(timeout=15)
        assert reply.version == push.version
        mine = [r for r in reply.results if r.host == "node-apply"]
        assert [(r.outcome, r.version) for r in mine] == [("ack", push.version)]
        assert admin.get_policy().version == reply.version
        # put the shared controller back
        restore = in_background(lambda: admin.apply_policy(policy_toml(BASE_POLICY), wait=10))
        node.ack(node.next_push())
        restore.result(timeout=15)


def test_a_nack_is_reported_with_its_reason(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-nack")
    with node, controller.admin() as admin:
        node.ack(node.next_push())
        pending = in_background(lambda: admin.apply_policy(policy_toml(BASE_POLICY), wait=10))
        push = node.next_push()
        node.nack(push, "bundle: simulated rejection")
        reply = pending.result(timeout=15)
        mine = [r for r in reply.results if r.host == "node-nack"]
        assert [(r.outcome, r.reason) for r in mine] == [("nack", "bundle: simulated rejection")]
        host = hosts_by_name(admin)["node-nack"]
        assert host.last_nack_version == push.version
        assert host.last_nack_reason == "bundle: simulated rejection"
        assert not host.in_sync


def test_an_unanswered_push_times_out(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-silent")
    with node, controller.admin() as admin:
        node.next_push()
        reply = admin.apply_policy(policy_toml(BASE_POLICY), wait=0.3)
        assert [(r.host, r.outcome) for r in reply.results if r.host == "node-silent"] == \
            [("node-silent", "timeout")]


def test_an_answer_with_a_foreign_nonce_changes_nothing(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-stale")
    with node, controller.admin() as admin:
        push = node.next_push()
        node.send(node_pb2.GrantStreamRequest(ack=node_pb2.Ack(version=push.version,
                                                               nonce="not-ours")))
        controller.wait_for_log("stale answer ignored host=node-stale")
        assert hosts_by_name(admin)["node-stale"].applied_version == 0


def test_a_second_stream_replaces_the_first(controller: ControllerProcess) -> None:
    identity, first = subscribed(controller, "node-twice")
    with first:
        first.next_push()
        with FakeNode(controller, identity) as second:
            second.next_push()
            error = first.ended()
            assert error is not None and error.code() is grpc.StatusCode.ABORTED


def test_an_invalid_policy_is_refused_and_nothing_changes(controller: ControllerProcess) -> None:
    with controller.admin() as admin:
        before = admin.get_policy()
        for text, problem in [
            ('trust_domain = "test.example"\n[agents.bot]\n[[agents.bot.allow]]\nto = "nope"\n',
             "not an IP address"),
            (policy_toml(BASE_POLICY, trust_domain="other.example"), "trust domain"),
            ("this is not toml", "invalid TOML"),
        ]:
            with pytest.raises(ControllerError, match="INVALID_ARGUMENT: policy_toml: ") as exc:
                admin.apply_policy(text)
            assert problem in str(exc.value)
        after = admin.get_policy()
        assert (after.version, after.policy_toml) == (before.version, before.policy_toml)


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(
        controller: ControllerProcess) -> None:
    with controller.admin() as admin:
        huge = "# " + "x" * (5 * 1024 * 1024) + "\n" + policy_toml(BASE_POLICY)
        with pytest.raises(ControllerError, match="RESOURCE_EXHAUSTED"):
            admin.apply_policy(huge)
        assert admin.get_policy().version > 0


def test_a_malformed_protobuf_is_invalid_argument(controller: ControllerProcess) -> None:
    with controller.channel(controller.admin_dir) as channel:
        call = channel.unary_unary("/ztnet.v1.AdminService/ApplyPolicy",
                                   request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as excinfo:
            call(b"\x0a\xff\xff\xff", timeout=5)  # field 1, a length running off the end
    error: Any = excinfo.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ztnet.v1.ApplyPolicyRequest" in error.details()


@pytest.mark.parametrize("request_, field", [
    (admin_pb2.RevokeRequest(agent="Not An Agent"), "agent: "),
    (admin_pb2.RevokeRequest(agent="bot", grant_id="g-xyz"), "grant_id: "),
    (admin_pb2.ApplyPolicyRequest(policy_toml="", timeout_seconds=-1), "timeout_seconds: "),
])
def test_bad_fields_are_named(controller: ControllerProcess, request_: Any, field: str) -> None:
    with controller.channel(controller.admin_dir) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        method = stub.Revoke if isinstance(request_, admin_pb2.RevokeRequest) \
            else stub.ApplyPolicy
        with pytest.raises(grpc.RpcError) as excinfo:
            method(request_, timeout=5)
    error: Any = excinfo.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field)


def test_revoking_unknown_things_is_not_found(controller: ControllerProcess) -> None:
    with controller.admin() as admin:
        with pytest.raises(ControllerError, match="NOT_FOUND: agent: 'ghost'"):
            admin.revoke("ghost")
        with pytest.raises(ControllerError, match="NOT_FOUND: grant_id: "):
            admin.revoke("bot", "g-0000000000000001")
        with pytest.raises(ControllerError, match="NOT_FOUND: .*no revocation"):
            admin.revoke("other", restore=True)


def test_revoke_pushes_a_bundle_without_the_grant(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-revoke")
    with node, controller.admin() as admin:
        first = node.next_push()
        node.ack(first)
        grant = next(g for g in node.verify(first).grants if str(g.ports) == "80")
        label = format_grant_id(grant.grant_id)

        pending = in_background(lambda: admin.revoke("bot", label))
        push = node.next_push()
        assert destinations(node.verify(push)) == {("10.0.0.1/32", "443")}
        node.ack(push)
        reply = pending.result(timeout=15)
        assert reply.version == push.version > first.version
        assert [r.outcome for r in reply.results if r.host == "node-revoke"] == ["ack"]
        agents = {a.name: a for a in admin.list_agents().agents}
        assert list(agents["bot"].revoked_grants) == [label]
        assert agents["bot"].rules == 2  # the policy is unchanged; only the bundle shrank

        pending = in_background(lambda: admin.revoke("bot", label, restore=True))
        push = node.next_push()
        assert ("10.0.0.2/32", "80") in destinations(node.verify(push))
        node.ack(push)
        pending.result(timeout=15)
        assert not {a.name: a for a in admin.list_agents().agents}["bot"].revoked_grants


def test_revoking_an_agent_removes_all_its_grants(controller: ControllerProcess) -> None:
    _, node = subscribed(controller, "node-revoke-all")
    with node, controller.admin() as admin:
        node.ack(node.next_push())
        pending = in_background(lambda: admin.revoke("other"))
        push = node.next_push()
        bundle = node.verify(push)
        assert not destinations(bundle, "other") and destinations(bundle, "bot")
        node.ack(push)
        pending.result(timeout=15)
        assert list({a.name: a for a in admin.list_agents().agents}["other"].revoked_grants) \
            == ["all"]
        pending = in_background(lambda: admin.revoke("other", restore=True))
        node.ack(node.next_push())
        pending.result(timeout=15)


def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
