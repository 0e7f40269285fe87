"""The fast payload reader (ztnet.grants.fastpayload) against the strict one:
whenever it returns a Bundle, the strict path returns the same Bundle; on
anything else it returns None, and the strict path decides."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.grant_factories import NOW, make_bundle, make_grant, networks, policies
from ztnet.errors import BundleRejected
from ztnet.grants.fastpayload import _ipv4, _ipv4_network, decode_canonical
from ztnet.grants.limits import MAX_BUNDLE_GRANTS
from ztnet.grants.model import Proto
from ztnet.grants.payload import decode_payload, encode_payload
from ztnet.policy.issue import issue_bundle


def strict(data: bytes) -> object:
    try:
        return decode_payload(data, fast=False)
    except BundleRejected as exc:
        return exc


@settings(max_examples=80, deadline=None)
@given(policies(), st.booleans())
def test_canonical_payloads_read_alike(policy: object, audited: bool) -> None:
    bundle = issue_bundle(policy, host="web-1", version=3, now=NOW, issuer='ctl "a\\b" [x]')
    if audited and bundle.grants:
        from dataclasses import replace
        bundle = replace(bundle, audit_agents=tuple(sorted({r.grant.agent for r in bundle.grants})))
    data = encode_payload(bundle)
    fast = decode_canonical(data, MAX_BUNDLE_GRANTS)
    # an issuer with a quote or backslash is escaped in JSON: the strict path reads it
    assert fast is None or fast == bundle
    assert strict(data) == bundle
    plain = encode_payload(issue_bundle(policy, host="web-1", version=3, now=NOW,
                                        issuer="ctl [x]"))
    assert decode_canonical(plain, MAX_BUNDLE_GRANTS) == strict(plain)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_payload_is_never_read_otherwise(data: st.DataObject) -> None:
    grants = [make_grant(grant_id=i + 1, network=ipaddress.ip_network(net),
                         proto=proto, ports=None if proto is Proto.ICMP else make_grant().ports)
              for i, (net, proto) in enumerate([("10.0.2.0/24", Proto.TCP),
                                                ("10.1.2.3/32", Proto.ICMP),
                                                ("2001:db8::/32", Proto.UDP)])]
    payload = bytearray(encode_payload(make_bundle(*grants)))
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(payload) - 1))
        action = data.draw(st.sampled_from(["set", "delete", "insert"]))
        byte = data.draw(st.sampled_from(list(b'0123456789abcdefg-/.:,{}[]" \\x')))
        if action == "set":
            payload[index] = byte
        elif action == "delete":
            del payload[index]
        else:
            payload.insert(index, byte)
    fast = decode_canonical(bytes(payload), MAX_BUNDLE_GRANTS)
    if fast is not None:
        assert strict(bytes(payload)) == fast


@pytest.mark.parametrize("text", ["010.0.0.1/32", "10.1/32", "10.0.0.1/032", "10.0.0.0/33",
                                  "10.0.0.1/24", "0x0a.0.0.1/32", "10.0.0.1", "10.0.0.1/",
                                  "256.0.0.0/8", " 10.0.0.1/32", "10.0.0.1/3a"])
def test_non_canonical_ipv4_is_left_to_the_strict_path(text: str) -> None:
    assert _ipv4(text) is None
    data = encode_payload(make_bundle()).replace(b"10.0.2.0/24", text.encode())
    assert decode_canonical(data, MAX_BUNDLE_GRANTS) is None
    assert isinstance(strict(data), BundleRejected)


@settings(max_examples=300, deadline=None)
@given(networks())
def test_the_fast_network_behaves_as_the_standard_one(network: object) -> None:
    if not isinstance(network, ipaddress.IPv4Network):
        return
    fast = _ipv4_network(int(network.network_address), network.prefixlen)
    assert _ipv4(str(network)) == int(network.network_address) << 6 | network.prefixlen
    assert (fast == network, hash(fast) == hash(network)) == (True, True)
    assert (str(fast), repr(fast), fast.prefixlen) == (str(network), repr(network),
                                                       network.prefixlen)
    assert fast.network_address.packed == network.network_address.packed
    assert fast.broadcast_address == network.broadcast_address
    assert network.network_address in fast and fast.num_addresses == network.num_addresses
    if network.prefixlen:
        assert fast.supernet() == network.supernet()
        assert fast.subnet_of(network.supernet())
    assert sorted([fast, ipaddress.IPv4Network("0.0.0.0/0")]) == sorted(
        [network, ipaddress.IPv4Network("0.0.0.0/0")])


def test_grants_share_their_network_and_window_values() -> None:
    # one issuance: many grants to the same networks with the same windows; each value
    # is held once (at 100,000 grants that is tens of MiB of the daemon's memory)
    same = [make_grant(grant_id=i, agent=f"bot{i % 3}") for i in range(1, 7)]
    other = make_grant(grant_id=7, network=ipaddress.ip_network("10.9.0.0/16"),
                       not_after=NOW + 600)
    fast = decode_canonical(encode_payload(make_bundle(*same, other)), MAX_BUNDLE_GRANTS)
    assert fast is not None
    grants = [record.grant for record in fast.grants]
    assert len({id(g.network) for g in grants[:6]}) == 1
    assert len({id(g.not_before) for g in grants}) == 1
    assert len({id(g.not_after) for g in grants[:6]}) == 1
    assert grants[6].network == other.network and grants[6].network is not grants[0].network
    assert grants[6].not_after == NOW + 600 and grants[6].not_after is not grants[0].not_after
