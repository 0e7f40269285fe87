"""Enrollment and authorization against a real controller process over real
mutual TLS: who may call what, and with which certificate."""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import time
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ztnet import pki
from ztnet.cli.controller import revoke_host
from ztnet.controller import ca
from ztnet.testing.controller import TRUST_DOMAIN, ControllerProcess, ControllerState, create_token
from ztnet.testing.nodes import FakeNode, enroll, make_csr, private_pem
from ztnet.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    error: Any = excinfo.value
    return error.code(), error.details() or ""


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# --- enrollment ------------------------------------------------------------------------


def test_a_token_enrolls_its_host_once(controller: ControllerProcess,
                                       state: ControllerState) -> None:
    token = create_token(state, "enroll-once")
    identity = enroll(controller, "enroll-once", token)
    assert identity.spiffe_id == f"spiffe://{TRUST_DOMAIN}/host/enroll-once"
    assert uri_sans(identity.cert) == [identity.spiffe_id]
    assert identity.ca_pem == state.ca_pem
    assert identity.signing_pub_pem == state.paths.signing_pub.read_bytes()
    assert identity.trust_domain == TRUST_DOMAIN

    with pytest.raises(grpc.RpcError) as excinfo:
        enroll(controller, "enroll-once", token)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in details


def test_a_token_for_another_host_is_refused_and_stays_usable(
        controller: ControllerProcess, state: ControllerState) -> None:
    token = create_token(state, "right-host")
    with pytest.raises(grpc.RpcError) as excinfo:
        enroll(controller, "wrong-host", token)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "not for host wrong-host" in details
    enroll(controller, "right-host", token)  # the failed attempt did not burn it


def test_an_unknown_token_is_refused(controller: ControllerProcess) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        enroll(controller, "nobody", token="not-a-token")
    assert code_of(excinfo)[0] is grpc.StatusCode.UNAUTHENTICATED


def test_the_csr_cannot_choose_the_identity(controller: ControllerProcess) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, "admin", sans=[
        x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/admin/root"),
        x509.DNSName("localhost")])
    identity = enroll(controller, "sneaky", csr_pem=csr, key=key)
    assert uri_sans(identity.cert) == [f"spiffe://{TRUST_DOMAIN}/host/sneaky"]
    san = identity.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert not san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("csr, field", [
    (b"", "csr_pem: is empty"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "csr_pem: is not a PEM"),
])
def test_a_bad_csr_is_invalid_argument(controller: ControllerProcess, state: ControllerState,
                                       csr: bytes, field: str) -> None:
    token = create_token(state, "bad-csr")
    with controller.channel(enroll=True) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            node_pb2_grpc.NodeServiceStub(channel).Enroll(
                node_pb2.EnrollRequest(token=token, host="bad-csr", csr_pem=csr), timeout=10)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in details
    enroll(controller, "bad-csr", token)  # input errors are caught before the token is used


def test_a_csr_signed_by_another_key_is_refused(controller: ControllerProcess) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), "x")
    forged = _corrupt_signature(csr)
    with pytest.raises(grpc.RpcError) as excinfo:
        enroll(controller, "forged-csr", csr_pem=forged)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "csr_pem: has an invalid signature" in details


def _corrupt_signature(csr_pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature BIT STRING at the end
    body = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return (b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"\n".join(lines)
            + b"\n-----END CERTIFICATE REQUEST-----\n")


def test_re_enrolling_a_host_revokes_its_old_certificate(controller: ControllerProcess) -> None:
    old = enroll(controller, "re-enrolled")
    new = enroll(controller, "re-enrolled")
    with FakeNode(controller, old) as node:
        error = node.ended()
    assert error is not None and error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.details() or "")
    with FakeNode(controller, new) as node:
        node.next_push()


def test_revoke_host_refuses_its_certificates(controller: ControllerProcess,
                                              state: ControllerState) -> None:
    identity = enroll(controller, "stolen")
    assert revoke_host(state.root, "stolen") == 0
    with FakeNode(controller, identity) as node:
        error = node.ended()
    assert error is not None and error.code() is grpc.StatusCode.UNAUTHENTICATED


# --- who may call what -------------------------------------------------------------------


def test_a_host_certificate_cannot_call_admin_rpcs(controller: ControllerProcess) -> None:
    identity = enroll(controller, "curious")
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            admin_pb2_grpc.AdminServiceStub(channel).ListHosts(admin_pb2.ListHostsRequest(),
                                                               timeout=10)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "host certificate" in details and "admin certificate" in details


