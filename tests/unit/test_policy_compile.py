"""Policy → grants: stable ids, lifetimes, dedupe, order."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from tests.unit.grant_factories import NOW, policies
from ztnet.errors import PolicyError
from ztnet.grants.model import MAX_GRANT_ID, PortRange, Proto
from ztnet.policy import compile as compile_module
from ztnet.policy.compile import compile_grants, grant_id_for
from ztnet.policy.document import AllowRule, Policy, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"


def parse(body: str, trust_domain: str = "example.org") -> Policy:
    return parse_policy(f'trust_domain = "{trust_domain}"\n{body}', "t.toml")


ONE = '[agents.bot]\n[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "443"\n'


def test_example_policy_compiles() -> None:
    grants = compile_grants(load_policy(EXAMPLE), now=NOW)
    assert len(grants) == 9
    assert {g.agent for g in grants} == {"research-bot", "ops-bot", "build-bot"}
    assert all(g.not_before == NOW for g in grants)
    assert sorted(g.not_after - NOW for g in grants) == sorted(
        [300, 300, 7200, 300, 300, 30, 30, 3600, 86400]
    )


def test_grant_id_is_the_documented_hash() -> None:
    (grant,) = compile_grants(parse(ONE), now=NOW)
    digest = hashlib.sha256(
        b"ztnet grant id v1\x00example.org\x00bot\x0010.0.2.0/24\x00443\x00tcp"
    ).digest()
    assert grant.grant_id == int.from_bytes(digest[:8], "big")
    assert 0 < grant.grant_id <= MAX_GRANT_ID


def test_id_ignores_time_ttl_comment_order_and_spelling() -> None:
    base = compile_grants(parse(ONE), now=NOW)[0].grant_id
    later = compile_grants(parse(ONE), now=NOW + 3600, default_ttl=60)[0].grant_id
    respelled = parse(
        '[agents.other]\n[agents.bot]\n[[agents.bot.allow]]\nto = "10.0.2.0/24"\n'
        'ports = "443-443"\nproto = "tcp"\nttl = "1h"\ncomment = "x"\n'
        '[[agents.bot.allow]]\nto = "10.9.0.0/16"\nports = "1"\n'
    )
    ids = {g.grant_id for g in compile_grants(respelled, now=NOW)}
    assert later == base and base in ids


@pytest.mark.parametrize(
    "change",
    [
        {"trust_domain": "example.net"},
        {"agent": "bot2"},
        {"to": "10.0.3.0/24"},
        {"ports": "444"},
        {"proto": "udp"},
    ],
)
def test_id_changes_with_what_the_rule_allows(change: dict[str, str]) -> None:
    fields = {
        "trust_domain": "example.org",
        "agent": "bot",
        "to": "10.0.2.0/24",
        "ports": "443",
        "proto": "tcp",
    } | change
    policy = parse(
        f"[agents.{fields['agent']}]\n[[agents.{fields['agent']}.allow]]\n"
        f'to = "{fields["to"]}"\nports = "{fields["ports"]}"\nproto = "{fields["proto"]}"\n',
        fields["trust_domain"],
    )
    base = compile_grants(parse(ONE), now=NOW)[0].grant_id
    assert compile_grants(policy, now=NOW)[0].grant_id != base


def test_zero_hash_is_rehashed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hashlib.sha256
    calls: list[bytes] = []

    class FakeHashlib:
        @staticmethod
        def sha256(data: bytes) -> Any:
            calls.append(data)
            return real(b"") if len(calls) > 1 else _ZeroDigest()

    class _ZeroDigest:
        def digest(self) -> bytes:
            return bytes(32)

    monkeypatch.setattr(compile_module, "hashlib", FakeHashlib)
    rule = AllowRule(ipaddress.ip_network("10.0.0.0/8"), Proto.TCP, PortRange(1, 1))
    grant_id = grant_id_for("a.b", "bot", rule)
    assert grant_id == int.from_bytes(real(b"").digest()[:8], "big") != 0
    assert calls[1] == bytes(32)


def test_ttls() -> None:
    policy = parse(ONE + '[[agents.bot.allow]]\nto = "10.0.3.0/24"\nports = "1"\nttl = "1h"\n')
    by_net = {str(g.network): g for g in compile_grants(policy, now=NOW, default_ttl=60)}
    assert by_net["10.0.2.0/24"].not_after == NOW + 60
    assert by_net["10.0.3.0/24"].not_after == NOW + 3600


def test_identical_rules_dedupe_to_longest_ttl() -> None:
    policy = parse(
        "[agents.bot]\n"
        '[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "443"\nttl = "1m"\n'
        '[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "443"\nttl = "2h"\n'
        '[[agents.bot.allow]]\nto = "10.0.2.0/24"\nports = "443"\n'
        '[agents.bot2]\n[[agents.bot2.allow]]\nto = "10.0.2.0/24"\nports = "443"\n'
    )
    grants = compile_grants(policy, now=NOW)
    assert [(g.agent, g.not_after - NOW) for g in grants] == [("bot", 7200), ("bot2", 300)]


def test_sorted_deterministically() -> None:
    policy = parse(
        '[agents.zed]\n[[agents.zed.allow]]\nto = "10.0.0.1"\nports = "1"\n'
        "[agents.abe]\n"
        '[[agents.abe.allow]]\nto = "::1"\nports = "1"\n'
        '[[agents.abe.allow]]\nto = "10.0.0.2"\nports = "9"\nproto = "udp"\n'
        '[[agents.abe.allow]]\nto = "10.0.0.2"\nports = "2"\n'
        '[[agents.abe.allow]]\nto = "10.0.0.0/8"\nports = "any"\n'
    )
    order = [
        (g.agent, str(g.network), str(g.proto), str(g.ports))
        for g in compile_grants(policy, now=NOW)
    ]
    assert order == [
        ("abe", "10.0.0.0/8", "tcp", "None"),
        ("abe", "10.0.0.2/32", "tcp", "2"),
        ("abe", "10.0.0.2/32", "udp", "9"),
        ("abe", "::1/128", "tcp", "1"),
        ("zed", "10.0.0.1/32", "tcp", "1"),
    ]


@pytest.mark.parametrize("ttl", [0, -1, 366 * 86400])
def test_bad_default_ttl(ttl: float) -> None:
    with pytest.raises(PolicyError, match="policy: default ttl"):
        compile_grants(parse(ONE), now=NOW, default_ttl=ttl)


@settings(max_examples=60, deadline=None)
@given(policies())
def test_one_grant_per_distinct_rule(policy: Policy) -> None:
    grants = compile_grants(policy, now=NOW)
    distinct = {(a.name, *r.canonical()) for a in policy.agents for r in a.allow}
    assert len(grants) == len({g.grant_id for g in grants}) == len(distinct)
    assert compile_grants(policy, now=NOW) == grants  # deterministic
    for grant in grants:
        rules = [
            r
            for r in policy.agent(grant.agent).allow  # type: ignore[union-attr]
            if (r.to, r.proto, r.ports) == (grant.network, grant.proto, grant.ports)
        ]
        assert rules
        assert grant.not_after == NOW + max(r.ttl or 300.0 for r in rules)
