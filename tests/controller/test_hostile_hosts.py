"""A compromised host attacks the fleet through the node API (issue 10, items 1,
3, 4 and 10): each test is the attack, made with a real controller process and
real gRPC clients holding a real enrolled host certificate, and what an honest
host or the operator sees while it happens.

Figures are printed (``pytest -s``) so the hardening run can report them.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.controller.flow_support import NS, make_record, query, uuids
from ztnet.cli import operator
from ztnet.observe.records import Verdict, from_json, to_json
from ztnet.testing.controller import (
    ControllerProcess,
    ControllerState,
    admin_credentials,
    init_controller,
    write_policy,
)
from ztnet.testing.flows import report
from ztnet.testing.nodes import FakeNode, HostIdentity, enroll, make_csr
from ztnet.v1 import node_pb2, node_pb2_grpc

POLICY = {"bot": [("10.0.0.1", "443")]}
FORGED_CALLS = 200
ESC = "\x1b"


@pytest.fixture
def state(tmp_path: Path) -> ControllerState:
    return init_controller(tmp_path / "state")


def _code(error: Any) -> grpc.StatusCode:
    code: grpc.StatusCode = error.code()
    return code


def _drain(node: FakeNode, quiet: float = 0.5) -> int:
    """Ack every push that arrives until none came for ``quiet`` seconds; how many."""
    count = 0
    while not node.no_push_within(quiet):
        node.ack(node.next_push())
        count += 1
    return count


def _forged_subscribe(stub: node_pb2_grpc.NodeServiceStub, host: str,
                      version_held: int) -> tuple[str, int]:
    """One StreamGrants call opened with ``version_held``: ("push", its version) if
    the controller answered with a bundle, else (the status code's name, 0)."""
    release = threading.Event()

    def requests() -> Iterator[node_pb2.GrantStreamRequest]:
        yield node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
            host=host, version_held=version_held))
        release.wait(10)

    call = stub.StreamGrants(requests(), timeout=10)
    try:
        return "push", next(call).version
    except grpc.RpcError as exc:
        return _code(exc).name, 0
    finally:
        release.set()
        call.cancel()


# --- item 1: a host's claim never moves the fleet's version --------------------------


def test_forged_version_held_never_moves_the_fleet_version(state: ControllerState,
                                                           tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY)
    with ControllerProcess(state, policy=policy) as controller:
        honest_id, evil = enroll(controller, "honest"), enroll(controller, "evil")
        with FakeNode(controller, honest_id) as honest:
            first = honest.next_push()
            honest.ack(first)
            outcomes: dict[str, int] = {}
            started = time.monotonic()
            with controller.channel(key_pem=evil.key_pem, cert_pem=evil.cert_pem) as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                current = first.version
                for _ in range(FORGED_CALLS):
                    # as far ahead as the controller accepts, from the newest version seen
                    outcome, pushed = _forged_subscribe(stub, "evil", current + 10**6)
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    current = max(current, pushed)
            elapsed = time.monotonic() - started
            pushes = _drain(honest)
            with controller.admin() as admin:
                version = admin.get_policy().version
                hosts = {h.name: h for h in admin.list_hosts().hosts}
        print(f"\nitem 1: {FORGED_CALLS} forged Subscribe calls in {elapsed:.1f}s: {outcomes}; "
              f"pushes to the honest host: {pushes}")
        assert pushes == 0, f"one host's claim pushed {pushes} versions to another host"
        assert "push" not in outcomes
        assert hosts["honest"].in_sync and hosts["honest"].applied_version == first.version
        assert version == first.version
        # answered FAILED_PRECONDITION until its Subscribe budget ran out, then refused
        assert outcomes.get("FAILED_PRECONDITION", 0) <= 31 + elapsed
        assert outcomes.get("RESOURCE_EXHAUSTED", 0) >= FORGED_CALLS - 31 - elapsed
        log = controller.log()
        assert "host claims a version ahead of the controller host=evil" in log


def test_a_host_over_its_subscribe_rate_is_refused(state: ControllerState,
                                                   tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY)
    options = ["--host-subscribe-rate", "5/m"]
    with ControllerProcess(state, policy=policy, extra_args=options) as controller:
        evil, other = enroll(controller, "churn"), enroll(controller, "steady")
        with controller.channel(key_pem=evil.key_pem, cert_pem=evil.cert_pem) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            outcomes = [_forged_subscribe(stub, "churn", 0)[0] for _ in range(20)]
        print(f"\nitem 10: 20 Subscribe calls at 5/m: {outcomes.count('push')} served, "
              f"{outcomes.count('RESOURCE_EXHAUSTED')} refused")
        assert outcomes[:5] == ["push"] * 5
        assert set(outcomes[5:]) == {"RESOURCE_EXHAUSTED"}
        # the limit is per host: another host subscribes as usual
        with FakeNode(controller, other) as steady:
            steady.next_push()
        assert "over its StreamGrants rate of 5/m (--host-subscribe-rate)" in controller.log()


