"""Bundle deltas: canonical encoding, strict decoding, and every reason a delta is
refused against the state a host holds (pure logic; tests/kernel/test_delta.py runs
them through the daemon and the kernel)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest

from tests.unit.grant_factories import KEY, NOW, OTHER_KEY, make_bundle, make_grant
from ztnet.errors import BundleRejected, GrantExpired, UnknownKey
from ztnet.grants.bundle import VerifiedBundle, sign_bundle, verify_bundle
from ztnet.grants.delta import (
    DELTA_PAYLOAD_TYPE,
    BundleDelta,
    HeldGrants,
    decode_delta,
    diff_bundles,
    encode_delta,
    sign_delta,
    verify_delta,
)
from ztnet.grants.envelope import sign_envelope, verify_envelope
from ztnet.grants.limits import MAX_DELTA_CHANGES
from ztnet.grants.payload import GrantRecord

PUB = KEY.public_key()
BASE_GRANTS = (make_grant(grant_id=1), make_grant(grant_id=2, ports=None))


def held_state() -> VerifiedBundle:
    return verify_bundle(sign_bundle(make_bundle(*BASE_GRANTS), KEY), trusted=[PUB],
                         host="web-1", min_version=1, now=NOW + 1)


def delta(base: VerifiedBundle, **overrides: Any) -> BundleDelta:
    fields: dict[str, Any] = {
        "trust_domain": "example.org", "issuer": "test-controller", "audience": "web-1",
        "base_version": base.version, "base_sha256": base.payload_sha256, "version": 8,
        "issued_at": NOW + 1,
        "add": (GrantRecord(make_grant(grant_id=3, not_after=NOW + 200), 8_000_000),),
        "revoke": (1,),
    }
    fields.update(overrides)
    return BundleDelta(**fields)


def check(change: BundleDelta | bytes, base: VerifiedBundle | None = None,
          now: float = NOW + 2, **kwargs: Any) -> Any:
    base = base or held_state()
    envelope = change if isinstance(change, bytes) else sign_delta(change, KEY)
    signed = verify_envelope(envelope, trusted=[PUB], payload_type=DELTA_PAYLOAD_TYPE)
    return verify_delta(signed, base=base, held=HeldGrants(base), now=now, **kwargs)


def test_round_trip_is_canonical_and_apply_to_changes_only_the_grants() -> None:
    base = held_state()
    change = delta(base)
    payload = encode_delta(change)
    assert decode_delta(payload) == change
    assert json.dumps(json.loads(payload), sort_keys=True, separators=(",", ":")).encode() \
        == payload
    verified = check(change, base)
    assert [g.grant_id for g in verified.added] == [3]
    assert [g.grant_id for g in verified.revoked] == [1]
    after = verified.apply_to(base)
    assert [g.grant_id for g in after.grants] == [2, 3]
    assert after.version == 8 and after.bundle.expires == base.bundle.expires
    # the same bundle a checked construction gives (with_grants skips only the checks)
    assert after.bundle == replace(base.bundle, version=8, issued_at=NOW + 1,
                                   grants=(base.bundle.grants[1], change.add[0]))
    assert after.payload_sha256 == hashlib.sha256(payload).hexdigest()
    # the next delta stands on this one: the chain goes on from its digest
    held = HeldGrants(base)
    held.apply(change)
    follow = delta(after, base_version=8, base_sha256=after.payload_sha256, version=9,
                   add=(), revoke=(2,))
    signed = verify_envelope(sign_delta(follow, KEY), trusted=[PUB],
                             payload_type=DELTA_PAYLOAD_TYPE)
    assert [g.grant_id for g in verify_delta(signed, base=after, held=held,
                                             now=NOW + 2).apply_to(after).grants] == [3]


def test_a_shared_index_is_never_changed_under_its_reader() -> None:
    base = held_state()
    held = HeldGrants(base)
    before = dict(held.by_id)
    shared = held.shared_by_id()  # as the flow pipeline's reader thread holds it
    held.apply(delta(base))
    assert shared == before and sorted(shared) == [1, 2]
    assert sorted(held.by_id) == [2, 3] and held.by_id is not shared
    # unshared, a further change is made in place (a restore applies a chain of deltas)
    changed = held.by_id
    held.apply(delta(base, base_version=8, version=9, add=(), revoke=(2,)))
    assert held.by_id is changed and sorted(changed) == [3]


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"base_sha256": "0" * 64}, "this host holds version 7"),
    ({"base_version": 6}, "applies to version 6"),
    ({"audience": "web-2"}, "this delta is for host web-2"),
    ({"trust_domain": "other.org", "add": ()}, "trust domain other.org"),
    ({"revoke": (99,)}, "revoke g-0000000000000063: not held"),
    ({"add": (GrantRecord(make_grant(grant_id=2), 8_000_000),), "revoke": ()},
     "grant id g-0000000000000002 is already held"),
    ({"add": (GrantRecord(make_grant(grant_id=3), 7_000_000),)}, "serial 7000000 is already"),
])
def test_a_delta_that_does_not_fit_the_held_state_is_refused(overrides: dict[str, Any],
                                                              reason: str) -> None:
    with pytest.raises(BundleRejected, match=reason):
        check(delta(held_state(), **overrides))


def test_an_expired_addition_is_refused_except_when_restoring() -> None:
    change = delta(held_state(), add=(GrantRecord(make_grant(grant_id=3, not_after=NOW + 1),
                                                  8_000_000),))
    with pytest.raises(GrantExpired, match="refusing the whole delta"):
        check(change)
    assert [g.grant_id for g in check(change, restoring=True).added] == [3]


def test_a_delta_never_outlives_its_base() -> None:
    with pytest.raises(BundleRejected, match="a delta does not renew a policy"):
        check(delta(held_state()), now=NOW + 300)


def test_signature_and_type_are_checked_first() -> None:
    change = delta(held_state())
    with pytest.raises(UnknownKey):
        check(sign_delta(change, OTHER_KEY))
    # a delta's bytes under the bundle type are not a bundle, and the other way round
    with pytest.raises(BundleRejected, match="payload type"):
        verify_bundle(sign_envelope(encode_delta(change), DELTA_PAYLOAD_TYPE, KEY),
                      trusted=[PUB], host="web-1", min_version=1, now=NOW + 1)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d.update(revoke=["g-1"]), "expected g- and 16 hex digits"),
    (lambda d: d.update(revoke=["g-000000000000000A"]), "expected g- and 16 hex digits"),
    (lambda d: d.update(revoke=[5]), "expected a grant id string"),
    (lambda d: d.update(add={}), "must be lists"),
    (lambda d: d["add"][0].update(proto="sctp"), r"add\[0\].proto"),
    (lambda d: d.update(version=7), "must be above base version"),
    (lambda d: d.update(add=[], revoke=[]), "at least one"),
    (lambda d: d.update(revoke=["g-0000000000000002", "g-0000000000000001"]), "sorted"),
])
def test_malformed_deltas_name_what_is_wrong(mutate: Any, reason: str) -> None:
    document = json.loads(encode_delta(delta(held_state())))
    mutate(document)
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(BundleRejected, match=reason):
        decode_delta(payload)


def test_whitespace_makes_a_delta_non_canonical() -> None:
    payload = encode_delta(delta(held_state())).replace(b",", b", ", 1)
    with pytest.raises(BundleRejected, match="canonical form"):
        decode_delta(payload)


def test_a_delta_is_bounded_before_it_is_parsed() -> None:
    with pytest.raises(BundleRejected, match="refused before parsing"):
        decode_delta(b"[" * (2 * MAX_DELTA_CHANGES + 4))
    with pytest.raises(ValueError, match="more than the"):
        delta(held_state(), add=(), revoke=tuple(range(1, MAX_DELTA_CHANGES + 2)))


def test_diff_bundles_keeps_held_grants_and_refuses_what_a_delta_cannot_say() -> None:
    base = held_state()
    # grant 2 re-issued with a later window: held as it is; grant 1 gone; grant 5 new
    target = make_bundle(version=9, expires=NOW + 400, grants=(
        GrantRecord(replace(BASE_GRANTS[1], not_after=NOW + 250), 9_000_000),
        GrantRecord(make_grant(grant_id=5), 9_000_001)))
    change = diff_bundles(base, target)
    assert ([r.grant.grant_id for r in change.add], change.revoke) == ([5], (1,))
    assert (change.base_version, change.version) == (7, 9)
    after = check(change, base).apply_to(base)
    assert after.bundle.expires == base.bundle.expires  # a delta renews nothing
    assert after.grants[0] is base.grants[1]
    with pytest.raises(ValueError, match="differ in audit_agents"):
        diff_bundles(base, replace(target, audit_agents=("bot",)))
    with pytest.raises(ValueError, match="must be above the held version"):
        diff_bundles(base, replace(target, version=7))
