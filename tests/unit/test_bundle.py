"""Bundles: canonical payload, strict decoding, issuing, and every reason
verify_bundle refuses one."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Any

import pytest

from tests.unit.grant_factories import KEY, NOW, OTHER_KEY, make_bundle, make_grant, policy_text
from ztnet.errors import BundleRejected, ConfigError, GrantExpired, SignatureInvalid, UnknownKey
from ztnet.grants.bundle import (
    BUNDLE_PAYLOAD_TYPE,
    Bundle,
    GrantRecord,
    decode_payload,
    encode_payload,
    sign_bundle,
    verify_bundle,
)
from ztnet.grants.envelope import sign_envelope
from ztnet.grants.keys import key_id
from ztnet.grants.model import PortRange, Proto
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

PUB = KEY.public_key()


def verify(envelope: bytes, **kwargs: Any) -> Any:
    kwargs.setdefault("trusted", [PUB])
    kwargs.setdefault("host", "web-1")
    kwargs.setdefault("min_version", 1)
    kwargs.setdefault("now", NOW + 1)
    return verify_bundle(envelope, **kwargs)


# --- payload encoding -------------------------------------------------------------


def test_canonical_payload_bytes() -> None:
    bundle = make_bundle(make_grant(grant_id=0xABC, ports=None, proto=Proto.ANY))
    assert encode_payload(bundle) == (
        b'{"audience":"web-1","expires_ms":1800000300000,"grants":[{"agent":'
        b'"spiffe://example.org/agent/bot","destination":"10.0.2.0/24","id":"g-0000000000000abc",'
        b'"not_after_ms":1800000300000,"not_before_ms":1800000000000,"ports":"any",'
        b'"proto":"any","serial":7000000}],"issued_at_ms":1800000000000,'
        b'"issuer":"test-controller","trust_domain":"example.org","version":7}'
    )
    assert decode_payload(encode_payload(bundle)) == bundle


def test_times_must_be_whole_milliseconds() -> None:
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        make_bundle(issued_at=NOW + 0.0001)
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        GrantRecord(make_grant(not_after=NOW + 0.0005), 1)
    with pytest.raises(ValueError, match="outside"):
        make_bundle(expires=1e13)


def test_bundle_refuses_duplicate_grant_ids_and_serials() -> None:
    grant = make_grant()
    with pytest.raises(ValueError, match="grant id g-0000000000001234 appears more than once"):
        make_bundle(grant, make_grant(network=ipaddress.ip_network("10.9.0.0/16")))
    with pytest.raises(ValueError, match="serials must be unique"):
        make_bundle(grants=(GrantRecord(grant, 1), GrantRecord(make_grant(grant_id=2), 1)))


def payload_with(change: Any) -> bytes:
    document = json.loads(encode_payload(make_bundle()))
    change(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def grant_with(**fields: Any) -> bytes:
    return payload_with(lambda d: d["grants"][0].update(fields))


MALFORMED_PAYLOADS = {
    "extra key": (payload_with(lambda d: d.update(policy="x")), "payload: unknown keys"),
    "missing key": (payload_with(lambda d: d.pop("version")), "payload: missing keys ['version']"),
    "version string": (payload_with(lambda d: d.update(version="7")), "version: expected an int"),
    "version bool": (payload_with(lambda d: d.update(version=True)), "version: expected an int"),
    "version zero": (payload_with(lambda d: d.update(version=0)), "version 0 must be between"),
    "float time": (payload_with(lambda d: d.update(issued_at_ms=1.5)), "issued_at_ms: expected"),
    "negative time": (payload_with(lambda d: d.update(expires_ms=-1)), "expires_ms: -1 is out"),
    "expires before issue": (
        payload_with(lambda d: d.update(expires_ms=1)),
        "expires must be later than issued_at",
    ),
    "bad trust domain": (payload_with(lambda d: d.update(trust_domain="Ex.org")), "trust_domain"),
    "bad audience": (payload_with(lambda d: d.update(audience="Web-1")), "audience 'Web-1'"),
    "control char issuer": (payload_with(lambda d: d.update(issuer="a\x1b[2J")), "issuer must"),
    "grants not list": (payload_with(lambda d: d.update(grants={})), "grants: expected a list"),
    "grant not object": (payload_with(lambda d: d.update(grants=[1])), "grants[0]: expected an"),
    "grant extra key": (grant_with(comment="x"), "grants[0]: unknown keys ['comment']"),
    "bad grant id": (grant_with(id="g-123"), "grants[0]: bad grant id 'g-123'"),
    "zero grant id": (grant_with(id="g-0000000000000000"), "grants[0]: grant id must be a nonzero"),
    "other trust domain": (
        grant_with(agent="spiffe://evil.org/agent/bot"),
        "grants[0]: 'spiffe://evil.org/agent/bot' is not under trust domain",
    ),
    "not spiffe": (grant_with(agent="bot"), "grants[0]: 'bot' is not a SPIFFE id"),
    "not an agent id": (
        grant_with(agent="spiffe://example.org/workload/bot"),
        "is not an agent id",
    ),
    "bad agent name": (grant_with(agent="spiffe://example.org/agent/Bot"), "is not an agent id"),
    "agent path suffix": (grant_with(agent="spiffe://example.org/agent/bot/x"), "not an agent"),
    "host bits": (grant_with(destination="10.0.2.1/24"), "grants[0].destination: '10.0.2.1/24'"),
    "bare address": (grant_with(destination="10.0.2.1"), "is not canonical"),
    "uncompressed v6": (grant_with(destination="2001:db8:0::/48"), "is not canonical"),
    "ipv4-mapped": (grant_with(destination="::ffff:10.0.0.0/104"), "is IPv4-mapped"),
    "ports zero": (grant_with(ports="0"), "grants[0].ports: port out of range"),
    "ports padded": (grant_with(ports="0443"), "grants[0].ports: '0443' is not canonical"),
    "ports range of one": (grant_with(ports="443-443"), "is not canonical (expected 443)"),
    "proto upper": (grant_with(proto="TCP"), "grants[0].proto: 'TCP' is not tcp, udp"),
    "icmp with ports": (grant_with(proto="icmp"), "an icmp grant cannot name ports"),
    "empty window": (grant_with(not_after_ms=1800000000000), "not_after must be later"),
    "serial negative": (grant_with(serial=-1), "grants[0].serial: -1 is out of range"),
    "whitespace": (encode_payload(make_bundle()).replace(b",", b", ", 1), "not in canonical form"),
    "unsorted keys": (
        json.dumps(
            dict(reversed(json.loads(encode_payload(make_bundle())).items())), separators=(",", ":")
        ).encode(),
        "not in canonical form",
    ),
    "not json": (b"{", "not valid JSON"),
    "not utf-8": (b'"\xff"', "not UTF-8"),
    "duplicate key": (
        encode_payload(make_bundle()).replace(b"{", b'{"version":7,', 1),
        "duplicate key",
    ),
    "huge integer": (payload_with(lambda d: d.update(version=2**70)), "version: 1180591620717"),
}


@pytest.mark.parametrize("name", MALFORMED_PAYLOADS)
def test_malformed_payload_is_rejected_with_location(name: str) -> None:
    data, where = MALFORMED_PAYLOADS[name]
    with pytest.raises(BundleRejected) as info:
        decode_payload(data)
    message = str(info.value)
    assert message.startswith("bundle: malformed payload: ")
    assert where in message, message


def test_duplicate_grants_in_payload() -> None:
    data = payload_with(lambda d: d["grants"].append(dict(d["grants"][0], serial=1)))
    with pytest.raises(BundleRejected, match="malformed payload: grant id g-.* more than once"):
        decode_payload(data)


# --- verification -----------------------------------------------------------------


def test_verified_bundle() -> None:
    bundle = make_bundle()
    verified = verify(sign_bundle(bundle, KEY))
    assert verified.bundle == bundle
    assert verified.grants == (make_grant(),)
    assert verified.version == 7
    assert verified.key_id == key_id(PUB)
    assert verified.payload_sha256 == hashlib.sha256(encode_payload(bundle)).hexdigest()


def test_wrong_audience() -> None:
    with pytest.raises(BundleRejected, match="this bundle is for host web-1, this host is web-2"):
        verify(sign_bundle(make_bundle(), KEY), host="web-2")


def test_host_is_compared_case_insensitively_and_can_be_skipped() -> None:
    envelope = sign_bundle(make_bundle(), KEY)
    assert verify(envelope, host="WEB-1.").bundle.audience == "web-1"
    assert verify(envelope, host=None).bundle.audience == "web-1"
    with pytest.raises(ConfigError, match="bundle: bad host"):
        verify(envelope, host="web 1")


def test_rollback_refused_equal_version_accepted() -> None:
    envelope = sign_bundle(make_bundle(version=7), KEY)
    assert verify(envelope, min_version=7).version == 7
    with pytest.raises(BundleRejected, match="version 7 is older than version 8 .* rollback"):
        verify(envelope, min_version=8)


def test_expired_bundle_is_refused() -> None:
    envelope = sign_bundle(make_bundle(expires=NOW + 60), KEY)
    assert verify(envelope, now=NOW + 59.999)
    with pytest.raises(
        BundleRejected, match="bundle: version 7 expired at 2027-01-15T08:01:00.000Z"
    ):
        verify(envelope, now=NOW + 60)


def test_bundle_with_an_expired_grant_is_refused_whole() -> None:
    short = make_grant(grant_id=2, not_after=NOW + 10)
    envelope = sign_bundle(make_bundle(make_grant(), short, expires=NOW + 300), KEY)
    assert len(verify(envelope, now=NOW + 9).grants) == 2
    with pytest.raises(GrantExpired, match="grant g-0000000000000002 .* refusing the whole bundle"):
        verify(envelope, now=NOW + 10)


def test_trust_domain_pin() -> None:
    envelope = sign_bundle(make_bundle(), KEY)
    assert verify(envelope, trust_domain="example.org")
    with pytest.raises(BundleRejected, match="trust domain example.org is not this host's a.b"):
        verify(envelope, trust_domain="a.b")


def test_unknown_signer() -> None:
    with pytest.raises(UnknownKey):
        verify(sign_bundle(make_bundle(), OTHER_KEY))


def test_wrong_payload_type() -> None:
    envelope = sign_envelope(encode_payload(make_bundle()), "application/json", KEY)
    with pytest.raises(BundleRejected, match="payload type 'application/json' is not"):
        verify(envelope)


def test_signature_is_checked_before_the_payload_is_read() -> None:
    garbage = b'{"not": "a bundle"}'
    with pytest.raises(UnknownKey):
        verify(sign_envelope(garbage, BUNDLE_PAYLOAD_TYPE, OTHER_KEY))
    envelope = json.loads(sign_envelope(garbage, BUNDLE_PAYLOAD_TYPE, KEY))
    envelope["signatures"][0]["sig"] = json.loads(sign_envelope(b"x", BUNDLE_PAYLOAD_TYPE, KEY))[
        "signatures"
    ][0]["sig"]
    with pytest.raises(SignatureInvalid):
        verify(json.dumps(envelope).encode())
    with pytest.raises(BundleRejected, match="malformed payload"):
        verify(sign_envelope(garbage, BUNDLE_PAYLOAD_TYPE, KEY))


# --- issuing ----------------------------------------------------------------------

POLICY = parse_policy(
    policy_text('to = "10.0.2.0/24"\nports = "443"\nttl = "1h"')
    + '[[agents.bot.allow]]\nto = "10.0.3.0/24"\nports = "53"\nproto = "udp"\nttl = "30s"\n',
    "p.toml",
)


def test_issue_bundle() -> None:
    bundle = issue_bundle(POLICY, host="Web-1", version=3, now=NOW + 0.0123456, issuer="me")
    assert bundle.audience == "web-1" and bundle.issuer == "me" and bundle.version == 3
    start_ms = 1_800_000_000_012  # rounded down to whole ms
    assert bundle.issued_at == start_ms / 1000
    assert [r.serial for r in bundle.grants] == [3_000_000, 3_000_001]
    assert [(str(r.grant.network), r.grant.not_after) for r in bundle.grants] == [
        ("10.0.2.0/24", (start_ms + 3_600_000) / 1000),
        ("10.0.3.0/24", (start_ms + 30_000) / 1000),
    ]
    assert bundle.grants[1].grant.ports == PortRange(53, 53)
    # Default freshness: until the first grant expires.
    assert bundle.expires == bundle.grants[1].grant.not_after
    assert decode_payload(encode_payload(bundle)) == bundle


def test_issue_bundle_ttls() -> None:
    empty = parse_policy('trust_domain = "a.b"\n', "p.toml")
    assert issue_bundle(empty, host="h", version=1, now=NOW, issuer="i").expires == NOW + 300
    assert (
        issue_bundle(empty, host="h", version=1, now=NOW, issuer="i", default_ttl=60).expires
        == NOW + 60
    )
    assert (
        issue_bundle(POLICY, host="h", version=1, now=NOW, issuer="i", bundle_ttl=7200).expires
        == NOW + 7200
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "web 1"}, "bundle: bad host"),
        ({"version": 0}, "bundle: version must be between 1 and"),
        ({"version": 2**63}, "bundle: version must be between 1 and"),
        ({"bundle_ttl": 0}, "bundle: bundle ttl"),
        ({"issuer": ""}, "bundle: cannot issue: issuer must be"),
    ],
)
def test_issue_bundle_refuses(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"host": "h", "version": 1, "now": NOW, "issuer": "i"} | kwargs
    with pytest.raises(ConfigError, match=message):
        issue_bundle(POLICY, **args)


def test_bundle_type_is_frozen() -> None:
    bundle = make_bundle()
    with pytest.raises(AttributeError):
        bundle.version = 8  # type: ignore[misc]
    assert isinstance(bundle, Bundle)
