"""TPM attestation at enrollment and renewal: the controller's side (the host's is
``ztnet.identity.tpm``; what is signed is ``ztnet.identity.tpmproof``).

    BeginAttestation  the host shows its EK (public area, and certificate if it has one)
                      and a fresh AK. The EK must chain to a configured EK CA or have its
                      hash on the allowlist. The controller makes a credential (in software:
                      TPM2_MakeCredential) that only a TPM holding that EK *and* an object
                      with the AK's name can open, and remembers it (one use, 60 s).
    Enroll            the host answers with the opened secret, a TPM2_Certify by the AK over
                      its enrollment key with the secret as qualifying data, the enrollment
                      key's public area, and the enrollment key's signature over (host,
                      secret, CSR public key). Checked: the secret; the attestation's magic,
                      type, extraData and certified name; the AK's signature; the key's
                      attributes (fixedTPM, fixedParent, sensitiveDataOrigin, sign); the CSR
                      binding. The AK is restricted: only a TPM-generated structure can carry
                      its signature, so the attributes are the TPM's word, not the host's.
    Renew             a TPM-bound host asks for a nonce (BeginRenewal) and signs (SPIFFE id,
                      nonce, CSR public key) with the enrollment key on record; a copy of
                      its state directory without the TPM cannot.

Everything here comes from an unauthenticated or hostile peer: sizes are bounded before
parsing, every parse or verification failure becomes INVALID_ARGUMENT or PERMISSION_DENIED
naming the field, and nothing is stored before the whole proof holds.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from ztnet import pki
from ztnet.controller import status
from ztnet.errors import ConfigError, TpmError
from ztnet.fsutil import FileTooLarge, read_bounded
from ztnet.identity import tpmproof
from ztnet.identity.tpm import bindings as tpm_bindings
from ztnet.v1 import node_pb2

CHALLENGE_TTL = 60.0
MAX_PENDING = 1024
# per token (attestation) or host (renewal): enough for retries, and one token holder
# cannot take every pending slot
MAX_PENDING_EACH = 4
MAX_PUBLIC_BYTES = 1024      # a TPMT_PUBLIC: RSA 4096 is ~ 600 bytes
MAX_ATTEST_BYTES = 1024      # TPMS_ATTEST (TPM2B_ATTEST is at most 1024 by definition)
MAX_SIGNATURE_BYTES = 1024   # TPMT_SIGNATURE
MAX_EK_CERT_BYTES = 8192
MAX_CREDENTIAL_BYTES = 1024
ATTESTATION_TPM = "tpm"
ATTESTATION_SOFTWARE = "software"

_TPM_GENERATED = 0xFF544347
_ST_ATTEST_CERTIFY = 0x8017
_ALG_RSA, _ALG_ECC, _ALG_SHA256, _ALG_ECDSA = 0x0001, 0x0023, 0x000B, 0x0018
_ECC_NIST_P256 = 0x0003
# What tpm2-pytss and cryptography raise on malformed input (and, where libtss2-mu
# parses, TSS2_Exception): ValueError, TypeError, OverflowError, UnsupportedAlgorithm, and
# lookups of unknown algorithm ids (KeyError, IndexError). Caught only around calls that
# touch the peer's bytes, and always answered with the field's name.
_MALFORMED: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError, KeyError,
                                           IndexError, UnsupportedAlgorithm)
# TPMA_OBJECT bits TPM 2.0 defines (fixedTPM, stClear, fixedParent, sensitiveDataOrigin,
# userWithAuth, adminWithPolicy, noDA, encryptedDuplication, restricted, decrypt, sign,
# x509sign); a TPM never makes an object with any other bit set
_DEFINED_ATTRIBUTES = 0x000F0CF6
_UNVERIFIABLE: tuple[type[Exception], ...] = (InvalidSignature, *_MALFORMED)
_EK_ATTRIBUTES = (tpmproof.FIXED_TPM | tpmproof.FIXED_PARENT
                  | tpmproof.SENSITIVE_DATA_ORIGIN | tpmproof.RESTRICTED | tpmproof.DECRYPT)


def _tss() -> Any:
    try:
        return tpm_bindings()
    except TpmError:
        raise status.precondition("attestation: this controller cannot verify TPM "
                                  "attestation (python3-tpm2-pytss is not installed)") from None


@dataclass(frozen=True, slots=True)
class EkTrust:
    """Which TPMs may enroll: EKs certified by one of ``cas`` (manufacturers' EK CAs,
    intermediates included: each is trusted as an issuer), or whose hash is listed."""

    cas: tuple[x509.Certificate, ...] = ()
    allowed: frozenset[str] = frozenset()

    @property
    def configured(self) -> bool:
        return bool(self.cas or self.allowed)

    @classmethod
    def load(cls, ca_files: Iterable[Path], allowlist: Path | None) -> EkTrust:
        cas: list[x509.Certificate] = []
        for path in ca_files:
            try:
                cas.extend(_pem_certificates(read_bounded(path, 1024 * 1024)))
            except (OSError, FileTooLarge) as exc:
                raise ConfigError(f"controller: cannot read --tpm-ek-ca {path}: {exc}") from None
            except ValueError as exc:
                raise ConfigError(f"controller: --tpm-ek-ca {path}: not PEM certificates: "
                                  f"{exc}") from None
        allowed: set[str] = set()
        if allowlist is not None:
            try:
                text = read_bounded(allowlist, 1024 * 1024).decode()
            except (OSError, FileTooLarge, UnicodeDecodeError) as exc:
                raise ConfigError(f"controller: cannot read --tpm-ek-allowlist {allowlist}: "
                                  f"{exc}") from None
            for number, line in enumerate(text.splitlines(), 1):
                entry = line.split("#", 1)[0].strip().lower()
                if not entry:
                    continue
                digest = entry.removeprefix("sha256:")
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ConfigError(f"controller: --tpm-ek-allowlist {allowlist}:{number}: "
                                      "want sha256:<64 hex digits> (`ztnet hosts` shows it)")
                allowed.add("sha256:" + digest)
        return cls(tuple(cas), frozenset(allowed))


@dataclass(frozen=True, slots=True)
class Attested:
    """A TPM proof that held: what the controller records for the host."""

    ek_hash: str
    key_public: bytes  # the enrollment key's TPMT_PUBLIC


@dataclass(slots=True)
class _Challenge:
    host: str
    token_digest: str
    ek_hash: str
    ak_public: bytes
    secret: bytes
    expires_at: float


@dataclass(slots=True)
class _Nonce:
    spiffe_id: str
    expires_at: float


@dataclass
class Attestation:
    trust: EkTrust
    clock: Callable[[], float]
    ttl: float = CHALLENGE_TTL
    max_pending: int = MAX_PENDING
    _challenges: dict[bytes, _Challenge] = field(default_factory=dict)
    _nonces: dict[bytes, _Nonce] = field(default_factory=dict)

    # --- enrollment --------------------------------------------------------------------

    def begin(self, host: str, token_digest: str,
              request: node_pb2.BeginAttestationRequest) -> node_pb2.BeginAttestationResponse:
        """Check the EK, and challenge it (the token was checked, not used, by the caller)."""
        if request.version != tpmproof.PROTOCOL_VERSION:
            raise status.invalid("version", f"TPM attestation version {request.version} is "
                                 f"not supported (this controller speaks "
                                 f"{tpmproof.PROTOCOL_VERSION})")
        if not self.trust.configured:
            raise status.precondition("attestation: this controller trusts no TPM (start "
                                      "it with --tpm-ek-ca or --tpm-ek-allowlist)")
        tss = _tss()
        ek = _public(tss, request.ek_public, "ek_public")
        _require(ek.objectAttributes, _EK_ATTRIBUTES, "ek_public", "an endorsement key")
        if int(ek.type) != _ALG_RSA:
            raise status.invalid("ek_public", "only RSA endorsement keys are supported")
        ek_spki = _spki(ek, "ek_public")
        digest = tpmproof.ek_hash(ek_spki)
        self._check_ek(request.ek_certificate, ek_spki, digest)
        ak = _public(tss, request.ak_public, "ak_public")
        _require_p256_signer(ak, tpmproof.AK_ATTRIBUTES, "ak_public", "an attestation key")
        self._expire()
        mine = [key for key, c in self._challenges.items() if c.token_digest == token_digest]
        for old in mine[:max(0, len(mine) - MAX_PENDING_EACH + 1)]:  # the oldest make room
            del self._challenges[old]
        if len(self._challenges) >= self.max_pending:
            raise status.exhausted("attestation: too many attestations in progress; try "
                                   "again shortly")
        secret = secrets.token_bytes(tpmproof.SECRET_BYTES)
        try:
            blob, encrypted = tss.utils.make_credential(ek, secret, ak.get_name())
        except (*_MALFORMED, tss.TSS2_Exception) as exc:
            raise status.invalid("ek_public", f"cannot make a credential for it: {exc}") from None
        challenge_id = secrets.token_bytes(16)
        self._challenges[challenge_id] = _Challenge(
            host, token_digest, digest, bytes(request.ak_public), secret,
            self.clock() + self.ttl)
        return node_pb2.BeginAttestationResponse(
            version=tpmproof.PROTOCOL_VERSION, challenge_id=challenge_id,
            credential_blob=bytes(blob), encrypted_secret=bytes(encrypted),
            expires_in_seconds=self.ttl)

    def _check_ek(self, cert_der: bytes, ek_spki: bytes, digest: str) -> None:
        if digest in self.trust.allowed:
            return
        if not cert_der:
            raise status.denied(f"attestation: EK {digest} is not on the allowlist and the "
                                "host sent no EK certificate")
        if len(cert_der) > MAX_EK_CERT_BYTES:
            raise status.invalid("ek_certificate", f"larger than {MAX_EK_CERT_BYTES} bytes")
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert_spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        except _MALFORMED as exc:
            raise status.invalid("ek_certificate", f"not a DER certificate: {exc}") from None
        if cert_spki != ek_spki:
            raise status.invalid("ek_certificate", "certifies another key than ek_public")
        try:
            signed = any(pki.issued_by(cert, ca) for ca in self.trust.cas)
        except _MALFORMED as exc:  # e.g. an unknown signature algorithm
            raise status.invalid("ek_certificate", f"cannot check its signature: {exc}") \
                from None
        if not signed:
            raise status.denied(f"attestation: the EK certificate (issuer "
                                f"{cert.issuer.rfc4514_string()[:200]!r}) is not signed by "
                                f"a configured EK CA, and EK {digest} is not on the allowlist")
        now = self.clock()
        if not pki.not_before(cert) <= now < pki.not_after(cert):
            raise status.denied("attestation: the EK certificate is not valid now")

    def verify(self, host: str, token_digest: str, proof: node_pb2.TpmAttestation,
               csr_spki: bytes) -> Attested:
        """The host's answer to its challenge; the challenge is used up whatever happens."""
        self._expire()
        challenge = self._challenges.pop(bytes(proof.challenge_id), None)
        if challenge is None:
            raise status.denied("attestation: unknown, expired or already used challenge "
                                "(call BeginAttestation again)")
        if challenge.host != host or challenge.token_digest != token_digest:
            raise status.denied("attestation: the challenge was made for another host or token")
        if not hmac.compare_digest(bytes(proof.activated_secret), challenge.secret):
            raise status.denied("attestation: credential activation failed (the secret does "
                                "not match: the AK and the EK are not in the same TPM)")
        tss = _tss()
        ak = _public(tss, challenge.ak_public, "ak_public")
        key = _public(tss, proof.enrollment_key_public, "enrollment_key_public")
        _require_p256_signer(key, tpmproof.ENROLLMENT_KEY_ATTRIBUTES, "enrollment_key_public",
                             "a non-exportable enrollment key")
        attest = _bounded(proof.certify_info, MAX_ATTEST_BYTES, "certify_info")
        _verify(tss, ak, proof.certify_signature, _sha256(attest), "certify_signature",
                "the AK")
        info = _unmarshal(tss, tss.TPMS_ATTEST, attest, "certify_info")
        if int(info.magic) != _TPM_GENERATED:
            raise status.invalid("certify_info", "magic is not TPM_GENERATED_VALUE")
        if int(info.type) != _ST_ATTEST_CERTIFY:
            raise status.invalid("certify_info", f"type 0x{int(info.type):04x} is not "
                                 "TPM_ST_ATTEST_CERTIFY")
        if not hmac.compare_digest(bytes(info.extraData), challenge.secret):
            raise status.denied("attestation: certify_info was not made for this challenge "
                                "(extraData is not the activated secret: replayed?)")
        if bytes(info.attested.certify.name) != bytes(key.get_name()):
            raise status.invalid("certify_info", "certifies another key than "
                                 "enrollment_key_public")
        _verify(tss, key, proof.csr_signature, tpmproof.csr_binding(host, challenge.secret,
                                                                     csr_spki),
                "csr_signature", "the enrollment key (the CSR's key is not the one bound)")
        return Attested(challenge.ek_hash, bytes(proof.enrollment_key_public))

    # --- renewal -----------------------------------------------------------------------

    def renewal_nonce(self, spiffe_id: str) -> bytes:
        self._expire()
        mine = [n for n, v in self._nonces.items() if v.spiffe_id == spiffe_id]
        for old in mine[:max(0, len(mine) - MAX_PENDING_EACH + 1)]:  # the oldest make room
            del self._nonces[old]
        if len(self._nonces) >= self.max_pending:
            raise status.exhausted("attestation: too many renewals in progress; try again "
                                   "shortly")
        nonce = secrets.token_bytes(tpmproof.NONCE_BYTES)
        self._nonces[nonce] = _Nonce(spiffe_id, self.clock() + self.ttl)
        return nonce

    def verify_renewal(self, spiffe_id: str, key_public: bytes, nonce: bytes,
                       signature: bytes, csr_spki: bytes) -> None:
        self._expire()
        issued = self._nonces.pop(bytes(nonce), None)
        if issued is None or issued.spiffe_id != spiffe_id:
            raise status.denied("attestation: renewal of a TPM-bound host needs a fresh "
                                "nonce from BeginRenewal (unknown, expired or used)")
        tss = _tss()
        key = _public(tss, key_public, "the enrolled key")
        _verify(tss, key, signature, tpmproof.renewal_binding(spiffe_id, nonce, csr_spki),
                "tpm_signature", "this host's enrollment key (its TPM)")

    def _expire(self) -> None:
        now = self.clock()
        for table in (self._challenges, self._nonces):
            for key in [k for k, v in table.items() if v.expires_at <= now]:
                del table[key]