def test_an_admin_certificate_cannot_subscribe(controller: ControllerProcess) -> None:
    # "ops" is the admin's own name: only the kind of certificate can refuse this
    with controller.channel(controller.admin_dir) as channel:
        call = node_pb2_grpc.NodeServiceStub(channel).StreamGrants(iter([
            node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(host="ops"))]))
        with pytest.raises(grpc.RpcError) as excinfo:
            list(call)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "is an admin certificate; this RPC needs a host certificate" in details


def test_without_a_certificate_admin_rpcs_are_unauthenticated(
        controller: ControllerProcess) -> None:
    with controller.channel(enroll=True) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            admin_pb2_grpc.AdminServiceStub(channel).GetPolicy(admin_pb2.GetPolicyRequest(),
                                                               timeout=10)
    code, details = code_of(excinfo)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in details


def test_the_mutual_tls_listener_refuses_a_client_without_certificate(
        controller: ControllerProcess) -> None:
    with controller.channel() as channel:  # CA-verified, but no client certificate
        with pytest.raises(grpc.RpcError) as excinfo:
            admin_pb2_grpc.AdminServiceStub(channel).GetPolicy(admin_pb2.GetPolicyRequest(),
                                                               timeout=5)
    assert code_of(excinfo)[0] is grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_a_certificate_from_another_ca_is_refused(controller: ControllerProcess) -> None:
    foreign = ca.create_authority(TRUST_DOMAIN, now=_now())
    key = pki.new_tls_key()
    cert = ca.issue(foreign, key.public_key(), pki.spiffe_id(TRUST_DOMAIN, "admin", "mallory"),
                    now=_now(), lifetime=3600)
    with controller.channel(key_pem=private_pem(key),
                            cert_pem=cert.public_bytes(serialization.Encoding.PEM)) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            admin_pb2_grpc.AdminServiceStub(channel).GetPolicy(admin_pb2.GetPolicyRequest(),
                                                               timeout=5)
    assert code_of(excinfo)[0] is grpc.StatusCode.UNAVAILABLE


def test_a_host_may_subscribe_only_as_itself(controller: ControllerProcess) -> None:
    identity = enroll(controller, "host-a")
    with FakeNode(controller, identity, subscribe_as="host-b") as node:
        error = node.ended()
    assert error is not None and error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "not host-b" in (error.details() or "")


def test_renewal_keeps_the_identity_whatever_the_csr_says(controller: ControllerProcess) -> None:
    identity = enroll(controller, "renewing")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, "x", sans=[x509.UniformResourceIdentifier(
        f"spiffe://{TRUST_DOMAIN}/host/someone-else")])
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        reply = node_pb2_grpc.NodeServiceStub(channel).RenewCertificate(
            node_pb2.RenewCertificateRequest(csr_pem=csr), timeout=10)
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert uri_sans(cert) == [identity.spiffe_id]
    assert cert.serial_number != identity.cert.serial_number


def test_report_flows_acknowledges_batches(controller: ControllerProcess) -> None:
    identity = enroll(controller, "reporter")
    # empty batches: what records must be is tests/controller/test_flows.py's subject
    batches = [node_pb2.FlowBatch(sequence=n) for n in (1, 2, 2, 3)]
    with controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem) as channel:
        acks = list(node_pb2_grpc.NodeServiceStub(channel).ReportFlows(iter(batches),
                                                                        timeout=10))
    assert [ack.sequence for ack in acks] == [1, 2, 2, 3]


# --- standard services -------------------------------------------------------------------


def test_health_is_serving_on_both_listeners(controller: ControllerProcess) -> None:
    for channel in (controller.channel(controller.admin_dir), controller.channel(enroll=True)):
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "ztnet.v1.NodeService", "ztnet.v1.AdminService"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(controller: ControllerProcess) -> None:
    with controller.channel(enroll=True) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"ztnet.v1.NodeService", "ztnet.v1.AdminService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("listener", ["address", "enroll_address"])
def test_both_listeners_present_the_ca_for_pinning(controller: ControllerProcess,
                                                   state: ControllerState,
                                                   listener: str) -> None:
    host, _, port = getattr(controller, listener).rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                # Python 3.11 has the unverified chain only on the private object.
                chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
                ders = [cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                        for cert in chain]
        except ssl.SSLError:
            pytest.fail("TLS handshake failed before the chain could be read")
    expected = pki.fingerprint(x509.load_pem_x509_certificate(state.ca_pem))
    assert [hashlib.sha256(der).hexdigest() for der in ders][-1] == expected
    assert len(ders) == 2


def _now() -> float:
    return time.time()
