"""X.509 and SPIFFE helpers shared by the controller's CA and the host's credentials.

The one owner of what a SPIFFE id looks like and how a certificate is checked:

    spiffe://<trust-domain>/controller        the controller's server certificate
    spiffe://<trust-domain>/host/<name>       an enrolled host (short-lived, renewed)
    spiffe://<trust-domain>/admin/<name>      an operator's admin credential
    spiffe://<trust-domain>/agent/<name>      an agent (named in grants, never in a certificate)

Issuing certificates is the controller's (``ztnet.controller.ca``); keeping them is the
host's (``ztnet.daemon.credentials``). Grant signing (Ed25519) is a different concern and
lives in ``ztnet.grants``. Functions here raise ``ValueError``; callers translate it into
their own ``ZtnetError`` so the message names the subsystem.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

Kind = Literal["controller", "host", "admin", "agent"]
# The kinds a certificate may name: agents are identified by their cgroup, not by a key.
CERTIFICATE_KINDS: tuple[Kind, ...] = ("controller", "host", "admin")
SCHEME = "spiffe://"
# The largest PEM file (certificate, CSR, TLS key) either side reads or accepts.
MAX_PEM_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed ``spiffe://<trust_domain>/<kind>[/<name>]``."""

    trust_domain: str
    kind: Kind
    name: str

    @property
    def uri(self) -> str:
        suffix = f"/{self.name}" if self.name else ""
        return f"{SCHEME}{self.trust_domain}/{self.kind}{suffix}"


def spiffe_id(trust_domain: str, kind: Kind, name: str = "") -> SpiffeId:
    return SpiffeId(trust_domain, kind, name)


def spiffe_agent_id(trust_domain: str, agent: str) -> str:
    """The URI grants are issued to: ``spiffe://<trust_domain>/agent/<agent>``."""
    return SpiffeId(trust_domain, "agent", agent).uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """ValueError unless ``uri`` is one of the certificate shapes (controller, host, admin)."""
    rest = uri.removeprefix(SCHEME)
    if rest == uri:
        raise ValueError(f"{uri!r} is not a spiffe:// URI")
    domain, _, path = rest.partition("/")
    kind, _, name = path.partition("/")
    if not domain or kind not in CERTIFICATE_KINDS or "/" in name:
        raise ValueError(f"{uri!r} is not a ztnet SPIFFE id")
    if (kind == "controller") != (name == ""):
        raise ValueError(f"{uri!r}: only the controller id has no name")
    return SpiffeId(domain, kind, name)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI in the certificate's subject alternative name (none if it has no SAN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def certificate_identity(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE id a certificate names; ValueError otherwise."""
    try:
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no subject alternative name") from None
    uris = [uri for uri in uri_sans(cert) if uri.startswith(SCHEME)]
    if len(uris) != 1:
        raise ValueError(f"the certificate names {len(uris)} SPIFFE ids; exactly one is needed")
    return parse_spiffe_id(uris[0])


# --- fingerprints ------------------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER encoding: what `controller token create` prints and hosts pin
    at enrollment."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``ab:cd:…``, upper case and a ``sha256:`` prefix; return 64 hex digits.
    ValueError if it is not a SHA-256."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError("must be a SHA-256 (64 hex digits)")
    return cleaned


# --- issuer checks -----------------------------------------------------------------------


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key signed ``cert`` (cryptography 38 has no helper for this).
    Checked on top of a TLS handshake's own verification wherever it matters, so a
    listener configured without client verification never lets an unsigned certificate
    through."""
    if cert.issuer != issuer.subject:
        return False
    public = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and algorithm is not None:
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey) and algorithm is not None:
            public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                          algorithm)
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def not_before(cert: x509.Certificate) -> float:
    """Unix time the certificate becomes valid (cryptography 38 returns naive UTC)."""
    return cert.not_valid_before.replace(tzinfo=datetime.UTC).timestamp()


def not_after(cert: x509.Certificate) -> float:
    """Unix time the certificate expires (cryptography 38 returns naive UTC)."""
    return cert.not_valid_after.replace(tzinfo=datetime.UTC).timestamp()


# --- keys --------------------------------------------------------------------------------


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 key: gRPC's BoringSSL handles it everywhere."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