def _pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (cryptography 38 reads one at a time)."""
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in data.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise ValueError("no certificate found")
    return [x509.load_pem_x509_certificate(block.strip()) for block in blocks]


# --- parsing and checking TPM structures ----------------------------------------------

def _bounded(data: bytes, limit: int, name: str) -> bytes:
    if not data:
        raise status.invalid(name, "must be set")
    if len(data) > limit:
        raise status.invalid(name, f"larger than {limit} bytes")
    return bytes(data)


def _unmarshal(tss: Any, kind: Any, data: bytes, name: str) -> Any:
    try:
        value, used = kind.unmarshal(data)
    except (*_MALFORMED, tss.TSS2_Exception) as exc:
        raise status.invalid(name, f"not a {kind.__name__}: {exc}") from None
    if used != len(data):
        raise status.invalid(name, f"{len(data) - used} bytes after the {kind.__name__}")
    return value


def _public(tss: Any, data: bytes, name: str) -> Any:
    area = _unmarshal(tss, tss.TPMT_PUBLIC, _bounded(data, MAX_PUBLIC_BYTES, name), name)
    if int(area.nameAlg) != _ALG_SHA256:
        raise status.invalid(name, "nameAlg must be SHA-256")
    if int(area.objectAttributes) & ~_DEFINED_ATTRIBUTES:
        raise status.invalid(name, f"reserved attribute bits are set "
                             f"(0x{int(area.objectAttributes):08x})")
    return area


def _require(attributes: Any, wanted: int, name: str, what: str) -> None:
    bits = int(attributes)
    if bits & wanted != wanted:
        raise status.denied(f"attestation: {name} is not {what}: it lacks "
                            f"{tpmproof.describe_attributes(wanted & ~bits)} (has "
                            f"{tpmproof.describe_attributes(bits)})")


def _require_p256_signer(area: Any, wanted: int, name: str, what: str) -> None:
    _require(area.objectAttributes, wanted, name, what)
    if int(area.objectAttributes) & tpmproof.DECRYPT:
        raise status.denied(f"attestation: {name} is not {what}: it may also decrypt")
    if int(area.type) != _ALG_ECC or \
            int(area.parameters.eccDetail.curveID) != _ECC_NIST_P256 or \
            int(area.parameters.eccDetail.scheme.scheme) != _ALG_ECDSA or \
            int(area.parameters.eccDetail.scheme.details.ecdsa.hashAlg) != _ALG_SHA256:
        raise status.invalid(name, "must be an ECDSA P-256 / SHA-256 key")


def _spki(area: Any, name: str) -> bytes:
    try:
        key = serialization.load_pem_public_key(bytes(area.to_pem()))
    except _MALFORMED as exc:
        raise status.invalid(name, f"not a usable public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise status.invalid(name, "RSA keys must have at least 2048 bits")
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(tss: Any, signer: Any, signature: bytes, digest: bytes, name: str,
            who: str) -> None:
    """An ECDSA-SHA256 TPMT_SIGNATURE by ``signer`` (a checked P-256 TPMT_PUBLIC) over the
    SHA-256 ``digest``."""
    parsed = _unmarshal(tss, tss.TPMT_SIGNATURE,
                        _bounded(signature, MAX_SIGNATURE_BYTES, name), name)
    if int(parsed.sigAlg) != _ALG_ECDSA or int(parsed.signature.ecdsa.hash) != _ALG_SHA256:
        raise status.invalid(name, "must be an ECDSA / SHA-256 signature")
    r = int.from_bytes(bytes(parsed.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(parsed.signature.ecdsa.signatureS), "big")
    try:
        key = serialization.load_pem_public_key(bytes(signer.to_pem()))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an EC key")
        key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except _UNVERIFIABLE:
        raise status.denied(f"attestation: {name} is not a valid signature by {who}") from None


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()
