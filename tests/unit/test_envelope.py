"""DSSE envelopes: PAE, signing, and strict, bounded verification."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.grant_factories import KEY, OTHER_KEY
from ztnet.errors import BundleRejected, ConfigError, GrantError, SignatureInvalid, UnknownKey
from ztnet.grants import envelope as envelope_module
from ztnet.grants.envelope import pae, sign_envelope, verify_envelope
from ztnet.grants.keys import key_id

TYPE = "application/vnd.test+json"
PUB = KEY.public_key()


def verify(data: bytes, **kwargs: Any) -> envelope_module.VerifiedPayload:
    kwargs.setdefault("trusted", [PUB])
    kwargs.setdefault("payload_type", TYPE)
    return verify_envelope(data, **kwargs)


def doc(payload: bytes = b"hello") -> dict[str, Any]:
    result: dict[str, Any] = json.loads(sign_envelope(payload, TYPE, KEY))
    return result


def raw(document: Any) -> bytes:
    return json.dumps(document).encode()


def test_pae_matches_the_dsse_spec_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("t\u00e9", b"") == "DSSEv1 3 t\u00e9 0 ".encode()  # lengths count bytes


def test_round_trip() -> None:
    envelope = sign_envelope(b"payload \x00\xff", TYPE, KEY)
    assert set(json.loads(envelope)) == {"payloadType", "payload", "signatures"}
    verified = verify(envelope)
    assert verified.payload == b"payload \x00\xff"
    assert verified.key_id == key_id(PUB)
    assert verified.payload_type == TYPE


def test_signature_covers_pae_not_just_payload() -> None:
    document = doc()
    signature = base64.b64decode(document["signatures"][0]["sig"])
    PUB.verify(signature, pae(TYPE, b"hello"))  # raises if not


def test_untrusted_key() -> None:
    with pytest.raises(UnknownKey, match=f"bundle: signed by untrusted key {key_id(PUB)}"):
        verify(sign_envelope(b"x", TYPE, KEY), trusted=[OTHER_KEY.public_key()])
    with pytest.raises(UnknownKey, match=r"\(trusted: none\)"):
        verify(sign_envelope(b"x", TYPE, KEY), trusted=[])


def test_tampered_payload() -> None:
    document = doc()
    document["payload"] = base64.b64encode(b"hellO").decode()
    with pytest.raises(SignatureInvalid, match="bundle: signature by key .* does not verify"):
        verify(raw(document))


def test_payload_type_is_signed() -> None:
    document = doc()
    document["payloadType"] = "application/other"
    with pytest.raises(SignatureInvalid):
        verify(raw(document))


def test_validly_signed_other_type_is_rejected() -> None:
    with pytest.raises(BundleRejected, match="bundle: payload type 'other' is not"):
        verify(sign_envelope(b"x", "other", KEY))


def test_key_from_another_signer_under_a_trusted_id() -> None:
    document = doc()
    forged = OTHER_KEY.sign(pae(TYPE, b"hello"))
    document["signatures"][0]["sig"] = base64.b64encode(forged).decode()
    with pytest.raises(SignatureInvalid):
        verify(raw(document))


def test_several_signatures_first_trusted_one_counts() -> None:
    document = doc()
    other = json.loads(sign_envelope(b"hello", TYPE, OTHER_KEY))["signatures"][0]
    document["signatures"].insert(0, other)
    assert verify(raw(document)).key_id == key_id(PUB)
    bad = dict(document["signatures"][1], sig=base64.b64encode(bytes(64)).decode())
    document["signatures"][1] = bad
    with pytest.raises(SignatureInvalid):
        verify(raw(document))


def test_trusted_mapping_must_match_its_keys() -> None:
    assert verify(sign_envelope(b"x", TYPE, KEY), trusted={key_id(PUB): PUB}).payload == b"x"
    with pytest.raises(ConfigError, match="trusted key listed as"):
        verify(sign_envelope(b"x", TYPE, KEY), trusted={"0" * 64: PUB})


def test_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    envelope = sign_envelope(b"x" * 100, TYPE, KEY)
    monkeypatch.setattr(envelope_module, "MAX_ENVELOPE_BYTES", len(envelope) - 1)
    with pytest.raises(BundleRejected, match="more than the limit"):
        verify(envelope)


def test_lone_surrogate_payload_type_is_a_rejection_not_a_crash() -> None:
    # JSON may spell a lone surrogate ("\ud800"): Python decodes it into a str
    # that cannot be encoded as UTF-8, which used to escape as UnicodeEncodeError
    # from the PAE, before any signature check, outside the error tree.
    for spelling in ("\\ud800", "x\\udfff", "\\ud83d"):
        data = sign_envelope(b"x", TYPE, KEY).replace(
            json.dumps(TYPE).encode(), f'"{spelling}"'.encode())
        with pytest.raises(BundleRejected, match="payloadType must be 1 to 256 printable ASCII"):
            verify(data)
    with pytest.raises(BundleRejected, match="printable ASCII"):
        verify(mutate(lambda d: d.update(payloadType="t\u00e9\n")))


def mutate(change: Any) -> bytes:
    document = doc()
    change(document)
    return raw(document)


MALFORMED = {
    "not utf-8": b'{"payload":"\xff"}',
    "not json": b"{",
    "nan": b'{"payload": NaN}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "array": b"[]",
    "extra key": mutate(lambda d: d.update(extra=1)),
    "missing key": mutate(lambda d: d.pop("payloadType")),
    "duplicate key": sign_envelope(b"x", TYPE, KEY).replace(b"{", b'{"payload":"",', 1),
    "type not string": mutate(lambda d: d.update(payloadType=5)),
    "type empty": mutate(lambda d: d.update(payloadType="")),
    "payload not base64": mutate(lambda d: d.update(payload="@@@@")),
    "payload unpadded": mutate(lambda d: d.update(payload="aGVsbG8")),
    "payload non-canonical": mutate(lambda d: d.update(payload="aGVsbG9=")),
    "payload urlsafe": mutate(lambda d: d.update(payload="-_-_")),
    "payload not string": mutate(lambda d: d.update(payload=None)),
    "signatures empty": mutate(lambda d: d.update(signatures=[])),
    "signatures not list": mutate(lambda d: d.update(signatures={})),
    "too many signatures": mutate(lambda d: d.update(signatures=d["signatures"] * 9)),
    "signature not object": mutate(lambda d: d.update(signatures=["x"])),
    "signature extra key": mutate(lambda d: d["signatures"][0].update(alg="none")),
    "keyid upper case": mutate(
        lambda d: d["signatures"][0].update(keyid=d["signatures"][0]["keyid"].upper())
    ),
    "keyid short": mutate(lambda d: d["signatures"][0].update(keyid="ab")),
    "sig short": mutate(lambda d: d["signatures"][0].update(sig=base64.b64encode(b"x").decode())),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_envelopes(name: str) -> None:
    with pytest.raises(BundleRejected, match="^bundle: envelope"):
        verify(MALFORMED[name])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_grant_errors(data: bytes) -> None:
    with pytest.raises(GrantError):
        verify(data)


# Any code point, lone surrogates included: JSON can spell them all.
any_text = st.text(st.characters(blacklist_categories=()), max_size=10)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | any_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["payloadType", "payload", "signatures", "keyid", "sig"]), json_values)
def test_any_field_value_raises_only_grant_errors(field: str, value: Any) -> None:
    document = doc()
    target = document["signatures"][0] if field in ("keyid", "sig") else document
    target[field] = value
    with pytest.raises(GrantError):
        verify(raw(document))
