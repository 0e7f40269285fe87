"""The size limits of signed bundles: computed from a real worst-case bundle
of MAX_BUNDLE_GRANTS grants, and enforced before anything is parsed."""

from __future__ import annotations

import ipaddress
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.grant_factories import KEY, NOW, make_bundle, make_grant
from ztnet.errors import BundleRejected, ConfigError
from ztnet.grants import limits, payload
from ztnet.grants.bundle import (
    BUNDLE_PAYLOAD_TYPE,
    Bundle,
    GrantRecord,
    NameRecord,
    decode_payload,
    encode_payload,
    sign_bundle,
    verify_bundle,
)
from ztnet.grants.envelope import sign_envelope, verify_envelope
from ztnet.grants.model import MAX_GRANT_ID, Grant, PortRange, Proto
from ztnet.grants.names import MAX_NAME_PORTS, HostPattern, NameGrant
from ztnet.grants.payload import MAX_INT64, MAX_TIME_MS
from ztnet.policy import issue as issue_module
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

PUB = KEY.public_key()
_LABEL = "a" * 63
LONGEST_DNS_NAME = ".".join([_LABEL] * 3 + ["b" * 61])  # 253 characters
LAST_MS = MAX_TIME_MS / 1000


def worst_case_bundle(grants: int, quarantined: int = limits.MAX_QUARANTINED,
                      names: int = 0) -> Bundle:
    """Every field at its longest: what the byte limits must admit."""
    network = ipaddress.ip_network("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127")
    records = tuple(
        GrantRecord(Grant(MAX_GRANT_ID - i, _LABEL, Proto.TCP, network, PortRange(10000, 65535),
                          LAST_MS - 0.001, LAST_MS), MAX_INT64 - i)
        for i in range(grants))
    quarantine = tuple(payload.Quarantine(f"{i:03d}{_LABEL[3:]}", False)
                       for i in range(quarantined))
    pattern = HostPattern("*." + LONGEST_DNS_NAME[2:])
    name_records = tuple(
        NameRecord(NameGrant(MAX_GRANT_ID - grants - i, _LABEL, Proto.TCP, pattern,
                             PortRange(65535 - MAX_NAME_PORTS + 1, 65535), LAST_MS - 0.001,
                             LAST_MS, allow_private=False), MAX_INT64 - grants - i)
        for i in range(names))
    return Bundle(LONGEST_DNS_NAME, "~" * limits.MAX_ISSUER, LONGEST_DNS_NAME, MAX_INT64,
                  NOW, LAST_MS, records, quarantine=quarantine, names=name_records)


def test_the_limits_are_the_size_of_the_largest_bundle_of_100000_grants() -> None:
    one, two = (len(encode_payload(worst_case_bundle(n, 0))) for n in (1, 2))
    record = two - one
    assert record <= limits.MAX_GRANT_RECORD_BYTES < record + 8
    assert one - record <= limits.MAX_PAYLOAD_HEADER_BYTES
    q1, q2 = (len(encode_payload(worst_case_bundle(1, n))) for n in (1, 2))
    assert q2 - q1 <= limits.MAX_QUARANTINE_RECORD_BYTES < q2 - q1 + 8
    assert q1 - one <= limits.MAX_QUARANTINE_RECORD_BYTES + 16  # the key and its list
    name_one, name_two = (len(encode_payload(worst_case_bundle(1, 0, names=n))) for n in (1, 2))
    name_record = name_two - name_one
    assert name_record <= limits.MAX_NAME_RECORD_BYTES < name_record + 8
    # the first hostname grant also brings the "names" key and its list
    assert name_one - one - name_record <= limits.MAX_PAYLOAD_HEADER_BYTES - (one - record)
    largest = worst_case_bundle(limits.MAX_BUNDLE_GRANTS, names=limits.MAX_BUNDLE_NAMES)
    data = encode_payload(largest)
    envelope = sign_bundle(largest, KEY)
    print(f"\nworst-case 100,000-grant bundle: payload {len(data):,} bytes "
          f"(limit {limits.MAX_PAYLOAD_BYTES:,}), envelope {len(envelope):,} bytes "
          f"(limit {limits.MAX_ENVELOPE_BYTES:,})")
    assert len(data) <= limits.MAX_PAYLOAD_BYTES < len(data) * 1.01
    assert len(envelope) <= limits.MAX_ENVELOPE_BYTES < len(envelope) * 1.01
    assert len(envelope) <= limits.MAX_BUNDLE_MESSAGE_BYTES
    # ... and it verifies, so no bundle the issuer can write is refused for its size
    verified = verify_bundle(envelope, trusted=[PUB], host=LONGEST_DNS_NAME, min_version=1,
                             now=NOW + 1)
    assert len(verified.grants) == limits.MAX_BUNDLE_GRANTS