# --- item 3: one host cannot erase or hide another host's flow records --------------


def test_far_future_records_cannot_erase_another_hosts_denials(state: ControllerState) -> None:
    options = ["--flow-max-rows", "1000", "--flow-prune-interval", "1s"]
    with ControllerProcess(state, extra_args=options) as controller:
        honest, evil = enroll(controller, "witness"), enroll(controller, "eraser")
        denials = [make_record("witness", verdict=Verdict.DENIED) for _ in range(5)]
        assert report(controller, honest, [(1, denials)]).acks == [1]
        year_2255 = 9_000_000_000 * NS
        future = [make_record("eraser", time_ns=year_2255 + i * 1000) for i in range(1000)]
        refused = report(controller, evil, [(1, future[:500]), (2, future[500:])])
        if refused.error is None:  # stored: wait for the prune that follows
            controller.wait_for_log("flows pruned", timeout=15)
        seen = len(uuids(query(controller, host="witness", verdict="DENIED")))
        print(f"\nitem 3: the witness's denials the operator sees after 1000 records dated "
              f"2255: {seen} of 5")
        assert seen == 5
        assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "records[0].time" in refused.details and "ahead of" in refused.details


def test_one_hosts_flood_is_pruned_from_its_own_records(state: ControllerState) -> None:
    options = ["--flow-max-rows", "1000", "--flow-prune-interval", "1s"]
    with ControllerProcess(state, extra_args=options) as controller:
        honest, evil = enroll(controller, "quiet"), enroll(controller, "flood")
        now = time.time_ns() // 1000 * 1000
        denials = [make_record("quiet", verdict=Verdict.DENIED, time_ns=now - 60 * NS + i)
                   for i in range(5)]
        assert report(controller, honest, [(1, denials)]).acks == [1]
        flood = [make_record("flood", time_ns=now + i * 1000) for i in range(1200)]
        assert report(controller, evil, [(1, flood[:600]), (2, flood[600:])]).acks == [1, 2]
        controller.wait_for_log("flows pruned", timeout=15)
        seen = len(uuids(query(controller, host="quiet", verdict="DENIED")))
        print(f"\nitem 3: the quiet host's denials left after another host's flood of 1200 "
              f"records beyond --flow-max-rows 1000: {seen} of 5")
        assert seen == 5


def test_newest_first_is_by_receive_time(state: ControllerState) -> None:
    with ControllerProcess(state) as controller:
        honest, evil = enroll(controller, "late"), enroll(controller, "early")
        ahead = time.time_ns() // 1000 * 1000 + 250 * NS  # inside the accepted clock skew
        squatters = [make_record("early", time_ns=ahead + i * 1000) for i in range(50)]
        assert report(controller, evil, [(1, squatters)]).acks == [1]
        denial = make_record("late", verdict=Verdict.DENIED)
        assert report(controller, honest, [(1, [denial])]).acks == [1]
        assert uuids(query(controller, limit=1)) == [denial.uuid]


def test_per_host_flow_quota(state: ControllerState) -> None:
    options = ["--flow-max-rows-per-host", "100", "--flow-prune-interval", "1s"]
    with ControllerProcess(state, extra_args=options) as controller:
        host = enroll(controller, "chatty")
        batch = [make_record("chatty") for _ in range(300)]
        assert report(controller, host, [(1, batch)]).acks == [1]
        deadline = time.monotonic() + 15
        while len(kept := uuids(query(controller, host="chatty", limit=1000))) > 100:
            assert time.monotonic() < deadline, f"quota not enforced: {len(kept)}"
            time.sleep(0.1)
        assert set(kept) == {record.uuid for record in batch[200:]}


# --- item 4: host text never reaches a terminal or a log line raw -------------------


def test_a_nack_reason_cannot_forge_a_log_line_or_hide_table_rows(
        state: ControllerState, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY)
    forged = "2026-01-01T00:00:00 info    host enrolled host=ghost"
    with ControllerProcess(state, policy=policy) as controller:
        identity = enroll(controller, "liar")
        with FakeNode(controller, identity) as node:
            push = node.next_push()
            node.nack(push, f"bad\n{forged}\n\x1b[8m")
            controller.wait_for_log("host nack")
            with controller.admin() as admin:
                out = io.StringIO()
                operator.hosts(admin, out=out)
        lines = controller.log().splitlines()
        assert not any(line.startswith(forged) for line in lines), "a forged log line"
        nack_lines = [line for line in lines if "host nack" in line]
        assert len(nack_lines) == 1 and "\\n" in nack_lines[0] and ESC not in nack_lines[0]
        assert ESC not in out.getvalue() and "liar" in out.getvalue()


