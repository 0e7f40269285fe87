"""Hosts of a test controller (ztnet.testing.controller): enrolled identities, and a fake
node that speaks the grant stream by hand.

    identity = enroll(controller, "web-1")
    with FakeNode(controller, identity) as node:
        push = node.next_push()
        bundle = node.verify(push)
        node.ack(push)
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ztnet.grants.bundle import VerifiedBundle, verify_bundle
from ztnet.grants.keys import key_id, load_public_key
from ztnet.testing.controller import ControllerProcess, create_token
from ztnet.v1 import node_pb2, node_pb2_grpc


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What Enroll returned to one host, with the key that never left it."""

    host: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    signing_pub_pem: bytes
    spiffe_id: str
    trust_domain: str

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, common_name: str,
             sans: Sequence[x509.GeneralName] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def enroll(controller: ControllerProcess, host: str, token: str | None = None,
           csr_pem: bytes | None = None, key: ec.EllipticCurvePrivateKey | None = None,
           ) -> HostIdentity:
    """Enroll ``host`` over the enrollment listener (a token is created if
    none is given); raises grpc.RpcError if the controller refuses."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = node_pb2.EnrollRequest(
        token=token if token is not None else create_token(controller.state, host),
        host=host, csr_pem=csr_pem or make_csr(key, host))
    with controller.channel(enroll=True) as channel:
        reply = node_pb2_grpc.NodeServiceStub(channel).Enroll(request, timeout=10)
    return HostIdentity(host, private_pem(key), reply.certificate_pem, reply.ca_pem,
                        reply.signing_public_key_pem, reply.spiffe_id, reply.trust_domain)


@dataclass(frozen=True, slots=True)
class Push:
    version: int
    nonce: str
    envelope: bytes


class FakeNode:
    """A daemon stand-in on the grant stream: Subscribe on open, then the
    test reads pushes and answers them itself. ``subscribe_as`` lets a test
    subscribe for another host than the certificate names."""

    def __init__(self, controller: ControllerProcess, identity: HostIdentity, *,
                 version_held: int = 0, subscribe_as: str | None = None) -> None:
        self.identity = identity
        self._channel = controller.channel(key_pem=identity.key_pem, cert_pem=identity.cert_pem)
        self._outgoing: queue.Queue[node_pb2.GrantStreamRequest | None] = queue.Queue()
        self._incoming: queue.Queue[Push | BaseException | None] = queue.Queue()
        self._outgoing.put(node_pb2.GrantStreamRequest(subscribe=node_pb2.Subscribe(
            host=subscribe_as or identity.host, version_held=version_held)))
        self._call = node_pb2_grpc.NodeServiceStub(self._channel).StreamGrants(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _requests(self) -> Iterator[node_pb2.GrantStreamRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self._incoming.put(Push(response.version, response.nonce, response.envelope))
            self._incoming.put(None)
        except grpc.RpcError as exc:
            self._incoming.put(exc)

    def next_push(self, timeout: float = 10.0) -> Push:
        item = self._incoming.get(timeout=timeout)
        if not isinstance(item, Push):
            raise AssertionError(f"the stream ended instead of pushing: {item!r}")
        return item

    def no_push_within(self, seconds: float) -> bool:
        try:
            item = self._incoming.get(timeout=seconds)
        except queue.Empty:
            return True
        self._incoming.put(item)
        return False

    def ended(self, timeout: float = 10.0) -> grpc.RpcError | None:
        """Wait for the stream to end (skipping pushes): its error, or None if it
        ended cleanly."""
        deadline = time.monotonic() + timeout
        while True:
            item = self._incoming.get(timeout=max(0.01, deadline - time.monotonic()))
            if not isinstance(item, Push):
                return item if isinstance(item, grpc.RpcError) else None

    def ack(self, push: Push) -> None:
        self._outgoing.put(node_pb2.GrantStreamRequest(
            ack=node_pb2.Ack(version=push.version, nonce=push.nonce)))

    def nack(self, push: Push, reason: str) -> None:
        self._outgoing.put(node_pb2.GrantStreamRequest(
            nack=node_pb2.Nack(version=push.version, nonce=push.nonce, reason=reason)))

    def send(self, request: node_pb2.GrantStreamRequest) -> None:
        self._outgoing.put(request)

    def verify(self, push: Push, min_version: int = 0) -> VerifiedBundle:
        """Verify as a daemon would: signature by the key Enroll returned,
        audience this host, trust domain pinned, fresh."""
        with tempfile.NamedTemporaryFile(suffix=".pub") as pub:
            pub.write(self.identity.signing_pub_pem)
            pub.flush()
            key = load_public_key(pub.name)
        return verify_bundle(push.envelope, trusted={key_id(key): key},
                             host=self.identity.host, min_version=min_version, now=time.time(),
                             trust_domain=self.identity.trust_domain)

    def close(self) -> None:
        self._outgoing.put(None)
        self._call.cancel()
        self._channel.close()
        self._reader.join(timeout=5)
