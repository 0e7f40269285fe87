"""Host selectors against a real controller process: hosts enrolled with labelled tokens
each receive exactly the grants whose agents select them (checked in the signed bytes a
host is sent, not only in what verifies), an admin's label change is audited and re-pushed
at once, and bad labels change nothing."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from ztnet.controller.admin_client import AdminClient
from ztnet.errors import ControllerError, RpcFailure
from ztnet.observe.audit import verify
from ztnet.testing.controller import (
    TRUST_DOMAIN,
    ControllerProcess,
    ControllerState,
    create_token,
    init_controller,
)
from ztnet.testing.nodes import FakeNode, Push, enroll
from ztnet.v1 import admin_pb2, admin_pb2_grpc

T = TypeVar("T")

POLICY = f"""trust_domain = "{TRUST_DOMAIN}"
[agents.everywhere]
[[agents.everywhere.allow]]
to = "10.0.0.1"
ports = "443"

[agents.trainer]
hosts = {{ env = "prod", role = "gpu" }}
[[agents.trainer.allow]]
to = "10.0.0.2"
ports = "443"
[[agents.trainer.allow]]
to = "10.0.0.22"
ports = "8443"

[agents.pinned]
hosts = ["web-1"]
[[agents.pinned.allow]]
to = "10.0.0.3"
ports = "22"
"""
ALL_AGENTS = {"everywhere", "trainer", "pinned"}
LABELS = {"gpu-1": {"env": "prod", "role": "gpu"}, "web-1": {}, "dev-1": {"env": "dev",
                                                                          "role": "gpu"}}


def in_background(call: Callable[[], T]) -> Future[T]:
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def payload_of(push: Push) -> bytes:
    return base64.b64decode(json.loads(push.envelope)["payload"])


def agents_sent(node: FakeNode, push: Push) -> set[str]:
    """The agents in the bundle, from the verified grants *and* from the raw signed
    bytes: a host must not even see the names of other hosts' agents."""
    verified = {grant.agent for grant in node.verify(push).grants}
    raw = payload_of(push)
    named = {agent for agent in ALL_AGENTS
             if f"spiffe://{TRUST_DOMAIN}/agent/{agent}".encode() in raw}
    assert named == verified, (named, verified)
    return verified


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
def nodes(controller: ControllerProcess) -> Iterator[dict[str, FakeNode]]:
    identities = {host: enroll(controller, host, token=create_token(controller.state, host,
                                                                     labels=labels))
                  for host, labels in LABELS.items()}
    started = {}
    try:
        for host, identity in identities.items():
            started[host] = FakeNode(controller, identity)
        yield started
    finally:
        for node in started.values():
            node.close()


def relabel(admin: AdminClient, nodes: dict[str, FakeNode], host: str,
            labels: dict[str, str], remove: list[str]) -> dict[str, set[str]]:
    """Change ``host``'s labels while every node answers the push it gets: what each
    host was sent for the new version."""
    answer = in_background(lambda: admin.label_host(host, labels, remove, wait=10))
    sent = {}
    for name, node in nodes.items():
        push = node.next_push()
        sent[name] = agents_sent(node, push)
        node.ack(push)
    response = answer.result(timeout=20)
    assert response.changed
    assert {r.host: r.outcome for r in response.results} == dict.fromkeys(nodes, "ack")
    assert {r.version for r in response.results} == {response.version}
    return sent


def test_each_host_receives_exactly_the_grants_that_select_it(
        controller: ControllerProcess, nodes: dict[str, FakeNode]) -> None:
    first = {host: node.next_push() for host, node in nodes.items()}
    assert {host: agents_sent(nodes[host], push) for host, push in first.items()} == {
        "gpu-1": {"everywhere", "trainer"},
        "web-1": {"everywhere", "pinned"},
        "dev-1": {"everywhere"},
    }
    trainer = {(str(g.network), str(g.ports)) for g in nodes["gpu-1"].verify(
        first["gpu-1"]).grants if g.agent == "trainer"}
    assert trainer == {("10.0.0.2/32", "443"), ("10.0.0.22/32", "8443")}
    with controller.admin() as admin:
        shown = {h.name: dict(h.labels) for h in admin.list_hosts().hosts}
    assert shown == LABELS


