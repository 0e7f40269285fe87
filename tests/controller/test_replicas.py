"""Two controller replicas over one real PostgreSQL (`serve --database`): a change made
through either reaches the hosts of both, versions stay unique under concurrent applies,
a replica that lost its database issues nothing, and 1,000 simulated hosts split across
the two converge after an apply."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztnet.controller.pgstore import PgStore
from ztnet.errors import ControllerError
from ztnet.grants.bundle import verify_bundle
from ztnet.grants.keys import key_id
from ztnet.observe.audit import Head, verify
from ztnet.testing.controller import (
    ControllerProcess,
    ControllerState,
    init_controller,
    policy_toml,
    replica_state,
    write_policy,
)
from ztnet.testing.nodes import FakeNode, HostIdentity, Push, enroll
from ztnet.testing.postgres import PostgresServer
from ztnet.testing.simhosts import Simulator, enroll_hosts

# a change reaches the other replica's hosts within this (the issue's bound)
REACH_WITHIN = 2.0


def policy(destination: str) -> str:
    return policy_toml({"bot": [(destination, "443")]})


@contextmanager
def two_replicas(tmp_path: Path, server: PostgresServer, extra_args: Sequence[str] = (),
                 ) -> Iterator[tuple[ControllerProcess, ControllerProcess]]:
    """Replicas A (started with a first policy) and B on one fresh database."""
    state = init_controller(tmp_path / "a", database=server.create_database())
    other = replica_state(state, tmp_path / "b")
    first = write_policy(tmp_path, {"bot": [("10.0.0.1", "443")]})
    # applies wait for the hosts' answers, which these tests give only afterwards
    quick = ["--apply-timeout", "1s", *extra_args]
    with ControllerProcess(state, policy=first, extra_args=quick) as a, \
            ControllerProcess(other, extra_args=quick) as b:
        yield a, b


@pytest.fixture
def replicas(tmp_path: Path, postgres_server: PostgresServer,
             ) -> Iterator[tuple[ControllerProcess, ControllerProcess]]:
    with two_replicas(tmp_path, postgres_server) as pair:
        yield pair


def latest(node: FakeNode, version: int, timeout: float) -> Push:
    """Pushes until one at ``version`` or later (acknowledging each); fails after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        push = node.next_push(timeout=max(0.01, deadline - time.monotonic()))
        node.ack(push)
        if push.version >= version:
            return push


def destinations(node: FakeNode, push: Push) -> set[str]:
    return {str(grant.network) for grant in node.verify(push).grants}


def test_a_policy_applied_through_one_replica_reaches_the_hosts_of_the_other(
        replicas: tuple[ControllerProcess, ControllerProcess]) -> None:
    a, b = replicas
    identity = enroll(b, "web-1")
    with FakeNode(b, identity) as node:
        first = node.next_push()
        node.ack(first)
        assert destinations(node, first) == {"10.0.0.1/32"}
        with a.admin() as admin:
            started = time.monotonic()
            applied = admin.apply_policy(policy("10.0.0.2")).version
        push = latest(node, applied, REACH_WITHIN)
        took = time.monotonic() - started
        assert push.version == applied and destinations(node, push) == {"10.0.0.2/32"}, took
        # a revocation through B reaches a host on A the same way
        with FakeNode(a, enroll(a, "web-2")) as other:
            other.ack(other.next_push())
            with b.admin() as admin:
                revoked = admin.revoke("bot").version
            assert destinations(other, latest(other, revoked, REACH_WITHIN)) == set()
            assert destinations(node, latest(node, revoked, REACH_WITHIN)) == set()
            # one table of hosts, whoever serves them: A lists B's host's acknowledgement
            deadline = time.monotonic() + 10
            with a.admin() as admin:
                while (applied_by := {h.name: h.applied_version for h in
                                      admin.list_hosts().hosts}) != {"web-1": revoked,
                                                                     "web-2": revoked}:
                    assert time.monotonic() < deadline, applied_by
                    time.sleep(0.05)