def test_flow_ingest_refuses_what_is_not_an_address_or_an_agent_name(
        state: ControllerState) -> None:
    with ControllerProcess(state) as controller:
        identity = enroll(controller, "inject")
        cases = {"destination": make_record("inject", destination="10.0.0.1\x1b[8m"),
                 "agent.name": make_record("inject", agent="Bot\x1b[8m")}
        for field, record in cases.items():
            reported = report(controller, identity, [(1, [record])])
            assert reported.code is grpc.StatusCode.INVALID_ARGUMENT, field
            assert f"records[0].{field}" in reported.details, reported.details


def test_flows_table_escapes_an_agents_comm(state: ControllerState) -> None:
    with ControllerProcess(state) as controller:
        identity = enroll(controller, "shows")
        record = make_record("shows", verdict=Verdict.DENIED)
        # what an agent gets with prctl(PR_SET_NAME, "\x1b[8m"): the rows after it hidden
        hostile = from_json(to_json(record).replace('"curl"', '"\\u001b[8m"'))
        assert report(controller, identity, [(1, [hostile, make_record("shows")])]).acks == [1]
        out = io.StringIO()
        with controller.admin() as admin:
            operator.flows(admin, host="shows", out=out, err=io.StringIO())
        table = out.getvalue()
        assert ESC not in table and "\\x1b[8m" in table
        assert len(table.splitlines()) == 3  # header and both rows


# --- item 10: admin revocation, stream and RPC limits per host ----------------------


def test_a_revoked_admin_certificate_is_refused(state: ControllerState, tmp_path: Path) -> None:
    from ztnet.cli.controller import revoke_admin

    with ControllerProcess(state) as controller:
        lost = admin_credentials(state, tmp_path / "lost", name="mallory")
        with controller.admin(lost) as admin:
            admin.list_hosts()
        assert revoke_admin(state.root, "mallory", out=io.StringIO()) == 0
        with controller.admin(lost) as admin, pytest.raises(Exception) as excinfo:
            admin.list_hosts()
        assert "UNAUTHENTICATED" in str(excinfo.value) and "revoked" in str(excinfo.value)
        with controller.admin() as admin:  # the other admin still works
            admin.list_hosts()


def test_concurrent_streams_per_host_are_limited(state: ControllerState) -> None:
    with ControllerProcess(state, extra_args=["--host-max-streams", "2"]) as controller:
        identity = enroll(controller, "hoarder")
        with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            release = threading.Event()
            ended: queue.Queue[grpc.StatusCode] = queue.Queue()

            def idle() -> Iterator[node_pb2.FlowBatch]:
                release.wait(20)
                yield from ()

            def hold() -> None:
                call = stub.ReportFlows(idle(), timeout=20)
                try:
                    next(call, None)
                except grpc.RpcError as exc:
                    ended.put(_code(exc))
                    return
                ended.put(grpc.StatusCode.OK)

            holders = [threading.Thread(target=hold, daemon=True) for _ in range(5)]
            for holder in holders:
                holder.start()
            try:
                # which two get in is the server's choice; three are refused at once
                codes = [ended.get(timeout=10) for _ in range(3)]
                assert ended.empty()  # and the other two are still open
            finally:
                release.set()
                for holder in holders:
                    holder.join(10)
        print(f"\nitem 10: 5 concurrent ReportFlows streams at --host-max-streams 2: "
              f"{len(codes)} refused ({sorted({c.name for c in codes})})")
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3


def test_renew_certificate_is_rate_limited(state: ControllerState) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    with ControllerProcess(state, extra_args=["--host-renew-rate", "3/h"]) as controller:
        identity = enroll(controller, "renewer")
        outcomes = []
        with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            for _ in range(10):
                csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "renewer")
                try:
                    stub.RenewCertificate(node_pb2.RenewCertificateRequest(csr_pem=csr),
                                          timeout=10)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(_code(exc).name)
        print(f"\nitem 10: 10 RenewCertificate calls at 3/h: {outcomes.count('OK')} issued")
        assert outcomes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 7


def test_report_flows_is_rate_limited(state: ControllerState) -> None:
    with ControllerProcess(state, extra_args=["--host-flow-rate", "1000/s"]) as controller:
        identity: HostIdentity = enroll(controller, "firehose")
        batches = [(i + 1, [make_record("firehose") for _ in range(500)]) for i in range(8)]
        started = time.monotonic()
        reported = report(controller, identity, batches, timeout=30)
        elapsed = time.monotonic() - started
        rate = 4000 / elapsed
        print(f"\nitem 10: 4000 records at --host-flow-rate 1000/s took {elapsed:.1f}s "
              f"({rate:.0f} records/s)")
        assert reported.acks == list(range(1, 9)), reported.details
        assert elapsed >= 2.5  # 1000 at once, then 1000 a second
