"""Audit mode without the kernel: the policy's ``mode``, the signed bundle's audited agents,
the reference decision, revocation forcing enforce mode, and the AUDIT verdict in flow
records."""

from __future__ import annotations

import ipaddress
import json

import pytest

from tests.unit.grant_factories import KEY, NOW, make_bundle, make_grant
from tests.unit.test_observe_records import make_ctx, make_event
from ztnet.controller.epochs import effective_policy
from ztnet.controller.store import Revocation
from ztnet.datapath.abi import ZtEventKind, ZtReason, ZtVerdict
from ztnet.errors import BundleRejected, PolicyError
from ztnet.grants.bundle import sign_bundle, verify_bundle
from ztnet.grants.evaluate import Decision, audit_protected, decide
from ztnet.grants.model import AgentMode
from ztnet.grants.payload import decode_payload, encode_payload
from ztnet.observe.query import parse_verdict
from ztnet.observe.records import HUBBLE_VERDICT, Verdict, from_event, from_json, to_json
from ztnet.policy.document import parse_policy
from ztnet.policy.issue import issue_bundle

POLICY = """trust_domain = "example.org"
[agents.watched]
mode = "audit"
[[agents.watched.allow]]
to = "10.0.2.0/24"
ports = "443"
[agents.strict]
mode = "enforce"
[agents.plain]
"""


def test_mode_is_parsed_per_agent_and_defaults_to_enforce() -> None:
    policy = parse_policy(POLICY, "p.toml")
    modes = {agent.name: agent.mode for agent in policy.agents}
    assert modes == {"watched": AgentMode.AUDIT, "strict": AgentMode.ENFORCE,
                     "plain": AgentMode.ENFORCE}


@pytest.mark.parametrize("value, message", [
    ('"Audit"', "'Audit' is not a mode"),
    ('"monitor"', "'monitor' is not a mode"),
    ("true", "expected a string, got a boolean"),
])
def test_a_bad_mode_is_named_with_its_place(value: str, message: str) -> None:
    text = POLICY.replace('mode = "audit"', f"mode = {value}")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.toml")
    assert "policy: p.toml: agents.watched.mode: " in str(caught.value)
    assert message in str(caught.value)


def test_a_misspelt_mode_key_is_suggested() -> None:
    with pytest.raises(PolicyError, match=r"agents.watched.mod: unknown key 'mod'; did you "
                                          r"mean 'mode'\?"):
        parse_policy(POLICY.replace('mode = "audit"', 'mod = "audit"'), "p.toml")


def test_audited_agents_are_signed_into_the_bundle() -> None:
    policy = parse_policy(POLICY, "p.toml")
    bundle = issue_bundle(policy, host="web-1", version=3, now=NOW, issuer="t")
    assert bundle.audit_agents == ("watched",)
    payload = encode_payload(bundle)
    assert json.loads(payload)["audit"] == ["spiffe://example.org/agent/watched"]
    assert decode_payload(payload) == bundle
    verified = verify_bundle(sign_bundle(bundle, KEY), trusted=[KEY.public_key()],
                             host="web-1", min_version=0, now=NOW)
    assert verified.bundle.audit_agents == ("watched",)


def test_a_bundle_without_audited_agents_keeps_its_bytes() -> None:
    payload = encode_payload(make_bundle())
    assert b'"audit"' not in payload
    assert decode_payload(payload).audit_agents == ()


@pytest.mark.parametrize("audit, message", [
    ([], "not in canonical form"),
    (["spiffe://example.org/agent/b", "spiffe://example.org/agent/a"], "sorted and unique"),
    (["spiffe://other.org/agent/a"], "audit[0]: 'spiffe://other.org/agent/a' is not under"),
    ([7], "audit[0]: expected a string"),
    ("spiffe://example.org/agent/a", "audit: expected a list"),
])
def test_a_bad_audit_list_rejects_the_bundle(audit: object, message: str) -> None:
    document = json.loads(encode_payload(make_bundle()))
    document["audit"] = audit
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(BundleRejected, match="bundle: malformed payload: ") as caught:
        decode_payload(data)
    assert message in str(caught.value)


