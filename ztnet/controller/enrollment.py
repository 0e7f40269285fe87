"""One-time enrollment tokens, and host certificates (issue and renew).

A token is 32 random bytes (URL-safe base64) that exists only on the
operator's screen and the host's command line: the database keeps its
SHA-256 (a token has 256 bits of entropy, so a plain hash cannot be
brute-forced), the host it is for and its expiry. Using it is one SQL
transaction, so two hosts racing with one token cannot both win.

Token failures: unknown, expired or already used → UNAUTHENTICATED (the
token proves nothing); a valid token for another host → PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from ztnet import pki
from ztnet.controller import ca, status
from ztnet.controller.store import Store, TokenStatus
from ztnet.grants.payload import normalize_host

Clock = Callable[[], float]

DEFAULT_TOKEN_TTL = 15 * 60.0
DEFAULT_HOST_CERT_TTL = 24 * 3600.0
_REFUSALS = {
    TokenStatus.UNKNOWN: "the enrollment token is not valid",
    TokenStatus.USED: "the enrollment token was already used (tokens work once)",
    TokenStatus.EXPIRED: "the enrollment token has expired (create a new one)",
}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, host: str, *, ttl: float, now: float) -> str:
    """A new one-time token for ``host``, valid for ``ttl`` seconds."""
    name = check_host(host, "host")
    # A fixed prefix: a URL-safe token may start with "-", which command
    # lines then take for an option (`ztnet enroll --token -x…`).
    token = "zt1-" + secrets.token_urlsafe(32)
    store.add_token(token_digest(token), name, now, now + ttl)
    return token


def check_host(host: str, field: str) -> str:
    try:
        return normalize_host(host)
    except ValueError as exc:
        raise status.invalid(field, str(exc)) from None


@dataclass(frozen=True, slots=True)
class Issued:
    cert: x509.Certificate
    identity: pki.SpiffeId


class Enrollment:
    def __init__(self, store: Store, authority: ca.Authority, *,
                 host_cert_ttl: float = DEFAULT_HOST_CERT_TTL, clock: Clock) -> None:
        self.store = store
        self.authority = authority
        self.trust_domain = store.trust_domain()
        self.host_cert_ttl = host_cert_ttl
        self.clock = clock

    def enroll(self, token: str, host: str, csr_pem: bytes) -> Issued:
        """Check everything that costs nothing first, then use the token, then
        sign. Re-enrolling a host revokes its earlier certificates."""
        name = check_host(host, "host")
        public_key = _csr_key(csr_pem)
        if not token:
            raise status.invalid("token", "must be set")
        now = self.clock()
        outcome = self.store.consume_token(token_digest(token), name, now)
        if outcome is TokenStatus.WRONG_HOST:
            raise status.denied(f"the enrollment token is not for host {name}")
        if outcome is not TokenStatus.ACCEPTED:
            raise status.unauthenticated(_REFUSALS[outcome])
        identity = pki.spiffe_id(self.trust_domain, "host", name)
        issued = self._issue(public_key, identity, now, replace_older=True)
        self.store.enroll_host(name, identity.uri, now)
        return issued

    def renew(self, identity: pki.SpiffeId, csr_pem: bytes) -> Issued:
        """A fresh certificate for an authenticated host; the identity comes
        from the certificate it called with, never from the CSR."""
        return self._issue(_csr_key(csr_pem), identity, self.clock(), replace_older=False)

    def _issue(self, public_key: ca.PublicKey, identity: pki.SpiffeId, now: float, *,
               replace_older: bool) -> Issued:
        cert = ca.issue(self.authority, public_key, identity, now=now,
                        lifetime=self.host_cert_ttl)
        self.store.record_certificate(cert.serial_number, identity.uri, now, pki.not_after(cert),
                                      replace_older=replace_older)
        return Issued(cert, identity)


def _csr_key(csr_pem: bytes) -> ca.PublicKey:
    try:
        return ca.csr_public_key(csr_pem)
    except ValueError as exc:
        raise status.invalid("csr_pem", str(exc)) from None
