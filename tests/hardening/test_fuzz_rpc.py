"""Fuzzing the enrollment and node RPC handlers through a real controller (`ztnet controller
serve` with mutual TLS on loopback): Enroll, RenewCertificate, StreamGrants and ReportFlows,
with generated messages and with raw bytes in place of the protobuf. Every call ends with a
status the caller can act on (never UNKNOWN or INTERNAL, always with details) or a success;
the controller never crashes, logs no traceback and still serves afterwards.

Hostile version_held values are bounded here (item 1 of issue 10 makes huge ones move the
fleet version: test_host_claims_never_move_the_fleet_version covers that on its own).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from tests.hardening import figures
from tests.hardening.fuzzing import HANG_SECONDS, corpus, fuzz_settings, mutated
from ztnet.testing.controller import (
    ControllerProcess,
    create_token,
    init_controller,
    write_policy,
)
from ztnet.testing.nodes import FakeNode, HostIdentity, enroll, make_csr
from ztnet.v1 import node_pb2, node_pb2_grpc

HOST = "web-1"
FAILURE_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                 grpc.StatusCode.UNIMPLEMENTED}
NODE = "/ztnet.v1.NodeService/"
CSR_SEED = make_csr(ec.generate_private_key(ec.SECP256R1()), HOST)
FLOW_SEEDS = [data for name, data in corpus("flows") if name.startswith("good-")]


class Target:
    def __init__(self, controller: ControllerProcess, identity: HostIdentity) -> None:
        self.controller = controller
        self.identity = identity
        self.node = controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem)
        self.enroll = controller.channel(enroll=True)

    def close(self) -> None:
        self.node.close()
        self.enroll.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root: Path = tmp_path_factory.mktemp("fuzz-rpc")
    state = init_controller(root / "ctl")
    policy = write_policy(root, {"bot": [("10.0.0.1", "443")]})
    # The per-host rate limits are tested on their own (tests/controller/test_hostile_hosts.py);
    # here they would turn every call after the first few into RESOURCE_EXHAUSTED.
    unlimited = ("--host-subscribe-rate", "off", "--host-renew-rate", "off",
                 "--host-flow-rate", "off")
    with ControllerProcess(state, policy=policy, extra_args=unlimited) as controller:
        target = Target(controller, enroll(controller, HOST))
        try:
            yield target
        finally:
            target.close()
        log = controller.log()
        assert "Traceback" not in log, log[-4000:]
        controller.wait_serving(time.monotonic() + 10)  # still alive and serving


def outcome(call: Callable[[], object]) -> grpc.StatusCode:
    """Run one RPC; its status must be one a client can act on, and it must not hang."""
    started = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        assert code not in FAILURE_CODES, f"{code}: {details}"
        assert code == grpc.StatusCode.CANCELLED or details, f"{code} without details"
    assert time.monotonic() - started < HANG_SECONDS + 5
    figures.fuzzed()
    return code


hosts = st.one_of(st.sampled_from([HOST, "web-2", "", "WEB-1", "a" * 300, "x\x1b[8m",
                                   "../etc", "web-1\n"]), st.text(max_size=20))
csrs = st.one_of(mutated([CSR_SEED], max_mutations=3), st.binary(max_size=300),
                 st.just(CSR_SEED))


@fuzz_settings(weight=0.2)
@given(token=st.one_of(st.text(max_size=80), st.sampled_from(["", "a" * 10000])),
       host=hosts, csr=csrs)
def test_enroll(target: Target, token: str, host: str, csr: bytes) -> None:
    stub = node_pb2_grpc.NodeServiceStub(target.enroll)
    code = outcome(lambda: stub.Enroll(node_pb2.EnrollRequest(token=token, host=host,
                                                                csr_pem=csr), timeout=5))
    assert code != grpc.StatusCode.OK  # no valid token was ever handed out here


def test_enroll_with_a_real_token_still_checks_the_request(target: Target) -> None:
    token = create_token(target.controller.state, "web-3")
    stub = node_pb2_grpc.NodeServiceStub(target.enroll)
    code = outcome(lambda: stub.Enroll(node_pb2.EnrollRequest(
        token=token, host="web-4", csr_pem=CSR_SEED), timeout=5))
    assert code in {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNAUTHENTICATED}


@fuzz_settings(weight=0.2)
@given(csr=csrs)
def test_renew_certificate(target: Target, csr: bytes) -> None:
    stub = node_pb2_grpc.NodeServiceStub(target.node)
    outcome(lambda: stub.RenewCertificate(node_pb2.RenewCertificateRequest(csr_pem=csr),
                                          timeout=5))


@fuzz_settings(weight=0.2)
@given(method=st.sampled_from(["Enroll", "RenewCertificate"]), raw=st.binary(max_size=200))
def test_unary_methods_with_raw_bytes(target: Target, method: str, raw: bytes) -> None:
    channel = target.enroll if method == "Enroll" else target.node
    call = channel.unary_unary(NODE + method)
    outcome(lambda: call(raw, timeout=5))


stream_requests = st.lists(st.one_of(
    st.builds(lambda h, v: node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
        host=h, version_held=v)), hosts, st.integers(0, 1000)),
    st.builds(lambda v, n: node_pb2.GrantStreamRequest(ack=node_pb2.Ack(version=v, nonce=n)),
              st.integers(0, 2**64 - 1), st.text(max_size=40)),
    st.builds(lambda v, n, r: node_pb2.GrantStreamRequest(nack=node_pb2.Nack(
        version=v, nonce=n, reason=r)), st.integers(0, 2**64 - 1), st.text(max_size=40),
        st.text(max_size=200)),
    st.just(node_pb2.GrantStreamRequest())), min_size=0, max_size=5)


def _grant_stream(target: Target, requests: list[node_pb2.GrantStreamRequest]) -> None:
    """Send the requests; the call ends with a status, or is cancelled by us once the
    controller answered with a push (a live stream stays open by design)."""
    call = node_pb2_grpc.NodeServiceStub(target.node).StreamGrants(iter(requests),
                                                                   timeout=HANG_SECONDS)
    timer = threading.Timer(HANG_SECONDS - 1, call.cancel)  # a silent stream: see below
    timer.start()
    try:
        for _ in call:
            call.cancel()
            break
    finally:
        timer.cancel()
    # a stream the controller neither answered nor ended is a hang only if it was told
    # something it should act on; a valid Subscribe always gets a push at once


@fuzz_settings(weight=0.05)
@given(requests=stream_requests)
def test_stream_grants(target: Target, requests: list[node_pb2.GrantStreamRequest]) -> None:
    outcome(lambda: _grant_stream(target, requests))


batches = st.lists(st.builds(
    lambda seq, recs: node_pb2.FlowBatch(sequence=seq, records=recs),
    st.one_of(st.integers(0, 2**64 - 1), st.integers(1, 50)),
    st.lists(st.one_of(mutated(FLOW_SEEDS, max_mutations=2), st.sampled_from(FLOW_SEEDS)),
             max_size=3)), min_size=0, max_size=3)


@fuzz_settings(weight=0.1)
@given(batches=batches)
def test_report_flows(target: Target, batches: list[node_pb2.FlowBatch]) -> None:
    def report() -> None:
        call = node_pb2_grpc.NodeServiceStub(target.node).ReportFlows(iter(batches),
                                                                      timeout=HANG_SECONDS)
        for _ in call:
            pass

    code = outcome(report)
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "ReportFlows hung"


@fuzz_settings(weight=0.05)
@given(method=st.sampled_from(["StreamGrants", "ReportFlows"]),
       raws=st.lists(st.binary(max_size=100), max_size=3))
def test_stream_methods_with_raw_bytes(target: Target, method: str, raws: list[bytes]) -> None:
    call = target.node.stream_stream(NODE + method)

    def run() -> None:
        responses = call(iter(raws), timeout=HANG_SECONDS)
        for _ in responses:
            responses.cancel()
            break

    outcome(run)


def test_host_claims_never_move_the_fleet_version(target: Target) -> None:
    with FakeNode(target.controller, target.identity) as honest:
        before = honest.next_push().version
    with FakeNode(target.controller, target.identity, version_held=before + 10**6) as liar:
        try:
            pushed = liar.next_push(timeout=5).version
        except AssertionError:  # refused (FAILED_PRECONDITION): also a correct answer
            pushed = before
    with FakeNode(target.controller, target.identity) as honest:
        after = honest.next_push().version
    assert pushed <= before and after == before, f"fleet version {before} -> {after}"


def corrupt_public_key(csr_pem: bytes) -> bytes:
    """The CSR with its EC point's format byte changed (0x04 -> 0x05): it still parses as
    a CSR, but its key cannot be decoded."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    spki = csr.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    point = der.index(spki) + len(spki) - 65
    assert der[point] == 0x04
    der[point] = 0x05
    body = __import__("base64").encodebytes(bytes(der)).decode()
    return (f"-----BEGIN CERTIFICATE REQUEST-----\n{body}"
            "-----END CERTIFICATE REQUEST-----\n").encode()


def test_a_csr_with_an_undecodable_key_is_refused_and_renewal_still_works(
        target: Target) -> None:
    """Found by test_renew_certificate: such a CSR made the controller answer INTERNAL
    (cryptography's InternalError from is_signature_valid)."""
    stub = node_pb2_grpc.NodeServiceStub(target.node)
    with pytest.raises(grpc.RpcError) as refused:
        stub.RenewCertificate(node_pb2.RenewCertificateRequest(
            csr_pem=corrupt_public_key(CSR_SEED)), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "public key" in refused.value.details()  # type: ignore[attr-defined]
    reply = stub.RenewCertificate(node_pb2.RenewCertificateRequest(csr_pem=CSR_SEED),
                                  timeout=5)
    assert reply.certificate_pem.startswith(b"-----BEGIN CERTIFICATE-----")
