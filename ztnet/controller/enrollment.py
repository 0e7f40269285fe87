"""One-time enrollment tokens, and host certificates (issue and renew).

A token is 32 random bytes (URL-safe base64) that exists only on the
operator's screen and the host's command line: the database keeps its
SHA-256 (a token has 256 bits of entropy, so a plain hash cannot be
brute-forced), the host it is for and its expiry. Using it is one SQL
transaction, so two hosts racing with one token cannot both win.

Token failures: unknown, expired or already used → UNAUTHENTICATED (the
token proves nothing); a valid token for another host → PERMISSION_DENIED.

TPM enrollment (``ztnet.controller.attestation``): BeginAttestation checks the
token without using it and challenges the host's TPM; Enroll with the answer
uses the token and records the host as "tpm" with its EK hash and enrollment
key, which every later renewal must sign with. A token made with
``require_tpm`` refuses a software enrollment (PERMISSION_DENIED, the token
stays unused). One TPM is one host: an EK bound to another enrolled host is
refused until that host is revoked.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztnet import pki
from ztnet.controller import ca, status
from ztnet.controller.attestation import ATTESTATION_SOFTWARE, ATTESTATION_TPM, Attestation
from ztnet.controller.store import HostBinding, Store, TokenStatus
from ztnet.grants.payload import normalize_host
from ztnet.policy.selectors import check_labels
from ztnet.v1 import node_pb2

Clock = Callable[[], float]

DEFAULT_TOKEN_TTL = 15 * 60.0
# Short: a host's certificate is what a copy of its state directory is worth, and a
# TPM-bound host cannot renew without its TPM.
DEFAULT_HOST_CERT_TTL = 3600.0
_REFUSALS = {
    TokenStatus.UNKNOWN: "the enrollment token is not valid",
    TokenStatus.USED: "the enrollment token was already used (tokens work once)",
    TokenStatus.EXPIRED: "the enrollment token has expired (create a new one)",
}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, host: str, *, ttl: float, now: float,
                 require_tpm: bool = False, labels: Mapping[str, str] | None = None) -> str:
    """A new one-time token for ``host``, valid for ``ttl`` seconds; ``require_tpm``: it
    only enrolls a host that proves a TPM-resident key; ``labels``: the enrolled host's
    labels (host selectors, docs/policy.md)."""
    name = check_host(host, "host")
    try:
        checked = check_labels(labels or {})
    except ValueError as exc:
        raise status.invalid("labels", str(exc)) from None
    # A fixed prefix: a URL-safe token may start with "-", which command
    # lines then take for an option (`ztnet enroll --token -x…`).
    token = "zt1-" + secrets.token_urlsafe(32)
    store.add_token(token_digest(token), name, now, now + ttl, require_tpm=require_tpm,
                    labels=checked)
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
    attestation: str = ATTESTATION_SOFTWARE


class Enrollment:
    def __init__(self, store: Store, authority: ca.Authority, *,
                 host_cert_ttl: float = DEFAULT_HOST_CERT_TTL, clock: Clock,
                 attestation: Attestation | None = None) -> None:
        self.store = store
        self.authority = authority
        self.trust_domain = store.trust_domain()
        self.host_cert_ttl = host_cert_ttl
        self.clock = clock
        self.attestation = attestation

    def begin_attestation(self, request: node_pb2.BeginAttestationRequest
                          ) -> node_pb2.BeginAttestationResponse:
        name = check_host(request.host, "host")
        if not request.token:
            raise status.invalid("token", "must be set")
        if self.attestation is None:
            raise status.precondition("attestation: this controller does not verify TPMs "
                                      "(start it with --tpm-ek-ca or --tpm-ek-allowlist)")
        digest = token_digest(request.token)
        _check_outcome(self.store.check_token(digest, name, self.clock()), name)
        return self.attestation.begin(name, digest, request)

    def enroll(self, token: str, host: str, csr_pem: bytes,
               tpm: node_pb2.TpmAttestation | None = None) -> Issued:
        """Check everything that costs nothing first, then the TPM proof (if any), then use
        the token, then sign. Re-enrolling a host revokes its earlier certificates."""
        name = check_host(host, "host")
        public_key = _csr_key(csr_pem)
        if not token:
            raise status.invalid("token", "must be set")
        binding = None
        if tpm is not None:
            if self.attestation is None:
                raise status.precondition("attestation: this controller does not verify TPMs")
            attested = self.attestation.verify(name, token_digest(token), tpm,
                                               _spki(public_key))
            holder = self.store.host_with_ek(attested.ek_hash)
            if holder is not None and holder != name:
                raise status.denied(f"attestation: this TPM ({attested.ek_hash}) is enrolled "
                                    f"as host {holder}; revoke that host first")
            binding = HostBinding(ATTESTATION_TPM, attested.ek_hash, attested.key_public)
        now = self.clock()
        digest = token_digest(token)
        _check_outcome(self.store.consume_token(digest, name, now,
                                                attested=binding is not None), name)
        identity = pki.spiffe_id(self.trust_domain, "host", name)
        issued = self._issue(public_key, identity, now, replace_older=True)
        self.store.enroll_host(name, identity.uri, now, binding=binding,
                               labels=self.store.token_labels(digest))
        return Issued(issued.cert, identity,
                      ATTESTATION_TPM if binding is not None else ATTESTATION_SOFTWARE)

    def renewal_nonce(self, identity: pki.SpiffeId) -> bytes:
        """A nonce for a TPM-bound host's next renewal; empty for a software host."""
        binding = self.store.host_binding(identity.name)
        if binding is None or binding.attestation != ATTESTATION_TPM:
            return b""
        return self._attestation().renewal_nonce(identity.uri)

    def renew(self, identity: pki.SpiffeId, csr_pem: bytes, nonce: bytes = b"",
              tpm_signature: bytes = b"") -> Issued:
        """A fresh certificate for an authenticated host; the identity comes
        from the certificate it called with, never from the CSR. A TPM-bound host
        must sign the request with its enrollment key."""
        public_key = _csr_key(csr_pem)
        binding = self.store.host_binding(identity.name)
        if binding is not None and binding.attestation == ATTESTATION_TPM:
            self._attestation().verify_renewal(identity.uri, binding.enrollment_key, nonce,
                                               tpm_signature, _spki(public_key))
        elif binding is not None and binding.attestation != ATTESTATION_SOFTWARE:
            raise status.denied(f"attestation: host {identity.name}'s TPM binding was "
                                "revoked; it must enroll again")
        return self._issue(public_key, identity, self.clock(), replace_older=False)

    def _attestation(self) -> Attestation:
        if self.attestation is None:
            raise status.precondition("attestation: this host is TPM-bound but the controller "
                                      "was started without TPM trust (--tpm-ek-ca or "
                                      "--tpm-ek-allowlist)")
        return self.attestation

    def _issue(self, public_key: ca.PublicKey, identity: pki.SpiffeId, now: float, *,
               replace_older: bool) -> Issued:
        cert = ca.issue(self.authority, public_key, identity, now=now,
                        lifetime=self.host_cert_ttl)
        self.store.record_certificate(cert.serial_number, identity.uri, now, pki.not_after(cert),
                                      replace_older=replace_older)
        return Issued(cert, identity)


def _check_outcome(outcome: TokenStatus, name: str) -> None:
    if outcome is TokenStatus.WRONG_HOST:
        raise status.denied(f"the enrollment token is not for host {name}")
    if outcome is TokenStatus.TPM_REQUIRED:
        raise status.denied("the enrollment token requires TPM attestation (`ztnet enroll "
                            "--tpm`): software enrollment refused; the token is still unused")
    if outcome is not TokenStatus.ACCEPTED:
        raise status.unauthenticated(_REFUSALS[outcome])


def _spki(public_key: ca.PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _csr_key(csr_pem: bytes) -> ca.PublicKey:
    try:
        return ca.csr_public_key(csr_pem)
    except ValueError as exc:
        raise status.invalid("csr_pem", str(exc)) from None
