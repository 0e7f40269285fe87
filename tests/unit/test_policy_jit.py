"""The policy's [jit] section (ztnet.policy.jit): what auto-approve rules may say, what a
request must be to be auto-approved, and the ttl clamps."""

from __future__ import annotations

import ipaddress

import pytest

from ztnet.errors import PolicyError
from ztnet.grants.model import PortRange, Proto
from ztnet.policy.document import parse_policy
from ztnet.policy.jit import DEFAULT_MAX_TTL, never_auto

HEAD = 'trust_domain = "test.example"\n[agents.bot]\n[agents.other]\n'
POLICY = HEAD + """
[jit]
max_ttl = "30m"

[[jit.auto_approve]]
agents = ["bot"]
to = "203.0.113.0/28"
ports = "443"
max_ttl = "5m"

[[jit.auto_approve]]
to = "2001:db8:1::/48"
ports = "8000-8100"
proto = "udp"
"""


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_no_jit_section_means_nothing_is_auto_approved() -> None:
    jit = parse_policy(HEAD, "p.toml").jit
    assert jit.max_ttl == DEFAULT_MAX_TTL and jit.auto_approve == ()
    assert jit.auto_rule("bot", net("203.0.113.1/32"), Proto.TCP, PortRange(443, 443)) is None


@pytest.mark.parametrize("agent, to, proto, ports, rule", [
    ("bot", "203.0.113.1/32", Proto.TCP, (443, 443), 0),
    ("bot", "203.0.113.0/29", Proto.TCP, (443, 443), 0),       # a narrower prefix inside
    ("other", "203.0.113.1/32", Proto.TCP, (443, 443), None),  # not the rule's agent
    ("bot", "203.0.113.16/32", Proto.TCP, (443, 443), None),   # outside the prefix
    ("bot", "203.0.113.0/24", Proto.TCP, (443, 443), None),    # wider than the rule
    ("bot", "203.0.113.1/32", Proto.TCP, (443, 444), None),    # a port outside
    ("bot", "203.0.113.1/32", Proto.UDP, (443, 443), None),    # another protocol
    ("bot", "203.0.113.1/32", Proto.TCP, None, None),          # any port
    ("other", "2001:db8:1:2::7/128", Proto.UDP, (8000, 8001), 1),
    ("other", "2001:db8:1:2::7/128", Proto.UDP, (7999, 8001), None),
])
def test_a_request_is_auto_approved_only_inside_a_rule(
        agent: str, to: str, proto: Proto, ports: tuple[int, int] | None,
        rule: int | None) -> None:
    jit = parse_policy(POLICY, "p.toml").jit
    found = jit.auto_rule(agent, net(to), proto, PortRange(*ports) if ports else None)
    assert (None if found is None else jit.auto_approve.index(found)) == rule


def test_ttls_are_clamped_by_the_rule_and_the_section() -> None:
    jit = parse_policy(POLICY, "p.toml").jit
    assert jit.clamp(3600) == 1800
    assert jit.clamp(3600, jit.auto_approve[0]) == 300
    assert jit.clamp(3600, jit.auto_approve[1]) == 1800
    assert jit.clamp(60, jit.auto_approve[0]) == 60


@pytest.mark.parametrize("to", ["127.0.0.1", "10.1.2.3", "172.16.5.0/24", "192.168.1.1",
                                "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
                                "::1", "fd00::1", "fe80::1", "ff02::1", "64:ff9b::a00:1"])
def test_private_loopback_metadata_and_reserved_are_never_auto_approved(to: str) -> None:
    assert never_auto(net(to), Proto.TCP, PortRange(443, 443)) is not None
    rule = HEAD + f'[jit]\n[[jit.auto_approve]]\nto = "{to}"\nports = "443"\n'
    with pytest.raises(PolicyError, match=r"jit\.auto_approve\[0\]: never auto-approved"):
        parse_policy(rule, "p.toml")


@pytest.mark.parametrize("body, problem", [
    ('to = "198.51.100.0/23"\nports = "443"', "wider than /24"),
    ('to = "2001:db8::/32"\nports = "443"', "wider than /48"),
    ('to = "198.51.100.7"\nports = "any"', 'ports "any"'),
    ('to = "198.51.100.7"\nports = "any"\nproto = "icmp"', "only tcp and udp"),
    ('to = "198.51.100.7"', "ports: missing"),
    ('ports = "443"', "to: missing"),
    ('to = "198.51.100.7"\nports = "443"\nagents = "bot"', "array of agent names"),
    ('to = "198.51.100.7"\nports = "443"\nmax_ttl = "forever"', "bad duration"),
    ('to = "198.51.100.7"\nports = "443"\nport = "1"', "unknown key 'port'"),
    ('to = "198.51.100.1/24"\nports = "443"', "host bits set"),
])
def test_bad_auto_approve_rules_are_refused_naming_the_rule(body: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(HEAD + f"[jit]\n[[jit.auto_approve]]\n{body}\n", "p.toml")
    assert "policy: p.toml: jit.auto_approve[0]" in str(caught.value)
    assert problem in str(caught.value)


def test_bad_jit_sections() -> None:
    with pytest.raises(PolicyError, match=r"jit\.max_ttl: bad duration"):
        parse_policy(HEAD + '[jit]\nmax_ttl = "1 hour"\n', "p.toml")
    with pytest.raises(PolicyError, match=r"jit\.auto: unknown key"):
        parse_policy(HEAD + '[jit]\nauto = 1\n', "p.toml")
    with pytest.raises(PolicyError, match=r"jit: expected a table"):
        parse_policy(HEAD.replace('[agents.bot]', 'jit = 1\n[agents.bot]'), "p.toml")
