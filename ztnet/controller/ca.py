"""The controller's certificate authority for mutual TLS (X.509, ECDSA P-256).

Every certificate names exactly one SPIFFE id in its URI SAN (``controller``,
``host/<name>`` or ``admin/<name>``; the shapes and the parsing live in
``ztnet.pki``), and that id is the only thing authorization looks at
(``ztnet.controller.authz``).

Grant signing (Ed25519) is a different key and a different concern: it lives
in ``ztnet.grants``. A CSR contributes only its public key: the subject and
any SAN it asks for are ignored, so a host cannot ask to be someone else.
P-256 is used because gRPC's BoringSSL handles it everywhere, including the
Node.js client.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztnet.errors import ConfigError
from ztnet.pki import MAX_PEM_BYTES, SpiffeId, fingerprint, issued_by, new_tls_key, not_after

CA_LIFETIME = 10 * 365 * 86400.0
SERVER_LIFETIME = 365 * 86400.0
# Backdating absorbs clock skew between controller and hosts, so a fresh
# certificate is not "not yet valid" on a host whose clock is a little behind.
BACKDATE = 300.0
MIN_RSA_BITS = 2048
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class Authority:
    """The CA: its key signs every certificate the controller hands out."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


def create_authority(trust_domain: str, *, now: float) -> Authority:
    key = new_tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ztnet CA {trust_domain}")])
    usage = _key_usage(cert_sign=True)
    cert = (
        _builder(name, name, key.public_key(), now, CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def load_authority(key_pem: bytes, cert_pem: bytes) -> Authority:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"controller: cannot load the CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("controller: the CA key is not an ECDSA key")
    return Authority(key, cert)


def issue(
    authority: Authority,
    public_key: PublicKey,
    identity: SpiffeId,
    *,
    now: float,
    lifetime: float,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> x509.Certificate:
    """A leaf for ``identity``: serverAuth for the controller, clientAuth for
    hosts and admins (so a host certificate cannot serve as the controller).
    Never valid beyond the CA itself."""
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if identity.kind == "controller" else (
        ExtendedKeyUsageOID.CLIENT_AUTH)
    label = f"{identity.kind}/{identity.name}" if identity.name else identity.kind
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label[:64])])
    lifetime = min(lifetime, not_after(authority.cert) - now)
    ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, authority.cert.subject, public_key, now, lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(authority.key, hashes.SHA256())
    )


def csr_public_key(csr_pem: bytes) -> PublicKey:
    """The public key of a CSR whose self-signature verifies (proof that the
    requester holds the private key). ValueError names what is wrong."""
    if not csr_pem:
        raise ValueError("is empty")
    if len(csr_pem) > MAX_PEM_BYTES:
        raise ValueError(f"is larger than {MAX_PEM_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"is not a PEM certificate signing request: {exc}") from None
    try:
        # the key first: an undecodable key makes is_signature_valid raise
        # cryptography's InternalError (and leave OpenSSL's error queue dirty)
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as exc:
        raise ValueError(f"has a public key that cannot be decoded: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError, InternalError):
        valid = False
    if not valid:
        raise ValueError("has an invalid signature (it must be signed with its own key)")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise ValueError(f"uses curve {key.curve.name}; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"has a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS}")
        return key
    raise ValueError("has an unsupported key type; use ECDSA P-256")


def signed_by(cert: x509.Certificate, authority: Authority) -> bool:
    """True if the CA's key signed ``cert``: checked on top of the TLS
    handshake's own verification, so a listener configured without client
    verification could never let an unsigned certificate through."""
    return issued_by(cert, authority.cert)


def split_sans(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--san`` values → (DNS names, IP addresses)."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return tuple(dns), tuple(ips)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    now: float,
    lifetime: float,
) -> x509.CertificateBuilder:
    start = datetime.datetime.fromtimestamp(now - BACKDATE, datetime.UTC).replace(tzinfo=None)
    end = datetime.datetime.fromtimestamp(now + lifetime, datetime.UTC).replace(tzinfo=None)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