def test_concurrent_applies_get_unique_versions_and_every_host_converges(
        replicas: tuple[ControllerProcess, ControllerProcess]) -> None:
    a, b = replicas
    nodes = [FakeNode(replica, enroll(replica, f"web-{i}"))
             for i, replica in enumerate((a, b, a, b))]
    try:
        for node in nodes:
            node.ack(node.next_push())
        versions: dict[str, list[int]] = {"a": [], "b": []}
        barrier = threading.Barrier(2)

        def apply(name: str, replica: ControllerProcess) -> None:
            with replica.admin() as admin:
                barrier.wait()
                for i in range(5):
                    response = admin.apply_policy(policy(f"10.{ord(name)}.0.{i + 1}"),
                                                  wait=0.001)
                    versions[name].append(response.version)

        threads = [threading.Thread(target=apply, args=(name, replica))
                   for name, replica in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        every = versions["a"] + versions["b"]
        assert len(every) == len(set(every)) == 10, versions
        with a.admin() as admin:
            final = admin.get_policy()
        assert final.version == max(every)
        want = {str(ipaddress.ip_network(line.split('"')[1]))
                for line in final.policy_toml.splitlines() if line.startswith("to = ")}
        for node in nodes:
            push = latest(node, final.version, 10.0)
            assert push.version == final.version and destinations(node, push) == want
    finally:
        for node in nodes:
            node.close()


def _health(controller: ControllerProcess) -> int:
    with controller.channel(controller.admin_dir) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
    return int(reply.status)


def _wait_health(controller: ControllerProcess, status: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _health(controller) != status:
        assert time.monotonic() < deadline, f"health never became {status}:\n{controller.log()}"
        time.sleep(0.05)


def test_without_its_database_a_replica_issues_nothing_and_resumes_after(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    state: ControllerState = init_controller(tmp_path / "a",
                                             database=postgres_server.create_database())
    first = write_policy(tmp_path, {"bot": [("10.0.0.1", "443")]})
    with ControllerProcess(state, policy=first) as controller:
        identity: HostIdentity = enroll(controller, "web-1")
        node = FakeNode(controller, identity)
        held = node.next_push()
        node.ack(held)
        postgres_server.stop()
        try:
            _wait_health(controller, health_pb2.HealthCheckResponse.NOT_SERVING)
            # the open stream ends (the daemon would fail over), and nothing new is issued
            error = node.ended()
            assert error is not None and error.code() is grpc.StatusCode.UNAVAILABLE
            node.close()
            with pytest.raises(grpc.RpcError) as refused:
                enroll(controller, "web-2", token="ztnet-enroll-" + "x" * 43)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            with FakeNode(controller, identity, version_held=held.version) as again:
                error = again.ended()
                assert error is not None and error.code() is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(ControllerError, match="database is unavailable"):
                with controller.admin() as admin:
                    admin.apply_policy(policy("10.0.0.9"))
        finally:
            postgres_server.restart()
        _wait_health(controller, health_pb2.HealthCheckResponse.SERVING)
        with FakeNode(controller, identity, version_held=held.version) as back:
            with controller.admin() as admin:
                applied = admin.apply_policy(policy("10.0.0.3"), wait=0.001).version
            push = latest(back, applied, REACH_WITHIN)
            assert destinations(back, push) == {"10.0.0.3/32"}


def test_each_replica_anchors_its_audit_head_in_the_database(
        replicas: tuple[ControllerProcess, ControllerProcess]) -> None:
    a, b = replicas
    with a.admin() as admin:
        admin.apply_policy(policy("10.0.0.5"), wait=0.001)
    with b.admin() as admin:
        admin.revoke("bot")
    assert a.state.database is not None
    store = PgStore.open(a.state.database)
    try:
        deadline = time.monotonic() + 10
        while True:
            heads = store.audit_heads()
            files = {f"{socket.gethostname()}:{r.state.root.resolve()}":
                     Head.parse((r.state.root / "audit.jsonl.head").read_text())
                     for r in (a, b) if (r.state.root / "audit.jsonl.head").exists()}
            if len(files) == 2 and heads == {k: (h.seq, h.hash) for k, h in files.items()}:
                break
            assert time.monotonic() < deadline, (heads, files)
            time.sleep(0.05)
    finally:
        store.close()
    for replica in (a, b):  # and the anchor verifies the replica's own log
        anchored = heads[f"{socket.gethostname()}:{replica.state.root.resolve()}"]
        report = verify(replica.state.root / "audit.jsonl", head=Head(*anchored))
        assert report.problem is None and report.last == Head(*anchored), report


FLEET = 1000
# a failure bound only (the wait is for the hosts' pushes); it takes seconds
CONVERGE_WITHIN = 120.0


def test_a_thousand_simulated_hosts_split_across_two_replicas_converge_after_an_apply(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    # 1,000 streams from one address: the per-peer subscribe limits are for real fleets
    fleet = ["--host-subscribe-rate", "off", "--host-max-streams", "0"]
    with two_replicas(tmp_path, postgres_server, fleet) as (a, b):
        identities = enroll_hosts(a.state, (a, b), FLEET)  # host i follows (a, b)[i % 2]
        with Simulator(tmp_path / "hosts.json", (a, b), identities) as simulator:
            with a.admin() as admin:
                simulator.wait_within(admin.get_policy().version, CONVERGE_WITHIN)
                applied = admin.apply_policy(policy("10.0.0.2"), wait=0.001).version
            times = simulator.wait_within(applied, CONVERGE_WITHIN)
            held = simulator.held()
            # every ACK recorded, and each replica serving its own half
            deadline = time.monotonic() + CONVERGE_WITHIN
            while True:
                with a.admin() as admin:
                    rows = {h.name: h for h in admin.list_hosts().hosts}
                behind = [n for n, h in rows.items() if h.applied_version != applied]
                if len(rows) == FLEET and not behind:
                    break
                assert time.monotonic() < deadline, (len(rows), behind[:10])
                time.sleep(0.05)
            for i, replica in enumerate((a, b)):
                with replica.admin() as admin:
                    assert admin.get_policy().version == applied
                    connected = {h.name for h in admin.list_hosts().hosts if h.connected}
                assert connected == {h.host for h in identities[i::2]}
        assert len(times) == FLEET
        assert {name: version for name, (version, _) in held.items()} == {
            h.host: applied for h in identities}
        signing = serialization.load_pem_public_key(identities[0].signing_pub_pem)
        assert isinstance(signing, Ed25519PublicKey)
        now = time.time()
        for identity in identities:
            bundle = verify_bundle(held[identity.host][1], trusted={key_id(signing): signing},
                                   host=identity.host, min_version=applied, now=now,
                                   trust_domain=identity.trust_domain)
            assert bundle.version == applied
            assert {(g.agent, str(g.network), g.ports and (g.ports.first, g.ports.last))
                    for g in bundle.grants} == {("bot", "10.0.0.2/32", (443, 443))}, identity.host