def test_audited_agents_must_be_sorted_unique_agent_names() -> None:
    with pytest.raises(ValueError, match="sorted and unique"):
        make_bundle(audit_agents=("a", "a"))
    with pytest.raises(ValueError, match="not an agent name"):
        make_bundle(audit_agents=("Bot",))


def test_a_revoked_agent_is_enforced_even_when_the_policy_audits_it() -> None:
    policy = parse_policy(POLICY, "p.toml")
    revoked = effective_policy(policy, (Revocation("watched", None, 2, NOW),))
    agent = revoked.agent("watched")
    assert agent is not None and agent.mode is AgentMode.ENFORCE and agent.allow == ()
    assert issue_bundle(revoked, host="web-1", version=4, now=NOW, issuer="t").audit_agents == ()
    single = effective_policy(policy, (Revocation("watched", 1, 2, NOW),))
    assert single.agent("watched").mode is AgentMode.AUDIT  # type: ignore[union-attr]


@pytest.mark.parametrize("address, protected", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("0.0.0.0", True), ("169.254.169.254", True),
    ("169.254.170.2", True), ("::1", True), ("::", True), ("fe80::1", True),
    ("fd00:ec2::254", True), ("::ffff:127.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("10.0.0.1", False), ("169.253.0.1", False), ("128.0.0.1", False), ("::2", False),
    ("fd00:ec2::253", False), ("fec0::1", False), ("2001:db8::1", False),
])
def test_audit_protected_destinations(address: str, protected: bool) -> None:
    assert audit_protected(ipaddress.ip_address(address)) is protected


def test_decide_follows_grants_then_mode_then_protection() -> None:
    grants = [make_grant(network=ipaddress.ip_network("127.0.0.1/32"), ports=None),
              make_grant(grant_id=2)]

    def run(mode: AgentMode, host: str, port: int = 443, **kw: bool) -> Decision:
        return decide(grants, "bot", mode, 6, ipaddress.ip_address(host), port, NOW + 1,
                      **kw)[0]
    assert run(AgentMode.ENFORCE, "10.0.2.5") is Decision.ALLOWED
    assert run(AgentMode.ENFORCE, "10.9.9.9") is Decision.DENIED
    assert run(AgentMode.AUDIT, "10.9.9.9") is Decision.AUDIT
    assert run(AgentMode.AUDIT, "169.254.169.254") is Decision.DENIED
    assert run(AgentMode.AUDIT, "127.0.0.1") is Decision.ALLOWED  # granted
    assert run(AgentMode.AUDIT, "127.0.0.2") is Decision.DENIED
    assert run(AgentMode.AUDIT, "10.0.2.5", quarantined=True) is Decision.DENIED
    assert run(AgentMode.AUDIT, "10.9.9.9", quarantined=True) is Decision.DENIED


def test_audit_verdicts_become_audit_records() -> None:
    event = make_event(verdict=ZtVerdict.AUDIT, reason=ZtReason.NO_GRANT, grant_id=0)
    record = from_event(event, make_ctx())
    assert record.verdict is Verdict.AUDIT and record.grant is None
    assert json.loads(to_json(record))["verdict"] == "AUDIT"
    assert from_json(to_json(record)) == record
    end = from_event(event._replace(kind=ZtEventKind.FLOW_END), make_ctx())
    assert end.verdict is Verdict.AUDIT
    assert parse_verdict("audit") is Verdict.AUDIT and HUBBLE_VERDICT[Verdict.AUDIT] == "AUDIT"
    assert Decision.AUDIT.value == Verdict.AUDIT.value  # the evaluator's words are the records'


def test_policy_check_says_an_agent_is_in_audit_mode() -> None:
    from ztnet.policy.summary import summarize

    text = summarize(parse_policy(POLICY, "p.toml"))
    assert "note: agents.watched is in AUDIT mode" in text and "open egress" in text
    assert "(no rules: no network access)" in text  # plain and strict enforce
    assert "audit-mode agents excepted" in text


def test_a_quarantined_agent_is_not_audited() -> None:
    from ztnet.grants.payload import Quarantine

    policy = parse_policy(POLICY, "p.toml")
    bundle = issue_bundle(policy, host="web-1", version=3, now=NOW, issuer="t",
                          quarantine=(Quarantine("watched"),))
    assert bundle.audit_agents == () and bundle.grants == ()