def test_an_envelope_over_the_limit_is_refused_unread() -> None:
    with pytest.raises(BundleRejected, match=f"limit of {limits.MAX_ENVELOPE_BYTES}"):
        verify_envelope(b" " * (limits.MAX_ENVELOPE_BYTES + 1), trusted=[PUB],
                        payload_type=BUNDLE_PAYLOAD_TYPE)


def peak_bytes(call: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(BundleRejected):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HOSTILE_SIZE = 4 * 1024 * 1024
HOSTILE = b"[" + b"{}," * ((HOSTILE_SIZE - 2) // 3) + b"{}]"  # 1.4 million empty objects


def test_structure_is_counted_before_an_envelope_is_parsed() -> None:
    # Unfixed, json.loads built 1.4 million dicts first: 100.8 MiB peak for 4 MiB.
    peak = peak_bytes(lambda: verify_bundle(HOSTILE, trusted=[PUB], host="web-1",
                                            min_version=0, now=NOW))
    print(f"\n4 MiB of [{{}},...]: peak {peak / 2**20:.2f} MiB allocated while refusing it")
    assert peak < 64 * 1024
    for hostile in (b'{"payload":[' + b'"",' * 100_000 + b'""]}',
                    b'{"signatures":[' + b"0," * 100_000 + b"0]}"):
        assert peak_bytes(lambda h=hostile: verify_envelope(  # type: ignore[misc]
            h, trusted=[PUB], payload_type=BUNDLE_PAYLOAD_TYPE)) < 64 * 1024


def test_a_signed_payload_is_bounded_before_it_is_parsed() -> None:
    # A trusted signer (or its stolen key) is no reason to build a million objects.
    envelope = sign_envelope(HOSTILE, BUNDLE_PAYLOAD_TYPE, KEY)
    peak = peak_bytes(lambda: verify_bundle(envelope, trusted=[PUB], host="web-1",
                                            min_version=0, now=NOW))
    # the envelope text and the decoded payload (2.0x), not 1.4 million dicts (19x)
    assert peak < 2.5 * len(envelope)
    with pytest.raises(BundleRejected, match="refused before parsing"):
        decode_payload(HOSTILE)
    with pytest.raises(BundleRejected, match="more than the limit"):
        decode_payload(b" " * (limits.MAX_PAYLOAD_BYTES + 1))


def test_grant_count_limit_on_decode_and_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    three = make_bundle(*(make_grant(grant_id=i + 1) for i in range(3)))
    data = encode_payload(three)
    assert decode_payload(data) == three
    monkeypatch.setattr(payload, "MAX_BUNDLE_GRANTS", 2)
    with pytest.raises(BundleRejected, match="grants: 3 grants, more than the limit of 2"):
        decode_payload(data)
    policy = parse_policy(
        'trust_domain = "example.org"\n[agents.bot]\n'
        + "".join(f'[[agents.bot.allow]]\nto = "10.0.{i}.0/24"\nports = "443"\n'
                  for i in range(3)), "p.toml")
    monkeypatch.setattr(issue_module, "MAX_BUNDLE_GRANTS", 2)
    with pytest.raises(ConfigError, match="3 grants for host web-1, more than the 2"):
        issue_bundle(policy, host="web-1", version=1, now=NOW, issuer="t")


@given(st.binary(max_size=3 * 16 * 1024), st.sampled_from([b"{[,:", b"{[", b"{"]))
def test_structure_kept_is_what_counting_each_character_gives(data: bytes, chars: bytes) -> None:
    kept = limits.structure_kept(data, chars, stop_above=len(data))
    assert sorted(kept) == sorted(byte for byte in data if byte in chars)
    assert limits.structure_count(data, stop_above=len(data)) == sum(
        data.count(bytes([byte])) for byte in limits.STRUCTURE)


def test_structure_counting_stops_early_but_still_says_too_many() -> None:
    assert limits.structure_count(HOSTILE, stop_above=400) > 400
    tracemalloc.start()
    try:
        limits.structure_count(HOSTILE, stop_above=400)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a chunk or two, never a copy of the 4 MiB
