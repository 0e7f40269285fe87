"""A scripted NodeService for tests of the node side: a CA of its own, real mutual TLS on
loopback, and a grant stream the test drives push by push.

It is what a compromised or buggy controller (or a man in the middle holding a CA-signed
certificate) could send: the daemon must verify every envelope itself. Tests use it where
the real controller would never misbehave on purpose (replayed, forged, wrong-host bundles)
and to exercise enrollment and certificate renewal without the controller's policy machinery.
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztnet.pki import fingerprint
from ztnet.v1 import node_pb2, node_pb2_grpc

TRUST_DOMAIN = "test.example"
_PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _utc(offset: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(time.time() + offset, datetime.UTC).replace(
        tzinfo=None)


class TestCA:
    """An ECDSA P-256 CA issuing a server certificate and host certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str = "ztnet test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder()
                     .subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(_utc(-60)).not_valid_after(_utc(86400))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(_PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def issue(self, public_key: ec.EllipticCurvePublicKey, common_name: str,
              san: list[x509.GeneralName], usage: x509.ObjectIdentifier, *,
              lifetime: float = 3600.0, backdate: float = 5.0) -> bytes:
        cert = (x509.CertificateBuilder()
                .subject_name(_name(common_name)).issuer_name(self.cert.subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(_utc(-backdate)).not_valid_after(_utc(lifetime))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(_PEM)

    def server_credentials(self) -> tuple[bytes, bytes]:
        """(key PEM, leaf + CA chain PEM) for a controller on loopback."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.issue(key.public_key(), "ztnet-controller",
                          [x509.DNSName("localhost"),
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          ExtendedKeyUsageOID.SERVER_AUTH)
        key_pem = key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, leaf + self.pem

    def host_certificate(self, public_key: ec.EllipticCurvePublicKey, host: str, *,
                         lifetime: float = 3600.0, backdate: float = 5.0) -> bytes:
        spiffe = f"spiffe://{TRUST_DOMAIN}/host/{host}"
        return self.issue(public_key, host, [x509.UniformResourceIdentifier(spiffe)],
                          ExtendedKeyUsageOID.CLIENT_AUTH, lifetime=lifetime, backdate=backdate)


@dataclass
class StreamRecord:
    """What one StreamGrants call said: its Subscribe, and Acks/Nacks by nonce."""

    peer_serial: int
    subscribe: node_pb2.Subscribe | None = None
    answers: dict[str, node_pb2.GrantStreamRequest] = field(default_factory=dict)
    outbox: queue.Queue[node_pb2.GrantStreamResponse | None] = field(
        default_factory=queue.Queue)


class FakeNodeService(node_pb2_grpc.NodeServiceServicer):  # type: ignore[misc]
    def __init__(self, ca: TestCA, signing_key: Ed25519PrivateKey,
                 host_cert_lifetime: float, backdate: float) -> None:
        self.ca = ca
        self.signing_pub_pem = signing_key.public_key().public_bytes(
            _PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.host_cert_lifetime = host_cert_lifetime
        self.backdate = backdate
        self.tokens: dict[str, str] = {}  # token → host; removed when used
        self.streams: list[StreamRecord] = []
        self.renewals = 0
        self.cond = threading.Condition()

    def _peer_cert(self, context: grpc.ServicerContext) -> x509.Certificate:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a host certificate is needed")
            raise AssertionError("abort() raises")
        return x509.load_pem_x509_certificate(pems[0])

    def Enroll(self, request: node_pb2.EnrollRequest,  # noqa: N802 (gRPC's name)
               context: grpc.ServicerContext) -> node_pb2.EnrollResponse:
        with self.cond:
            host = self.tokens.pop(request.token, None)
        if host is None or host != request.host:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "enrollment token unknown or used")
            raise AssertionError("abort() raises")
        csr = x509.load_pem_x509_csr(request.csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return node_pb2.EnrollResponse(
            certificate_pem=self.ca.host_certificate(public_key, host,
                                                     lifetime=self.host_cert_lifetime,
                                                     backdate=self.backdate),
            ca_pem=self.ca.pem, signing_public_key_pem=self.signing_pub_pem,
            trust_domain=TRUST_DOMAIN, spiffe_id=f"spiffe://{TRUST_DOMAIN}/host/{host}")

    def RenewCertificate(self, request: node_pb2.RenewCertificateRequest,  # noqa: N802
                         context: grpc.ServicerContext) -> node_pb2.RenewCertificateResponse:
        peer = self._peer_cert(context)
        host = str(peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        public_key = x509.load_pem_x509_csr(request.csr_pem).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        with self.cond:
            self.renewals += 1
            self.cond.notify_all()
        return node_pb2.RenewCertificateResponse(
            certificate_pem=self.ca.host_certificate(public_key, host, lifetime=3600.0))

    def StreamGrants(self, request_iterator: Iterator[node_pb2.GrantStreamRequest],  # noqa: N802
                     context: grpc.ServicerContext) -> Iterator[node_pb2.GrantStreamResponse]:
        peer = self._peer_cert(context)
        record = StreamRecord(peer.serial_number)
        with self.cond:
            self.streams.append(record)
            self.cond.notify_all()
        context.add_callback(lambda: record.outbox.put(None))

        def read() -> None:
            try:
                for request in request_iterator:
                    with self.cond:
                        if request.HasField("subscribe"):
                            record.subscribe = request.subscribe
                        else:
                            answer = request.ack if request.HasField("ack") else request.nack
                            record.answers[answer.nonce] = request
                        self.cond.notify_all()
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        while (item := record.outbox.get()) is not None:
            yield item

    # --- the test's side ---------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("fake controller: condition not reached in time")
                self.cond.wait(remaining)

    def subscribed(self, timeout: float = 30.0, after: int = 0) -> StreamRecord:
        """The first stream (index ≥ ``after``) whose Subscribe has arrived."""
        def ready() -> bool:
            return any(s.subscribe is not None for s in self.streams[after:])
        self.wait(ready, timeout)
        with self.cond:
            return next(s for s in self.streams[after:] if s.subscribe is not None)

    def push(self, stream: StreamRecord, envelope: bytes, version: int, nonce: str,
             timeout: float = 30.0) -> node_pb2.GrantStreamRequest:
        """Send one bundle and return the daemon's Ack or Nack for it."""
        stream.outbox.put(node_pb2.GrantStreamResponse(version=version, nonce=nonce,
                                                       envelope=envelope))
        self.wait(lambda: nonce in stream.answers, timeout)
        return stream.answers[nonce]


class FakeController:
    """The fake NodeService on two loopback ports, as gRPC Python cannot make a client
    certificate optional on one: ``address`` requires a host certificate (mutual TLS),
    ``enroll_address`` requests none (for Enroll)."""

    def __init__(self, *, host_cert_lifetime: float = 3600.0, backdate: float = 5.0,
                 also_present: bytes = b"") -> None:
        self.ca = TestCA()
        self.signing_key = Ed25519PrivateKey.generate()
        self.service = FakeNodeService(self.ca, self.signing_key, host_cert_lifetime, backdate)
        key_pem, chain_pem = self.ca.server_credentials()
        chain_pem += also_present  # e.g. someone else's (public) CA, as an impostor would
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        node_pb2_grpc.add_NodeServiceServicer_to_server(self.service, self.server)
        for require in (True, False):
            credentials = grpc.ssl_server_credentials([(key_pem, chain_pem)],
                                                      root_certificates=self.ca.pem,
                                                      require_client_auth=require)
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
            if require:
                self.address = f"127.0.0.1:{port}"
            else:
                self.enroll_address = f"127.0.0.1:{port}"

    def token(self, host: str) -> str:
        token = f"tok-{host}-{time.monotonic_ns()}"
        with self.service.cond:
            self.service.tokens[token] = host
        return token

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self.service.cond:
            for stream in self.service.streams:
                stream.outbox.put(None)
        self.server.stop(grace=None).wait(10)
