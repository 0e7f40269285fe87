"""What a TPM-bound host proves, defined once for both ends (host: ``identity.tpm``,
controller: ``controller.attestation``).

The enrollment key is an unrestricted signing key (it has to sign our digests), so every
digest it signs starts with a ztnet label and names its purpose: a signature made for a
renewal can never pass as one for an enrollment, and none of them can be a TPM attestation
(those are only accepted from the restricted AK, which refuses to sign anything that starts
with TPM_GENERATED). Each field is length-prefixed, so no two different inputs give the
same byte string.
"""

from __future__ import annotations

import hashlib

PROTOCOL_VERSION = 1
# A persistent handle in the owner range (0x81000000-0x817FFFFF): "zt" and key number 1.
DEFAULT_HANDLE = 0x81017A01
SECRET_BYTES = 32
NONCE_BYTES = 32

# TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3)
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
RESTRICTED = 0x00010000
DECRYPT = 0x00020000
SIGN = 0x00040000
# What makes a key impossible to copy out of its TPM: it cannot be duplicated (fixedTPM,
# fixedParent) and its private part was generated inside the TPM (sensitiveDataOrigin).
NON_EXPORTABLE = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN
ENROLLMENT_KEY_ATTRIBUTES = NON_EXPORTABLE | USER_WITH_AUTH | SIGN
AK_ATTRIBUTES = NON_EXPORTABLE | USER_WITH_AUTH | RESTRICTED | SIGN

_CSR_LABEL = b"ztnet-tpm-csr-v1"
_RENEW_LABEL = b"ztnet-tpm-renew-v1"


def _frame(*fields: bytes) -> bytes:
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def csr_binding(host: str, secret: bytes, spki_der: bytes) -> bytes:
    """SHA-256 the enrollment key signs at enrollment: this host's name, the activated
    credential secret (fresh, one use) and the CSR's public key (DER SubjectPublicKeyInfo)."""
    return hashlib.sha256(_frame(_CSR_LABEL, host.encode(), secret, spki_der)).digest()


def renewal_binding(spiffe_id: str, nonce: bytes, spki_der: bytes) -> bytes:
    """SHA-256 the enrollment key signs for each renewal: the host's SPIFFE id, the
    controller's renewal nonce and the public key the new certificate is for."""
    return hashlib.sha256(_frame(_RENEW_LABEL, spiffe_id.encode(), nonce, spki_der)).digest()


def ek_hash(ek_spki_der: bytes) -> str:
    """The identity of a TPM as the controller records it: SHA-256 of its EK public key."""
    return "sha256:" + hashlib.sha256(ek_spki_der).hexdigest()


def describe_attributes(bits: int) -> str:
    names = [("fixedTPM", FIXED_TPM), ("fixedParent", FIXED_PARENT),
             ("sensitiveDataOrigin", SENSITIVE_DATA_ORIGIN), ("userWithAuth", USER_WITH_AUTH),
             ("restricted", RESTRICTED), ("decrypt", DECRYPT), ("sign", SIGN)]
    return "|".join(name for name, bit in names if bits & bit) or "none"
