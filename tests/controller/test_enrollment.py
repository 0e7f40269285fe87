"""Enrollment logic with an injected clock (token expiry without sleeping), on both
Store backends, and the CA underneath it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.controller.backends import Backend
from ztnet import pki
from ztnet.controller import ca
from ztnet.controller.enrollment import Enrollment, create_token, token_digest
from ztnet.controller.store import Store
from ztnet.errors import RpcFailure
from ztnet.testing.nodes import make_csr

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def authority() -> ca.Authority:
    return ca.create_authority("test.example", now=T0)


def csr() -> bytes:
    return make_csr(ec.generate_private_key(ec.SECP256R1()), "whatever")


def refused(call: object, code: grpc.StatusCode, text: str) -> None:
    assert callable(call)
    with pytest.raises(RpcFailure) as excinfo:
        call()
    assert excinfo.value.code is code
    assert text in str(excinfo.value)


def test_a_token_expires_on_time(store: Store, authority: ca.Authority) -> None:
    clock = Clock(T0)
    enrollment = Enrollment(store, authority, clock=clock)
    early = create_token(store, "web-1", ttl=900, now=T0)
    late = create_token(store, "web-1", ttl=900, now=T0)
    clock.now = T0 + 899.9
    enrollment.enroll(early, "web-1", csr())
    clock.now = T0 + 900
    refused(lambda: enrollment.enroll(late, "web-1", csr()), grpc.StatusCode.UNAUTHENTICATED,
            "expired")


def test_the_token_is_stored_only_as_a_hash(store: Store, backend: Backend,
                                            tmp_path: Path) -> None:
    token = create_token(store, "web-1", ttl=60, now=T0)
    assert len(token) >= 43  # 32 random bytes
    stored = backend.rows(store, "SELECT * FROM tokens")
    assert token not in repr(stored) and token_digest(token) in repr(stored)
    if backend.name == "sqlite":  # nor anywhere in the file
        raw = (tmp_path / "ztnet.db").read_bytes() + (tmp_path / "ztnet.db-wal").read_bytes()
        assert token.encode() not in raw
        assert token_digest(token).encode() in raw


def test_host_names_are_normalized_and_checked(store: Store,
                                               authority: ca.Authority) -> None:
    enrollment = Enrollment(store, authority, clock=Clock(T0))
    token = create_token(store, "Web-1.", ttl=60, now=T0)
    issued = enrollment.enroll(token, "WEB-1", csr())
    assert issued.identity.uri == "spiffe://test.example/host/web-1"
    refused(lambda: create_token(store, "no spaces", ttl=60, now=T0),
            grpc.StatusCode.INVALID_ARGUMENT, "host: ")
    refused(lambda: enrollment.enroll("", "web-2", csr()), grpc.StatusCode.INVALID_ARGUMENT,
            "token: must be set")


def test_host_certificates_are_short_lived_client_certificates(
        store: Store, authority: ca.Authority) -> None:
    enrollment = Enrollment(store, authority, host_cert_ttl=3600, clock=Clock(T0))
    issued = enrollment.enroll(create_token(store, "web-1", ttl=60, now=T0), "web-1", csr())
    cert = issued.cert
    assert pki.not_after(cert) == T0 + 3600
    assert ca.signed_by(cert, authority)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.certificate_identity(cert) == pki.spiffe_id("test.example", "host", "web-1")


def test_weak_or_odd_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="1024-bit"):
        ca.csr_public_key(make_csr(weak, "x"))
    odd = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ValueError, match="P-256"):
        ca.csr_public_key(make_csr(odd, "x"))
    with pytest.raises(ValueError, match="larger than"):
        ca.csr_public_key(b"x" * (pki.MAX_PEM_BYTES + 1))


def test_a_certificate_never_outlives_its_ca(authority: ca.Authority) -> None:
    key = pki.new_tls_key()
    cert = ca.issue(authority, key.public_key(), pki.spiffe_id("test.example", "admin", "a"),
                    now=T0, lifetime=100 * 365 * 86400.0)
    assert pki.not_after(cert) == pki.not_after(authority.cert)


def test_another_ca_did_not_sign(authority: ca.Authority) -> None:
    other = ca.create_authority("test.example", now=T0)
    cert = ca.issue(other, pki.new_tls_key().public_key(),
                    pki.spiffe_id("test.example", "admin", "a"), now=T0, lifetime=60)
    assert not ca.signed_by(cert, authority) and ca.signed_by(cert, other)


@pytest.mark.parametrize("uri", [
    "https://test.example/host/a", "spiffe://test.example/agent/a",
    "spiffe://test.example/host", "spiffe://test.example/controller/x",
    "spiffe://test.example/host/a/b",
])
def test_only_ztnet_spiffe_ids_parse(uri: str) -> None:
    with pytest.raises(ValueError):
        pki.parse_spiffe_id(uri)


def test_spiffe_ids_round_trip() -> None:
    for identity in (pki.spiffe_id("a.example", "controller"),
                     pki.spiffe_id("a.example", "host", "web-1"),
                     pki.spiffe_id("a.example", "admin", "alice")):
        assert pki.parse_spiffe_id(identity.uri) == identity
