"""ztnet.pki: one owner for SPIFFE ids, fingerprints and issuer checks."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztnet import pki
from ztnet.controller import ca

T0 = 1_700_000_000.0


def test_every_spiffe_id_is_built_one_way() -> None:
    assert pki.spiffe_agent_id("a.example", "bot") == "spiffe://a.example/agent/bot"
    assert pki.spiffe_id("a.example", "host", "web-1").uri == "spiffe://a.example/host/web-1"
    assert pki.spiffe_id("a.example", "controller").uri == "spiffe://a.example/controller"


@pytest.mark.parametrize("uri", ["spiffe://a.example/agent/bot", "https://a.example/host/x",
                                 "spiffe://a.example/host", "spiffe://a.example/admin/a/b"])
def test_a_certificate_never_names_anything_but_controller_host_or_admin(uri: str) -> None:
    with pytest.raises(ValueError, match="spiffe"):
        pki.parse_spiffe_id(uri)


@pytest.mark.parametrize("text", ["AB:" * 31 + "AB", "sha256:" + "ab" * 32, " " + "0f" * 32])
def test_fingerprints_are_accepted_in_the_usual_spellings(text: str) -> None:
    assert len(pki.normalize_fingerprint(text)) == 64


@pytest.mark.parametrize("text", ["ab" * 31, "zz" * 32, ""])
def test_a_fingerprint_that_is_not_a_sha256_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        pki.normalize_fingerprint(text)


def test_issuer_checks_tell_our_ca_from_another() -> None:
    ours = ca.create_authority("a.example", now=T0)
    other = ca.create_authority("a.example", now=T0)  # same name, different key
    key = pki.new_tls_key()
    leaf = ca.issue(ours, key.public_key(), pki.spiffe_id("a.example", "host", "web-1"),
                    now=T0, lifetime=3600)
    assert pki.issued_by(leaf, ours.cert) and not pki.issued_by(leaf, other.cert)
    assert pki.is_ca(ours.cert) and not pki.is_ca(leaf)
    assert pki.same_public_key(leaf, key)
    assert not pki.same_public_key(leaf, ec.generate_private_key(ec.SECP256R1()))
    assert pki.certificate_identity(leaf) == pki.spiffe_id("a.example", "host", "web-1")
    assert pki.not_before(leaf) < T0 < pki.not_after(leaf) == T0 + 3600
    assert pki.fingerprint(ours.cert) == ours.fingerprint != pki.fingerprint(other.cert)
