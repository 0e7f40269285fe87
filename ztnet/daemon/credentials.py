"""A host's credentials from enrollment, kept in its state directory (0700):

    host.key       ECDSA P-256 private key (0600), generated on the host and never sent
    host.pem       the host certificate (SAN spiffe://<trust-domain>/host/<name>); the
                   daemon renews it over the authenticated channel
    ca.pem         the controller's CA, pinned by its SHA-256 fingerprint at enrollment
    signing.pub    the controller's Ed25519 grant-signing public key (the daemon's trust)
    identity.json  host, trust domain, SPIFFE id, enrollment address, TLS server name

Every certificate the controller hands out is checked here before it is stored: issued
by the pinned CA, for our key, naming our SPIFFE id. Renewal keeps the key, so a renewed
certificate replaces exactly one file with one rename and a crash can never leave a key
and a certificate that do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from ztnet.errors import ConfigError, ControllerError

KEY_FILE = "host.key"
CERT_FILE = "host.pem"
CA_FILE = "ca.pem"
SIGNING_KEY_FILE = "signing.pub"
IDENTITY_FILE = "identity.json"
# Renew once this fraction of the certificate's lifetime has passed: leaves the other half
# for retries while the controller is away.
RENEW_FRACTION = 0.5
MAX_PEM = 64 * 1024


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this host is, as the controller certified it at enrollment."""

    host: str
    trust_domain: str
    spiffe_id: str
    # The controller's enrollment address (its server-authenticated listener); the daemon
    # is told the mutual-TLS address with --controller.
    enrolled_via: str
    # The name the controller's certificate is checked against (gRPC's target name
    # override); empty: the host part of the address dialled.
    server_name: str = ""


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER encoding: what `controller token create` prints."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``ab:cd:…``, upper case and a ``sha256:`` prefix; return 64 hex digits."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ConfigError("enroll: --ca-fingerprint must be a SHA-256 (64 hex digits)")
    return cleaned


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ControllerError(f"enroll: {what} is not a PEM certificate: {exc}") from None


def generate_host_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def build_csr(key: ec.EllipticCurvePrivateKey, host: str) -> bytes:
    """A CSR naming the host; the controller decides the SAN (its trust domain)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key signed ``cert`` (cryptography 38 has no helper for this)."""
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


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def check_host_certificate(cert: x509.Certificate, ca: x509.Certificate,
                           key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> None:
    """Refuse a host certificate we must not present: not from our CA, not for our key,
    not naming our SPIFFE id, or not valid now."""
    if not issued_by(cert, ca):
        raise ControllerError("enroll: the host certificate was not issued by the pinned CA")
    if not _same_key(cert, key):
        raise ControllerError("enroll: the host certificate is not for this host's key")
    if spiffe_id not in uri_sans(cert):
        raise ControllerError(f"enroll: the host certificate does not name {spiffe_id} "
                              f"(it names {uri_sans(cert) or 'nothing'})")
    now = time.time()
    if not _not_before(cert) <= now + 300 or _not_after(cert) <= now:
        raise ControllerError("enroll: the host certificate is not valid now (clock skew?)")


def _not_before(cert: x509.Certificate) -> float:
    return cert.not_valid_before.replace(tzinfo=UTC).timestamp()


def _not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after.replace(tzinfo=UTC).timestamp()


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomic replace with the final mode from creation on (a key is never world-readable,
    not even between create and chmod)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM + 1)
    except FileNotFoundError:
        raise ConfigError(f"daemon: {path} is missing; enroll first (`ztnet enroll`)") from None
    except OSError as exc:
        raise ConfigError(f"daemon: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_PEM:
        raise ConfigError(f"daemon: {path} is too large")
    return data


class HostCredentials:
    """The files above, loaded and checked together."""

    def __init__(self, state: Path) -> None:
        self.state = state
        raw = _read(state / IDENTITY_FILE)
        try:
            self.identity = Identity(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"daemon: {state / IDENTITY_FILE} is corrupt: {exc}") from None
        self.key_pem = _read(state / KEY_FILE)
        self.ca_pem = _read(state / CA_FILE)
        self.cert_pem = _read(state / CERT_FILE)
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"daemon: {state / KEY_FILE}: cannot load: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"daemon: {state / KEY_FILE} is not an ECDSA key")
        self.key = key
        self.ca = load_certificate(self.ca_pem, str(state / CA_FILE))
        self.cert = load_certificate(self.cert_pem, str(state / CERT_FILE))
        # When we got the certificate (the file is replaced whenever a new one arrives)
        self.received_at = (state / CERT_FILE).stat().st_mtime

    @property
    def signing_key_path(self) -> Path:
        return self.state / SIGNING_KEY_FILE

    @property
    def not_after(self) -> float:
        return _not_after(self.cert)

    def renew_at(self) -> float:
        """Unix time past which the daemon asks for a new certificate: half-way through its
        lifetime, counted from when we received it. Certificates are backdated for clock skew
        (the controller backdates 5 minutes), so counting from not_before would make a
        certificate shorter-lived than its backdating due for renewal the moment it
        arrives, again and again."""
        start = max(_not_before(self.cert), min(self.received_at, time.time()))
        end = _not_after(self.cert)
        return start + max(0.0, end - start) * RENEW_FRACTION

    def csr(self) -> bytes:
        return build_csr(self.key, self.identity.host)

    def store_certificate(self, pem: bytes) -> None:
        """Check a renewed certificate and make it the one we present."""
        cert = load_certificate(pem, "the renewed certificate")
        check_host_certificate(cert, self.ca, self.key, self.identity.spiffe_id)
        write_file(self.state / CERT_FILE, pem, 0o644)
        self.cert_pem, self.cert, self.received_at = pem, cert, time.time()


def store_enrollment(state: Path, identity: Identity, key: ec.EllipticCurvePrivateKey,
                     cert_pem: bytes, ca_pem: bytes, signing_pub_pem: bytes) -> None:
    """Write every file of a fresh enrollment; identity.json last, as the commit point
    (a directory without it is not enrolled and may be enrolled again)."""
    write_file(state / KEY_FILE, private_key_pem(key), 0o600)
    write_file(state / CA_FILE, ca_pem, 0o644)
    write_file(state / SIGNING_KEY_FILE, signing_pub_pem, 0o644)
    write_file(state / CERT_FILE, cert_pem, 0o644)
    write_file(state / IDENTITY_FILE,
               (json.dumps(asdict(identity), indent=2) + "\n").encode(), 0o644)


def is_enrolled(state: Path) -> bool:
    return (state / IDENTITY_FILE).exists()


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """What `ztnet daemon --controller` takes from the enrolled state directory."""

    host: str
    trust_domain: str
    signing_key: Path


def controller_settings(state: Path, *, host: str | None,
                        bundle: Path | None) -> ControllerSettings:
    if bundle is not None:
        raise ConfigError("daemon: --bundle and --controller exclude each other: the "
                          "controller is the only source of grants")
    if not is_enrolled(state):
        raise ConfigError(f"daemon: {state} holds no enrollment; run `ztnet enroll "
                          f"--state {state} …` first")
    identity = HostCredentials(state).identity
    if host is not None and host.lower().removesuffix(".") != identity.host:
        raise ConfigError(f"daemon: --host {host} differs from the enrolled host "
                          f"{identity.host}")
    return ControllerSettings(identity.host, identity.trust_domain, state / SIGNING_KEY_FILE)
