"""The policy file: what it accepts, and that every rejection names file,
agent, rule and field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings

from tests.unit.grant_factories import policies, policy_text, render_toml
from ztnet.errors import ConfigError, PolicyError
from ztnet.grants.model import PortRange, Proto
from ztnet.policy.document import (
    AllowRule,
    Policy,
    load_policy,
    parse_policy,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"
SOURCE = "pol.toml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, SOURCE)
    return str(info.value).splitlines()


def single_error(text: str) -> str:
    lines = errors_of(text)
    assert len(lines) == 1, lines
    return lines[0]


# --- accepted ---------------------------------------------------------------------


def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.trust_domain == "example.org"
    assert [agent.name for agent in policy.agents] == [
        "research-bot",
        "ops-bot",
        "build-bot",
        "quarantined-bot",
    ]
    snmp = policy.agent("ops-bot").allow[2]  # type: ignore[union-attr]
    assert snmp.to == ipaddress.ip_network("10.0.4.0/24")  # IPv4-mapped → IPv4
    assert policy.agent("quarantined-bot").allow == ()  # type: ignore[union-attr]
    assert policy.source == str(EXAMPLE)


def test_full_rule() -> None:
    policy = parse_policy(
        policy_text(
            'to = "10.0.2.0/24"\nports = "8000-8100"\nproto = "udp"\nttl = "2h"\ncomment = "api"'
        ),
        SOURCE,
    )
    (rule,) = policy.agents[0].allow
    assert rule == AllowRule(
        ipaddress.ip_network("10.0.2.0/24"), Proto.UDP, PortRange(8000, 8100), 7200, "api"
    )


def test_defaults_proto_tcp_and_icmp_ports_any() -> None:
    tcp = parse_policy(policy_text('to = "10.0.0.1"\nports = "22"'), SOURCE).agents[0].allow[0]
    assert tcp.proto is Proto.TCP and tcp.ttl is None and tcp.comment == ""
    icmp = parse_policy(policy_text('to = "::1"\nproto = "icmp"'), SOURCE).agents[0].allow[0]
    assert icmp.ports is None


def test_bare_addresses_are_host_routes() -> None:
    v4 = parse_policy(policy_text('to = "10.0.0.1"\nports = "any"'), SOURCE).agents[0].allow[0]
    v6 = parse_policy(policy_text('to = "2001:db8::7"\nports = "any"'), SOURCE).agents[0].allow[0]
    assert str(v4.to) == "10.0.0.1/32" and str(v6.to) == "2001:db8::7/128"


@pytest.mark.parametrize(
    ("written", "stored"),
    [("::ffff:10.0.0.0/104", "10.0.0.0/8"), ("::ffff:192.0.2.7", "192.0.2.7/32")],
)
def test_ipv4_mapped_is_normalized(written: str, stored: str) -> None:
    rule = parse_policy(policy_text(f'to = "{written}"\nports = "any"'), SOURCE).agents[0].allow[0]
    assert str(rule.to) == stored and rule.to.version == 4


def test_agent_without_rules_and_policy_without_agents() -> None:
    policy = parse_policy('trust_domain = "a.b"\n[agents.idle]\n', SOURCE)
    assert policy.agents[0].allow == ()
    assert parse_policy('trust_domain = "a.b"\n', SOURCE).agents == ()


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b"\xef\xbb\xbf" + policy_text('to = "10.0.0.1"\nports = "1"').encode())
    assert load_policy(path).trust_domain == "example.org"


@settings(max_examples=60, deadline=None)
@given(policies())
def test_rendered_policy_parses_back(policy: Policy) -> None:
    assert parse_policy(render_toml(policy), SOURCE) == policy


# --- rejected: one case per validation rule ---------------------------------------

RULE = "agents.bot.allow[0]"

RULE_ERRORS = [
    ('to = "10.0.2.0/24"\nports = "0"', "ports", "port 0 out of range 1-65535"),
    ('to = "10.0.2.0/24"\nports = "70000"', "ports", "port 70000 out of range 1-65535"),
    ('to = "10.0.2.0/24"\nports = "1-65536"', "ports", "port 65536 out of range 1-65535"),
    (
        'to = "10.0.2.0/24"\nports = "9000-8000"',
        "ports",
        "inverted port range '9000-8000'; did you mean \"8000-9000\"?",
    ),
    ('to = "10.0.2.0/24"\nports = "http"', "ports", "bad ports 'http'"),
    ('to = "10.0.2.0/24"\nports = " 443"', "ports", "bad ports ' 443'"),
    (
        'to = "10.0.2.0/24"\nports = 443',
        "ports",
        'expected a string, got an integer; write ports = "443"',
    ),
    ('to = "10.0.2.0/24"', "ports", "missing: tcp rules need ports"),
    ('to = "10.0.2.0/24"\nproto = "udp"', "ports", "missing: udp rules need ports"),
    ('to = "10.0.2.0/24"\nproto = "icmp"\nports = "80"', "ports", "icmp has no ports"),
    (
        'to = "10.0.2.1/24"\nports = "443"',
        "to",
        "10.0.2.1/24 has host bits set; did you mean 10.0.2.0/24?",
    ),
    (
        'to = "2001:db8::1/32"\nports = "443"',
        "to",
        "2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?",
    ),
    ('to = "10.0.2.0/255.255.255.0"\nports = "443"', "to", "prefix length"),
    ('to = "10.0.2.0/33"\nports = "443"', "to", "is not an IP address or CIDR"),
    ('to = "*.com"\nports = "443"', "to", "a top-level domain alone cannot be granted"),
    ('to = "nope"\nports = "443"', "to", "not an IP address or CIDR, and a top-level domain"),
    ('to = "example.com"\nproto = "icmp"', "proto", "hostname rule is for tcp, udp or any"),
    ('to = "10.0.0.0/8"\nports = "443"\nallow_private = true', "allow_private",
     "only hostname rules"),
    ('to = "fe80::1%eth0"\nports = "443"', "to", "scoped addresses"),
    ('ports = "443"', "to", "missing: every rule needs to ="),
    ('to = ["10.0.0.1"]\nports = "443"', "to", "expected a string, got an array"),
    ('to = "10.0.2.0/24"\nports = "443"\nproto = "TCP"', "proto", "lower case: 'tcp'"),
    ('to = "10.0.2.0/24"\nports = "443"\nproto = "sctp"', "proto", "unknown protocol 'sctp'"),
    ('to = "10.0.2.0/24"\nproto = "icmpv6"', "proto", "use 'icmp', which covers ICMPv6"),
    ('to = "10.0.2.0/24"\nports = "443"\nproto = 6', "proto", "expected a string, got an integer"),
    ('to = "10.0.2.0/24"\nports = "443"\nttl = "5"', "ttl", "bad duration '5'"),
    ('to = "10.0.2.0/24"\nports = "443"\nttl = "0s"', "ttl", "must be greater than zero"),
    ('to = "10.0.2.0/24"\nports = "443"\nttl = "400d"', "ttl", "longer than the maximum"),
    ('to = "10.0.2.0/24"\nports = "443"\nttl = 300', "ttl", 'write ttl = "300"'),
    ('to = "10.0.2.0/24"\nports = "443"\ncomment = "a\\nb"', "comment", "single line"),
    (
        'to = "10.0.2.0/24"\nports = "443"\ncomment = true',
        "comment",
        "expected a string, got a boolean",
    ),
    (
        'to = "10.0.2.0/24"\nports = "443"\nport = "80"',
        "port",
        "unknown key 'port'; did you mean 'ports'?",
    ),
    ('to = "10.0.2.0/24"\nports = "443"\naction = "deny"', "action", "unknown key 'action'"),
]


@pytest.mark.parametrize(("rule", "field", "message"), RULE_ERRORS)
def test_rule_errors_name_file_agent_rule_and_field(rule: str, field: str, message: str) -> None:
    line = single_error(policy_text(rule))
    assert line.startswith(f"policy: {SOURCE}: {RULE}.{field}: "), line
    assert message in line


def test_error_on_second_rule_names_its_index() -> None:
    text = policy_text('to = "10.0.0.0/8"\nports = "1"') + (
        '[[agents.bot.allow]]\nto = "10.0.0.0/8"\nports = "0"\n'
    )
    assert single_error(text).startswith(f"policy: {SOURCE}: agents.bot.allow[1].ports: port 0")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[agents.bot]\n", "trust_domain", "missing"),
        ("trust_domain = 5\n", "trust_domain", "expected a string, got an integer"),
        ('trust_domain = "Example.org."\n', "trust_domain", 'did you mean "example.org"?'),
        ('trust_domain = "exa mple"\n', "trust_domain", "not a lower-case DNS name"),
        ('trust_domain = "a.b"\nagents = "bot"\n', "agents", "expected [agents.NAME] tables"),
        ('trust_domain = "a.b"\nversion = 2\n', "version", "unknown key 'version'"),
        (
            'trust_domain = "a.b"\n[agents.Research_Bot]\n',
            "agents.Research_Bot",
            "is not a DNS label (1-63 lower-case letters, digits and '-', not starting or "
            "ending with '-'); did you mean \"research-bot\"?",
        ),
        ('trust_domain = "a.b"\n[agents."a.b"]\n', 'agents."a.b"', "is not a DNS label"),
        ('trust_domain = "a.b"\n[agents.-bot]\n', "agents.-bot", "is not a DNS label"),
        ('trust_domain = "a.b"\n[agents]\nbot = 5\n', "agents.bot", "expected a table"),
        (
            'trust_domain = "a.b"\n[agents.bot]\nallowed = []\n',
            "agents.bot.allowed",
            "unknown key 'allowed'; did you mean 'allow'?",
        ),
        (
            'trust_domain = "a.b"\n[agents.bot.allow]\nto = "10.0.0.1"\n',
            "agents.bot.allow",
            "expected an array of tables: write each rule under [[agents.bot.allow]]",
        ),
        (
            'trust_domain = "a.b"\n[agents.bot]\nallow = ["10.0.0.1"]\n',
            "agents.bot.allow",
            "expected an array of tables",
        ),
    ],
)
def test_document_errors(text: str, where: str, message: str) -> None:
    line = single_error(text)
    assert line.startswith(f"policy: {SOURCE}: {where}: "), line
    assert message in line


def test_unknown_top_level_key_suggests_and_missing_is_reported() -> None:
    lines = errors_of('trust-domain = "a.b"\n')
    assert (
        f"policy: {SOURCE}: trust-domain: unknown key 'trust-domain'; did you mean "
        "'trust_domain'?" in lines
    )
    assert any(line.startswith(f"policy: {SOURCE}: trust_domain: missing") for line in lines)


def test_all_errors_are_collected_one_per_line() -> None:
    text = (
        'trust_domain = "Bad Domain"\n'
        '[agents.a]\n[[agents.a.allow]]\nto = "10.0.0.1/8"\nports = "0"\n'
        '[agents.b]\n[[agents.b.allow]]\nports = "1-2"\nproto = "icmp"\n'
    )
    lines = errors_of(text)
    assert [line.split(": ")[2] for line in lines] == [
        "trust_domain",
        "agents.a.allow[0].to",
        "agents.a.allow[0].ports",
        "agents.b.allow[0].to",
        "agents.b.allow[0].ports",
    ]
    assert all(line.startswith(f"policy: {SOURCE}: ") for line in lines)


def test_duplicate_agent_names_file_and_line() -> None:
    text = 'trust_domain = "a.b"\n\n[agents.bot]\n\n[agents.other]\n\n[agents.bot]\n'
    line = single_error(text)
    assert line.startswith(f"policy: {SOURCE}: line 7: agents.bot: agent 'bot' is declared twice")


def test_duplicate_key_names_line() -> None:
    line = single_error(policy_text('to = "10.0.0.1"\nto = "10.0.0.2"\nports = "1"'))
    assert line.startswith(f"policy: {SOURCE}: line 7: invalid TOML:")
    assert "defined twice" in line and 'to = "10.0.0.2"' in line


def test_toml_syntax_error_names_line() -> None:
    line = single_error('trust_domain = "a.b"\n[agents.bot\n')
    assert line.startswith(f"policy: {SOURCE}: line 2: invalid TOML:")


def test_load_policy_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(PolicyError, match=f"policy: {missing}: cannot read"):
        load_policy(missing)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'trust_domain = "\xff"\n')
    with pytest.raises(PolicyError, match=f"policy: {binary}: not UTF-8"):
        load_policy(binary)
    assert issubclass(PolicyError, ConfigError)


def test_errors_name_the_real_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text('to = "10.0.2.0/24"\nports = "0"', agent="research-bot"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == (
        f"policy: {path}: agents.research-bot.allow[0].ports: port 0 out of range 1-65535"
    )


def test_model_refuses_invalid_construction() -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    with pytest.raises(ValueError):
        AllowRule(net, Proto.ICMP, PortRange(1, 1))
    with pytest.raises(ValueError):
        AllowRule(ipaddress.ip_network("::ffff:10.0.0.0/104"), Proto.TCP, None)
    with pytest.raises(ValueError):
        AllowRule(net, Proto.TCP, None, ttl=0)
    with pytest.raises(ValueError):
        Policy("Example.org")