def test_label_changes_are_audited_and_take_effect_at_once(
        controller: ControllerProcess, nodes: dict[str, FakeNode], state: ControllerState) -> None:
    for node in nodes.values():
        node.ack(node.next_push())
    with controller.admin() as admin:
        # dev-1 becomes prod: it gains the trainer, nobody else changes
        sent = relabel(admin, nodes, "dev-1", {"env": "prod"}, [])
        assert sent == {"gpu-1": {"everywhere", "trainer"}, "web-1": {"everywhere", "pinned"},
                        "dev-1": {"everywhere", "trainer"}}
        # gpu-1 loses its role: it loses the trainer
        sent = relabel(admin, nodes, "gpu-1", {"zone": "a"}, ["role"])
        assert sent["gpu-1"] == {"everywhere"}
        assert sent["dev-1"] == {"everywhere", "trainer"}
        shown = {h.name: dict(h.labels) for h in admin.list_hosts().hosts}
        assert shown["gpu-1"] == {"env": "prod", "zone": "a"}
        assert shown["dev-1"] == {"env": "prod", "role": "gpu"}

        # the same labels again: nothing stored, nothing pushed
        same = admin.label_host("gpu-1", {"zone": "a"}, [])
        assert not same.changed and same.version == 0
        assert all(node.no_push_within(0.3) for node in nodes.values())

    report = verify(state.root / "audit.jsonl")
    assert report.ok, report.problem
    records = [json.loads(line) for line in (state.root / "audit.jsonl").read_text().splitlines()]
    changes = [r["fields"] for r in records if r["kind"] == "host.labels"]
    assert [(c["host"], c["before"], c["after"], c["admin"]) for c in changes] == [
        ("dev-1", "env=dev,role=gpu", "env=prod,role=gpu", "ops"),
        ("gpu-1", "env=prod,role=gpu", "env=prod,zone=a", "ops"),
    ]


@pytest.mark.parametrize("labels, remove, problem", [
    ({"Env": "prod"}, [], "label key"),
    ({"env": "pr od"}, [], "value"),
    ({"env": "x" * 64}, [], "value"),
    ({"env": "prod"}, ["env"], "both set and removed"),
    ({}, ["-role"], "label key"),
    ({f"k{i}": "v" for i in range(40)}, [], "at most 32"),
])
def test_bad_labels_are_refused_and_change_nothing(
        controller: ControllerProcess, nodes: dict[str, FakeNode], labels: dict[str, str],
        remove: list[str], problem: str) -> None:
    for node in nodes.values():
        node.ack(node.next_push())
    with controller.admin() as admin:
        with pytest.raises(ControllerError, match=f"INVALID_ARGUMENT: labels: .*{problem}"):
            admin.label_host("gpu-1", labels, remove)
        assert {h.name: dict(h.labels) for h in admin.list_hosts().hosts} == LABELS
    assert nodes["gpu-1"].no_push_within(0.3)


def test_unknown_hosts_and_bad_tokens(controller: ControllerProcess) -> None:
    with controller.admin() as admin:
        with pytest.raises(ControllerError, match="NOT_FOUND: host: 'nowhere' is not enrolled"):
            admin.label_host("nowhere", {"env": "prod"}, [])
    # the testing helper goes through enrollment.create_token, as the CLI does
    with pytest.raises(RpcFailure, match="labels: label key 'BAD'"):
        create_token(controller.state, "x-1", labels={"BAD": "v"})


def test_re_enrollment_with_other_labels_starts_an_epoch(
        controller: ControllerProcess, nodes: dict[str, FakeNode]) -> None:
    first = nodes["web-1"].next_push()
    nodes["web-1"].ack(first)
    token = create_token(controller.state, "web-1", labels={"env": "prod", "role": "gpu"})
    identity = enroll(controller, "web-1", token=token)
    with FakeNode(controller, identity, version_held=first.version) as again:
        push = again.next_push()
        assert push.version > first.version
        assert agents_sent(again, push) == {"everywhere", "trainer", "pinned"}


def test_a_host_cannot_label_itself(controller: ControllerProcess) -> None:
    identity = enroll(controller, "self-1")
    channel = controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            admin_pb2_grpc.AdminServiceStub(channel).LabelHost(
                admin_pb2.LabelHostRequest(host="self-1", labels={"env": "prod"}), timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
