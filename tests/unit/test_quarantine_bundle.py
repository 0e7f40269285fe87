"""Quarantine in the signed bundle: its canonical encoding, strict decoding, what issuing
leaves out, and which hosts an epoch's quarantines reach."""

from __future__ import annotations

import json

import pytest

from tests.unit.grant_factories import KEY, NOW
from ztnet.controller.detectstore import QuarantineRecord
from ztnet.controller.epochs import Issuer
from ztnet.errors import BundleRejected
from ztnet.grants.bundle import decode_payload, encode_payload, sign_bundle, verify_bundle
from ztnet.grants.payload import Quarantine
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

POLICY = parse_policy('trust_domain = "example.org"\n'
                      '[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "443"\nproto = "tcp"\n'
                      '[[agents.ops.allow]]\nto = "10.0.3.0/24"\nports = "22"\nproto = "tcp"\n',
                      "p")


def issue(quarantine: tuple[Quarantine, ...] = ()) -> bytes:
    return encode_payload(issue_bundle(POLICY, host="web-1", version=3, now=NOW,
                                       issuer="test", quarantine=quarantine))


def test_a_quarantined_agent_loses_its_grants_and_is_named_in_the_signed_payload() -> None:
    plain = issue()
    assert b"quarantine" not in plain  # no quarantine: the bytes bundles always had
    data = issue((Quarantine("bot", freeze=True),))
    bundle = decode_payload(data)
    assert bundle.quarantine == (Quarantine("bot", True),)
    assert {r.grant.agent for r in bundle.grants} == {"ops"}
    document = json.loads(data)
    assert document["quarantine"] == [{"agent": "spiffe://example.org/agent/bot",
                                       "freeze": True}]
    envelope = sign_bundle(bundle, KEY)
    verified = verify_bundle(envelope, trusted=[KEY.public_key()], host="web-1", min_version=0,
                             now=NOW + 1)
    assert verified.bundle.quarantine == (Quarantine("bot", True),)


@pytest.mark.parametrize("edit", [
    lambda d: d.__setitem__("quarantine", []),  # an empty list is not the canonical form
    lambda d: d.__setitem__("quarantine", [{"agent": "spiffe://example.org/agent/bot"}]),
    lambda d: d.__setitem__("quarantine", [{"agent": "spiffe://other.org/agent/bot",
                                            "freeze": False}]),
    lambda d: d.__setitem__("quarantine", [{"agent": "spiffe://example.org/agent/bot",
                                            "freeze": 1}]),
    lambda d: d.__setitem__("quarantine", [
        {"agent": "spiffe://example.org/agent/ops", "freeze": False},
        {"agent": "spiffe://example.org/agent/bot", "freeze": False}]),  # not sorted
    lambda d: d.__setitem__("quarantine", "bot"),
])
def test_malformed_quarantine_lists_are_refused(edit: object) -> None:
    document = json.loads(issue())
    edit(document)  # type: ignore[operator]
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(BundleRejected, match="quarantine|canonical"):
        decode_payload(data)


def test_an_epoch_quarantines_one_host_or_every_host() -> None:
    issuer = Issuer(KEY, grant_ttl=300.0)
    records = (QuarantineRecord("bot", "", "scan", False, "alice", 0, 1, NOW),
               QuarantineRecord("ops", "web-2", "burst", True, "auto", 4, 2, NOW))
    epoch = issuer.new_epoch(POLICY, policy_version=1, revocations=(), version=5, now=NOW,
                             reason="quarantine", quarantines=records)
    assert epoch.quarantine_for("web-1") == (Quarantine("bot", False),)
    assert epoch.quarantine_for("web-2") == (Quarantine("bot", False), Quarantine("ops", True))
    web1 = verify_bundle(issuer.envelope(epoch, "web-1"), trusted=[KEY.public_key()],
                         host="web-1", min_version=0, now=NOW + 1)
    assert {g.agent for g in web1.grants} == {"ops"}
    web2 = verify_bundle(issuer.envelope(epoch, "web-2"), trusted=[KEY.public_key()],
                         host="web-2", min_version=0, now=NOW + 1)
    assert web2.grants == ()
