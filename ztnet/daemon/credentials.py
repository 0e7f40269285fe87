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

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztnet.errors import ConfigError, ControllerError
from ztnet.fsutil import FileTooLarge, read_bounded, replace_atomic
from ztnet.pki import (
    MAX_PEM_BYTES,
    issued_by,
    not_after,
    not_before,
    private_key_pem,
    same_public_key,
    uri_sans,
)

KEY_FILE = "host.key"
CERT_FILE = "host.pem"
CA_FILE = "ca.pem"
SIGNING_KEY_FILE = "signing.pub"
IDENTITY_FILE = "identity.json"
# Renew once this fraction of the certificate's lifetime has passed: leaves the other half
# for retries while the controller is away.
RENEW_FRACTION = 0.5


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


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ControllerError(f"enroll: {what} is not a PEM certificate: {exc}") from None


def build_csr(key: ec.EllipticCurvePrivateKey, host: str) -> bytes:
    """A CSR naming the host; the controller decides the SAN (its trust domain)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def check_host_certificate(cert: x509.Certificate, ca: x509.Certificate,
                           key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> None:
    """Refuse a host certificate we must not present: not from our CA, not for our key,
    not naming our SPIFFE id, or not valid now."""
    if not issued_by(cert, ca):
        raise ControllerError("enroll: the host certificate was not issued by the pinned CA")
    if not same_public_key(cert, key):
        raise ControllerError("enroll: the host certificate is not for this host's key")
    if spiffe_id not in uri_sans(cert):
        raise ControllerError(f"enroll: the host certificate does not name {spiffe_id} "
                              f"(it names {uri_sans(cert) or 'nothing'})")
    now = time.time()
    if not not_before(cert) <= now + 300 or not_after(cert) <= now:
        raise ControllerError("enroll: the host certificate is not valid now (clock skew?)")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Crash-safe replace with the final mode from creation on (a key is never
    world-readable, not even between create and chmod)."""
    try:
        replace_atomic(path, data, mode)
    except OSError as exc:
        raise ConfigError(f"daemon: cannot write {path}: {exc.strerror or exc}") from None


def _read(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_PEM_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"daemon: {path} is missing; enroll first (`ztnet enroll`)") from None
    except OSError as exc:
        raise ConfigError(f"daemon: cannot read {path}: {exc.strerror}") from None
    except FileTooLarge:
        raise ConfigError(f"daemon: {path} is too large") from None


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
    def not_after(self) -> float:
        return not_after(self.cert)

    def renew_at(self) -> float:
        """Unix time past which the daemon asks for a new certificate: half-way through its
        lifetime, counted from when we received it. Certificates are backdated for clock skew
        (the controller backdates 5 minutes), so counting from not_before would make a
        certificate shorter-lived than its backdating due for renewal the moment it
        arrives, again and again."""
        start = max(not_before(self.cert), min(self.received_at, time.time()))
        end = not_after(self.cert)
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
