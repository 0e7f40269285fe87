"""Properties of the whole chain policy → grants → bundle → sign → verify."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.grant_factories import KEY, NOW, policies, quantized
from ztnet.errors import BundleRejected, SignatureInvalid, UnknownKey
from ztnet.grants.bundle import (
    decode_payload,
    encode_payload,
    sign_bundle,
    verify_bundle,
)
from ztnet.grants.payload import floor_ms
from ztnet.policy.compile import compile_grants
from ztnet.policy.document import Policy, parse_policy
from ztnet.policy.issue import issue_bundle

PUB = KEY.public_key()
# What a tampered envelope may raise: named rejections, nothing generic.
REJECTIONS = (BundleRejected, SignatureInvalid, UnknownKey)

now_values = st.floats(min_value=1_600_000_000, max_value=2_000_000_000)


def verify(envelope: bytes, now: float) -> Any:
    return verify_bundle(envelope, trusted=[PUB], host="web-1", min_version=1, now=now)


@settings(max_examples=60, deadline=None)
@given(policies(), now_values, st.integers(1, 2**40))
def test_round_trip(policy: Policy, now: float, version: int) -> None:
    bundle = issue_bundle(policy, host="web-1", version=version, now=now, issuer="test")
    envelope = sign_bundle(bundle, KEY)
    verified = verify(envelope, now=now)
    assert verified.bundle == bundle
    assert decode_payload(encode_payload(bundle)) == bundle
    expected = compile_grants(policy, now=floor_ms(now))
    assert verified.grants == tuple(quantized(grant) for grant in expected)
    assert all(abs(g.not_before - now) < 0.001 for g in verified.grants)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.data_too_large])
@given(policies(max_agents=2, max_rules=2), st.data())
def test_any_single_bit_flip_is_rejected(policy: Policy, data: st.DataObject) -> None:
    bundle = issue_bundle(policy, host="web-1", version=5, now=NOW, issuer="test")
    envelope = sign_bundle(bundle, KEY)
    index = data.draw(st.integers(0, len(envelope) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(envelope)
    flipped[index] ^= 1 << bit
    with pytest.raises(REJECTIONS):
        verify(bytes(flipped), now=NOW)


def test_every_single_bit_flip_of_one_envelope_is_rejected() -> None:
    # Both families, a port range and icmp: every kind of grant field.
    policy = parse_policy(
        'trust_domain = "example.org"\n[agents.bot]\n'
        '[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "8000-8100"\n'
        '[[agents.bot.allow]]\nto = "2001:db8::/32"\nproto = "icmp"\n',
        "p.toml",
    )
    envelope = sign_bundle(issue_bundle(policy, host="web-1", version=5, now=NOW, issuer="t"), KEY)
    assert verify(envelope, now=NOW).version == 5
    outcomes: dict[str, int] = {}
    for index in range(len(envelope)):
        for bit in range(8):
            flipped = bytearray(envelope)
            flipped[index] ^= 1 << bit
            with pytest.raises(REJECTIONS) as info:
                verify(bytes(flipped), now=NOW)
            outcomes[type(info.value).__name__] = outcomes.get(type(info.value).__name__, 0) + 1
    # Every kind of rejection occurs: flips break the JSON, the signer, the signature.
    assert set(outcomes) == {"BundleRejected", "SignatureInvalid", "UnknownKey"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=8,
)
PAYLOAD = json.loads(
    encode_payload(
        issue_bundle(
            parse_policy(
                'trust_domain = "a.b"\n[agents.x]\n[[agents.x.allow]]\nto = "::/0"\n'
                'ports = "1-2"\n',
                "p",
            ),
            host="h",
            version=1,
            now=NOW,
            issuer="i",
        )
    )
)
PATHS = [(key,) for key in PAYLOAD if key != "grants"] + [
    ("grants", 0, key) for key in PAYLOAD["grants"][0]
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATHS), json_values)
def test_decoding_any_field_value_raises_only_bundle_rejected(
    path: tuple[Any, ...], value: Any
) -> None:
    document = json.loads(json.dumps(PAYLOAD))
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    try:
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    except ValueError:  # NaN and friends: not even encodable canonically
        data = json.dumps(document).encode()
    try:
        decode_payload(data)
    except BundleRejected as exc:
        assert str(exc).startswith("bundle: malformed payload: ")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_bundle_rejected(data: bytes) -> None:
    with pytest.raises(BundleRejected):
        decode_payload(data)
