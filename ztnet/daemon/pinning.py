"""Trust on first use, done safely: find the controller's CA by its fingerprint.

Before enrollment a host trusts nothing but the SHA-256 fingerprint the operator gave it.
So it opens one TLS connection *without* verification, only to read the certificate chain
the controller presents (the controller serves its leaf and its CA), and looks for the
certificate with that fingerprint. Only when it is there, is a CA, and signed the leaf that
was presented, does the host trust it; the enrollment token is then sent over a new gRPC
channel that verifies the controller against exactly that CA. A wrong fingerprint, a
man in the middle or a controller that does not present its CA end the enrollment before
the token leaves the host.

Reading the unverified chain needs ``SSLSocket._sslobj.get_unverified_chain()`` (private in
Python 3.11, public as ``SSLSocket.get_unverified_chain()`` from 3.13).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztnet.errors import ConfigError, ControllerError
from ztnet.pki import fingerprint, is_ca, issued_by


@dataclass(frozen=True, slots=True)
class PinnedCA:
    ca: x509.Certificate
    # The name the controller's leaf is verified against from now on (see server_name_for).
    server_name: str

    @property
    def ca_pem(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.PEM)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"controller: bad address {address!r} (want HOST:PORT)")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def presented_chain(address: str, timeout: float) -> list[x509.Certificate]:
    """The certificates the server sends in its handshake, unverified, leaf first."""
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only read the chain; nothing is sent on it
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])  # what a gRPC server expects to negotiate
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ControllerError(f"enroll: cannot reach the controller at {address}: "
                              f"{exc.strerror or exc}") from None
    try:
        with context.wrap_socket(raw, server_hostname=None if _is_ip(host) else host) as tls:
            sslobj: Any = tls._sslobj  # type: ignore[attr-defined]
            chain = sslobj.get_unverified_chain() or []
            ders = [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain]  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError) as exc:
        raise ControllerError(f"enroll: TLS handshake with {address} failed: {exc}") from None
    finally:
        raw.close()
    return [x509.load_der_x509_certificate(der) for der in ders]


def server_name_for(leaf: x509.Certificate, dialled: str) -> str:
    """The name to verify the controller's leaf against: "" (the dialled host) when the
    leaf names it; otherwise the leaf's first DNS name, so a controller reached through an
    address its certificate does not list (NAT, a lab namespace) still verifies by name.
    Host certificates carry only a spiffe:// URI, so no host can pass as the controller."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ControllerError("enroll: the controller's certificate has no subject "
                              "alternative name to verify it by") from None
    dns = san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    if dialled in dns or (_is_ip(dialled) and str(ipaddress.ip_address(dialled)) in ips):
        return ""
    if dns:
        return dns[0]
    raise ControllerError(f"enroll: the controller's certificate names neither {dialled} "
                          "nor any DNS name")


def pin_controller_ca(address: str, expected: str, timeout: float = 10.0) -> PinnedCA:
    """The controller's CA, if it is the one with fingerprint ``expected`` (hex SHA-256)."""
    chain = presented_chain(address, timeout)
    if not chain:
        raise ControllerError(f"enroll: {address} presented no certificate")
    matches = [cert for cert in chain if fingerprint(cert) == expected]
    if not matches:
        seen = ", ".join(fingerprint(cert)[:16] + "…" for cert in chain)
        raise ControllerError(
            f"enroll: the controller at {address} did not present the CA with fingerprint "
            f"{expected[:16]}… (it presented {seen}); not sending the token")
    ca, leaf = matches[0], chain[0]
    if not is_ca(ca):
        raise ControllerError("enroll: the certificate with that fingerprint is not a CA")
    if leaf != ca and not issued_by(leaf, ca):
        raise ControllerError("enroll: the controller's certificate was not issued by the "
                              "pinned CA; not sending the token")
    return PinnedCA(ca, server_name_for(leaf, split_address(address)[0]))
