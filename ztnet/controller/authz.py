"""Who is calling, from the verified TLS peer certificate, and may they.

The mutual-TLS listener makes the handshake verify the client's chain and
validity against the CA; this module then reads the one SPIFFE id in the
certificate's SAN and applies the rules:

    no certificate                       → UNAUTHENTICATED
    expired, revoked, not signed by CA   → UNAUTHENTICATED
    another trust domain                 → PERMISSION_DENIED
    wrong kind (host ↔ admin ↔ other)    → PERMISSION_DENIED

"A host acts only about itself" is checked by the node service, which knows
what each request is about (``Peer.require_self``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ztnet import pki
from ztnet.controller import ca, status
from ztnet.controller.store import Store
from ztnet.text import format_time

_HOW_TO_GET = {
    "host": "a host certificate (`ztnet enroll`)",
    "admin": "an admin certificate (`ztnet controller admin-cert`)",
    "controller": "the controller's certificate",
}


@dataclass(frozen=True, slots=True)
class Peer:
    identity: pki.SpiffeId
    serial: int
    not_after: float

    @property
    def name(self) -> str:
        return self.identity.name

    def require_self(self, host: str, field: str) -> None:
        if host != self.identity.name:
            raise status.denied(f"{field}: {self.identity.uri} may act only for host "
                                f"{self.identity.name}, not {host}")


class Authorizer:
    def __init__(self, store: Store, authority: ca.Authority,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.authority = authority
        self.trust_domain = store.trust_domain()
        self.clock = clock

    def require(self, context: Any, kind: pki.Kind) -> Peer:
        """The caller, if it holds a valid certificate of ``kind``."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise status.unauthenticated(
                f"no client certificate: this RPC needs {_HOW_TO_GET[kind]}, presented over "
                "the controller's mutual-TLS address")
        peer = self.identify(pems[0])
        if peer.identity.trust_domain != self.trust_domain:
            raise status.denied(f"{peer.identity.uri} is not in trust domain "
                                f"{self.trust_domain}")
        if peer.identity.kind != kind:
            article = "an" if peer.identity.kind == "admin" else "a"
            raise status.denied(f"{peer.identity.uri} is {article} {peer.identity.kind} "
                                f"certificate; this RPC needs {_HOW_TO_GET[kind]}")
        self.check_valid(peer)
        return peer

    def identify(self, pem: bytes) -> Peer:
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise status.unauthenticated("the client certificate cannot be parsed") from None
        if not ca.signed_by(cert, self.authority):
            raise status.unauthenticated("the client certificate was not issued by this "
                                         "controller's CA")
        try:
            identity = pki.certificate_identity(cert)
        except ValueError as exc:
            raise status.denied(f"the client certificate is not a ztnet identity: {exc}") \
                from None
        return Peer(identity, cert.serial_number, pki.not_after(cert))

    def check_valid(self, peer: Peer) -> None:
        """Expiry and revocation; also re-checked during long streams."""
        if peer.not_after <= self.clock():
            raise status.unauthenticated(f"the certificate of {peer.identity.uri} expired at "
                                         f"{format_time(peer.not_after)}")
        if self.store.certificate_revoked(peer.serial):
            raise status.unauthenticated(f"the certificate of {peer.identity.uri} (serial "
                                         f"{peer.serial:x}) has been revoked")
