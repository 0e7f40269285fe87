"""Factories and hypothesis strategies for policy, grant and bundle tests."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from ztnet.durations import format_duration
from ztnet.grants.bundle import Bundle, GrantRecord
from ztnet.grants.model import Grant, IPNetwork, PortRange, Proto, normalize_network
from ztnet.policy.document import AgentPolicy, AllowRule, Policy

NOW = 1_800_000_000.0  # 2027-01-15, whole milliseconds
# Fixed keys: deterministic and no key generation cost per example.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def policy_text(
    rule: str, *, agent: str = "bot", head: str = 'trust_domain = "example.org"'
) -> str:
    """A policy with one agent and one allow rule (given as TOML lines)."""
    return f"{head}\n\n[agents.{agent}]\n\n[[agents.{agent}.allow]]\n{rule}\n"


def make_grant(**overrides: Any) -> Grant:
    fields: dict[str, Any] = {
        "grant_id": 0x1234,
        "agent": "bot",
        "proto": Proto.TCP,
        "network": ipaddress.ip_network("10.0.2.0/24"),
        "ports": PortRange(443, 443),
        "not_before": NOW,
        "not_after": NOW + 300,
    }
    fields.update(overrides)
    return Grant(**fields)


def make_bundle(*grants: Grant, **overrides: Any) -> Bundle:
    if not grants:
        grants = (make_grant(),)
    fields: dict[str, Any] = {
        "trust_domain": "example.org",
        "issuer": "test-controller",
        "audience": "web-1",
        "version": 7,
        "issued_at": NOW,
        "expires": NOW + 300,
        "grants": tuple(GrantRecord(g, 7_000_000 + i) for i, g in enumerate(grants)),
    }
    fields.update(overrides)
    return Bundle(**fields)


# --- hypothesis strategies ------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
trust_domains = st.lists(labels, min_size=1, max_size=3).map(".".join)


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    if draw(st.booleans()):
        address = draw(st.integers(0, 2**32 - 1))
        prefix = draw(st.integers(0, 32))
        network: IPNetwork = ipaddress.IPv4Network((address, prefix), strict=False)
    else:
        address = draw(st.integers(0, 2**128 - 1))
        prefix = draw(st.integers(0, 128))
        network = ipaddress.IPv6Network((address, prefix), strict=False)
    return normalize_network(network)


@st.composite
def port_ranges(draw: st.DrawFn) -> PortRange | None:
    if draw(st.booleans()):
        return None
    first = draw(st.integers(1, 65535))
    last = draw(st.one_of(st.just(first), st.integers(first, 65535)))
    return PortRange(first, last)


@st.composite
def allow_rules(draw: st.DrawFn) -> AllowRule:
    proto = draw(st.sampled_from(list(Proto)))
    ports = None if proto is Proto.ICMP else draw(port_ranges())
    ttl = draw(st.one_of(st.none(), st.sampled_from([1, 30, 60, 300, 3600, 86400, 7 * 86400])))
    comment = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
    return AllowRule(draw(networks()), proto, ports, ttl, comment)


@st.composite
def policies(draw: st.DrawFn, max_agents: int = 4, max_rules: int = 4) -> Policy:
    names = draw(st.lists(labels, max_size=max_agents, unique=True))
    agents = tuple(
        AgentPolicy(name, tuple(draw(st.lists(allow_rules(), max_size=max_rules))))
        for name in names
    )
    return Policy(draw(trust_domains), agents)


def render_toml(policy: Policy) -> str:
    """The policy as a file a person could have written."""
    lines = [f'trust_domain = "{policy.trust_domain}"']
    for agent in policy.agents:
        lines += ["", f"[agents.{agent.name}]"]
        for rule in agent.allow:
            lines += [f"[[agents.{agent.name}.allow]]", f'to = "{rule.to}"']
            lines.append(f'proto = "{rule.proto}"')
            lines.append(f'ports = "{rule.ports_text}"')
            if rule.ttl is not None:
                lines.append(f'ttl = "{format_duration(rule.ttl)}"')
            if rule.comment:
                escaped = rule.comment.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'comment = "{escaped}"')
    return "\n".join(lines) + "\n"


def quantized(grant: Grant) -> Grant:
    """A grant's times as a bundle carries them (whole milliseconds)."""
    return replace(
        grant,
        not_before=round(grant.not_before * 1000) / 1000,
        not_after=round(grant.not_after * 1000) / 1000,
    )
