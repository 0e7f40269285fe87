"""DSSE-style signed envelopes.

    {"payloadType": "...", "payload": "<base64>",
     "signatures": [{"keyid": "<64 hex>", "sig": "<base64>"}]}

The signature is Ed25519 over the DSSE pre-authentication encoding
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, so
the payload type is signed too and a payload cannot be replayed as another
type. Everything in the envelope is attacker-controlled until a signature has
been checked, so parsing is strict and bounded, every failure is a GrantError
subclass, and the payload bytes are handed out only after verification.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ztnet.errors import BundleRejected, ConfigError, SignatureInvalid, UnknownKey
from ztnet.grants import strictjson
from ztnet.grants.keys import key_id
from ztnet.grants.limits import (
    MAX_ENVELOPE_BYTES,
    MAX_ENVELOPE_STRUCTURE,
    MAX_PAYLOAD_TYPE,
    MAX_SIGNATURES,
    structure_count,
)

ED25519_SIGNATURE_BYTES = 64
ENVELOPE_KEYS = frozenset({"payloadType", "payload", "signatures"})
SIGNATURE_KEYS = frozenset({"keyid", "sig"})
_KEY_ID_RE = re.compile(r"[0-9a-f]{64}\Z")

TrustedKeys = Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]


@dataclass(frozen=True, slots=True)
class VerifiedPayload:
    """Payload bytes whose signature checked out, and who signed them."""

    payload_type: str
    payload: bytes
    key_id: str


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding; lengths are byte counts."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, private_key: Ed25519PrivateKey) -> bytes:
    signature = private_key.sign(pae(payload_type, payload))
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {
                "keyid": key_id(private_key.public_key()),
                "sig": base64.b64encode(signature).decode("ascii"),
            }
        ],
    }
    return strictjson.dumps(envelope)


def trusted_key_map(trusted: TrustedKeys) -> dict[str, Ed25519PublicKey]:
    """Key ids are always recomputed from the keys themselves: a mapping whose
    id does not match its key is a configuration error, not an alias."""
    if isinstance(trusted, Mapping):
        result: dict[str, Ed25519PublicKey] = {}
        for claimed, key in trusted.items():
            actual = key_id(key)
            if claimed != actual:
                raise ConfigError(f"bundle: trusted key listed as {claimed} has key id {actual}")
            result[actual] = key
        return result
    return {key_id(key): key for key in trusted}


def verify_envelope(data: bytes, *, trusted: TrustedKeys,
                    payload_type: str | frozenset[str]) -> VerifiedPayload:
    """Check size, shape, signer and signature, then the payload type (one, or any of a
    set: the caller dispatches on ``VerifiedPayload.payload_type``); return the payload.
    Raises BundleRejected (malformed, wrong type), UnknownKey or SignatureInvalid."""
    keys = trusted_key_map(trusted)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise BundleRejected(
            f"bundle: envelope is {len(data)} bytes, more than the limit of {MAX_ENVELOPE_BYTES}"
        )
    # Count before parsing: a parser turns 3 bytes of "{}," into a 64-byte dict.
    if structure_count(data, stop_above=MAX_ENVELOPE_STRUCTURE) > MAX_ENVELOPE_STRUCTURE:
        raise BundleRejected(
            "bundle: envelope has more JSON structure than a signed envelope can have "
            f"(more than {MAX_ENVELOPE_STRUCTURE} of {{ [ , :); refused before parsing"
        )
    claimed_type, payload, signatures = _parse(data)
    message = pae(claimed_type, payload)
    signer = None
    for keyid, signature in signatures:
        key = keys.get(keyid)
        if key is None:
            continue
        try:
            key.verify(signature, message)  # Ed25519, whatever the message claims
        except InvalidSignature:
            raise SignatureInvalid(
                f"bundle: signature by key {keyid} does not verify; the bundle was altered "
                "or signed with a different key"
            ) from None
        signer = keyid
        break
    if signer is None:
        listed = ", ".join(keyid for keyid, _ in signatures)
        trusted_ids = ", ".join(sorted(keys)) or "none"
        raise UnknownKey(f"bundle: signed by untrusted key {listed} (trusted: {trusted_ids})")
    accepted = {payload_type} if isinstance(payload_type, str) else payload_type
    if claimed_type not in accepted:
        expected = " or ".join(repr(kind) for kind in sorted(accepted))
        raise BundleRejected(f"bundle: payload type {claimed_type!r} is not {expected}")
    return VerifiedPayload(claimed_type, payload, signer)


def _parse(data: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    try:
        document = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise BundleRejected(f"bundle: envelope: {exc}") from None
    obj = _object(document, ENVELOPE_KEYS, "envelope")
    payload_type = obj["payloadType"]
    # A media type: printable ASCII. Anything else (a lone surrogate cannot even
    # be encoded for the PAE) is refused here, before it reaches the verifier.
    if not isinstance(payload_type, str) or not 0 < len(payload_type) <= MAX_PAYLOAD_TYPE \
            or not all(" " <= char <= "~" for char in payload_type):
        raise BundleRejected(
            f"bundle: envelope payloadType must be 1 to {MAX_PAYLOAD_TYPE} printable ASCII "
            "characters"
        )
    payload = _base64(obj["payload"], "envelope payload")
    raw_signatures = obj["signatures"]
    if not isinstance(raw_signatures, list) or not 1 <= len(raw_signatures) <= MAX_SIGNATURES:
        raise BundleRejected(
            f"bundle: envelope signatures must be a list of 1 to {MAX_SIGNATURES} entries"
        )
    signatures = []
    for index, raw in enumerate(raw_signatures):
        where = f"envelope signatures[{index}]"
        entry = _object(raw, SIGNATURE_KEYS, where)
        keyid = entry["keyid"]
        if not isinstance(keyid, str) or not _KEY_ID_RE.match(keyid):
            raise BundleRejected(f"bundle: {where}.keyid must be 64 lower-case hex digits")
        signature = _base64(entry["sig"], f"{where}.sig")
        if len(signature) != ED25519_SIGNATURE_BYTES:
            raise BundleRejected(f"bundle: {where}.sig is not a 64-byte Ed25519 signature")
        signatures.append((keyid, signature))
    return payload_type, payload, signatures


def _object(value: Any, keys: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleRejected(f"bundle: {where} must be a JSON object")
    if value.keys() != keys:
        raise BundleRejected(f"bundle: {where} has {strictjson.key_diff(keys, value.keys())}")
    return value


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise BundleRejected(f"bundle: {where} must be a base64 string")
    try:
        # strict: the standard alphabet, padding only at the end, nothing after it
        raw = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise BundleRejected(f"bundle: {where} is not valid base64") from None
    # Decoding ignores the unused low bits of the last character, so several
    # spellings decode alike; insisting on the canonical one means no byte of
    # an envelope can change without changing what it says. Only the last
    # quantum can differ, so only it is re-encoded (not a second copy of it all).
    tail = len(raw) % 3 or 3
    if raw and base64.b64encode(raw[-tail:]).decode("ascii") != value[-4:]:
        raise BundleRejected(f"bundle: {where} is not canonical base64")
    return raw
